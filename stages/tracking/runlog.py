"""What the stages log to MLflow beyond a run's params and final metrics: dataset inputs,
metric curves (one point per epoch or step), JSON and figure artifacts.

Every write goes through ``stages.tracking.store.retry`` on the tracker's client, inside
``Tracker.guard``: once the store is unreachable the write is listed as missing, not raised
(the stage's next run logs it: see ``stages.tracking.runs``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric

from stages.tracking.lineage import TaskData
from stages.tracking.runs import Tracker
from stages.tracking.store import retry

DIGEST_CHARS = 32  # MLflow stores a dataset digest in a VARCHAR(36); the full sha256 is in the profile


def dataset_entity(task: TaskData) -> Dataset:
    """A prepared task as an MLflow dataset: digest = its manifest sha256 (first 32 hex
    characters, the store's limit; the full one is in ``profile``), source = its folder's URI."""
    return Dataset(name=task.name, digest=task.sha256[:DIGEST_CHARS], source_type="local",
                   source=json.dumps({"uri": Path(task.path).as_uri()}),
                   profile=json.dumps({"manifest_sha256": task.sha256}))


def log_datasets(tracker: Tracker, run_id: str, tasks: Iterable[TaskData], context: str = "train") -> None:
    """Log each task as a dataset input of ``run_id`` (context tag ``mlflow.data.context``)."""
    inputs = [DatasetInput(dataset_entity(t), tags=[InputTag("mlflow.data.context", context)]) for t in tasks]
    if inputs:
        what = f"dataset inputs of {run_id}"
        tracker.guard(lambda: retry(lambda: tracker.client.log_inputs(run_id, datasets=inputs), tracker.uri, what), what)


def log_history(tracker: Tracker, run_id: str, history: list[dict[str, Any]], step_key: str, prefix: str) -> int:
    """Log every numeric field of each history row as ``<prefix>/<field>`` at step ``row[step_key]``;
    returns the number of points logged. A run that already has ``<prefix>/...`` metrics (a child
    run found again by a resumed stage) gets none, so no curve is logged twice."""
    ts = int(time.time() * 1000)
    points = [Metric(f"{prefix}/{k}", float(v), ts, int(row[step_key])) for row in history
              for k, v in row.items() if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool)]
    what = f"{prefix} curves of {run_id}"

    def log() -> int:
        if any(k.startswith(f"{prefix}/") for k in tracker.client.get_run(run_id).data.metrics):
            return 0
        for i in range(0, len(points), 500):
            tracker.client.log_batch(run_id, metrics=points[i:i + 500])
        return len(points)

    return tracker.guard(lambda: retry(log, tracker.uri, what), what) or 0


def acc_matrix_history(task_names: list[str], acc_matrix: list[list[float | None]]) -> list[dict[str, Any]]:
    """A sequential run's accuracy matrix as history rows: after task i (step i), the accuracy on
    every task seen so far and their mean."""
    rows = []
    for i, row in enumerate(acc_matrix):
        seen = {task_names[j]: float(a) for j, a in enumerate(row[:i + 1]) if a is not None}
        rows.append({"task_index": i, **seen, "avg_seen": sum(seen.values()) / max(len(seen), 1)})
    return rows


def log_json(tracker: Tracker, run_id: str, obj: Any, artifact_file: str) -> None:
    """Log ``obj`` as the JSON artifact ``artifact_file`` (e.g. ``job/spec.json``)."""
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory(prefix="recast-artifact-") as tmp:
        local = Path(tmp) / path.name
        local.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        what = f"artifact {artifact_file} of {run_id}"
        tracker.guard(lambda: retry(lambda: tracker.client.log_artifact(
            run_id, str(local), artifact_path=str(path.parent) or None), tracker.uri, what), what)


def log_file(tracker: Tracker, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Log the file ``path`` as an artifact of ``run_id`` (under ``artifact_path``)."""
    what = f"artifact {Path(path).name} of {run_id}"
    tracker.guard(lambda: retry(lambda: tracker.client.log_artifact(run_id, str(path), artifact_path=artifact_path),
                                tracker.uri, what), what)


def load_json_artifact(run_id: str, artifact_file: str, uri: str) -> Any:
    """Read a JSON artifact of ``run_id`` from the store at ``uri``."""
    with tempfile.TemporaryDirectory(prefix="recast-artifact-") as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file, dst_path=tmp,
                                                    tracking_uri=uri)
        return json.loads(Path(local).read_text())
