"""The tests' fault injection hook: a job (or a sweep trial) that kills its own worker once."""

from __future__ import annotations

import os
from pathlib import Path

FAULT_ENV = "RECAST_FAULT_ONCE_DIR"  # tests: a job whose marker is absent kills its worker once
FAULT_POINT_ENV = "RECAST_FAULT_POINT"  # tests: where (comma list): "start" (default), "epoch:<k>", "task:<j>",
# "task:<j>:epoch:<k>" (a sequential job: k epochs of task j, 0-based, done)
MARKER_ENV = "RECAST_TRIAL_MARKER_DIR"  # tests: each sweep trial that computes leaves a file here


def maybe_fault(job_id: str, point: str = "start") -> None:
    """Tests: with RECAST_FAULT_ONCE_DIR set, exit this process the first time ``job_id`` reaches
    ``point``, the one named by RECAST_FAULT_POINT (default ``start``; ``epoch:<k>`` / ``task:<j>`` /
    ``task:<j>:epoch:<k>``: once its checkpoint after epoch k / task j / epoch k of task j is written)."""
    fault_dir = os.environ.get(FAULT_ENV)
    if not fault_dir or point not in os.environ.get(FAULT_POINT_ENV, "start").split(","):
        return
    suffix = "" if point == "start" else "." + point.replace(":epoch:", ".epoch").replace(":", "")
    marker = Path(fault_dir) / f"{job_id.replace('/', '_')}{suffix}.killed"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("killed once\n")
        os._exit(1)  # simulate a worker lost mid-task
