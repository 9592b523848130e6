"""A minimal stage for the fault tests, run as ``python -m tests.reliability.driver ROOT N SLEEP``
from the repo root: the tune stage's machinery (stage lock, Tracker, ``run_jobs`` and its job
cache, ``publish_job``: payload files, child runs, registry) around a job that sleeps and returns
a tiny payload. Each computation leaves a mark file in ``ROOT/marks``; the last stdout line is
JSON ``{"cached": {job id: bool}, "token_auth": bool or None (no Ray started)}``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from stages.config.cli import run_cli
from stages.config.params import RuntimeParams
from stages.jobs.driver import StageRun, stage_lock
from stages.jobs.fanout import run_jobs
from stages.jobs.inputs import InputStore
from stages.jobs.result import JobResult
from stages.jobs.results import publish_job
from stages.tracking.runs import Tracker


def fake_job(spec: dict, inputs) -> JobResult:
    """Sleep, then return a tune job's metrics and a 3-number payload."""
    Path(spec["marks"], f"{spec['task']}.{os.getpid()}.{time.time_ns()}").touch()
    time.sleep(spec["sleep"])
    i = spec["index"]
    meta = {"arch": "vit", "method": "recast", "task": spec["task"], "seed": 0, "val_acc": 0.5, "test_acc": 0.5 + i / 100,
            "trainable_params": 3, "stored_params": 3, "bytes": 12, "num_classes": 2, "recast": True,
            "seconds_per_step": 0.0, "train_seconds": 0.0}
    return JobResult(meta, {"coef": torch.full((3,), float(i))})


def main() -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
    root, n, sleep = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    (root / "marks").mkdir(parents=True, exist_ok=True)
    rt = RuntimeParams(num_cpus=1, cache_dir=str(root / "cache"), experiment="faults", progress=False)
    specs = [{"id": f"fake/vit/recast/t{i}/s0", "arch": "vit", "method_name": "recast", "task": f"t{i}", "seed": 0,
              "index": i, "sleep": sleep, "marks": str(root / "marks"), "bank_sha": "b"} for i in range(n)]
    cached_flags: dict[str, bool] = {}
    with stage_lock("fake", rt), Tracker("fake", rt.experiment, {"n": n}) as tracker:
        store = InputStore()
        run = StageRun("fake", rt, tracker, store, root / "out")

        def on_result(spec: dict, result: JobResult, cached: bool) -> None:
            cached_flags[spec["id"]] = cached
            publish_job(run, spec, result, cached)

        run_jobs("fake", fake_job, specs, rt, on_result, inputs=store)
        tracker.finish({"jobs": float(n)})
    import ray

    token_auth = None  # no Ray started: every job came from the cache
    if ray.is_initialized():
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        token_auth = is_token_auth_enabled()
    print(json.dumps({"cached": cached_flags, "token_auth": token_auth}))


if __name__ == "__main__":
    run_cli(main)
