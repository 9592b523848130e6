"""What a job's float results depend on besides params and code (``recast.machine``): the
thread count ``runtime.torch_threads`` is applied to every job and keys its cache entry, and
every MLflow run (the stage's parent run and each job's child run) carries the CPU model, torch's
CPU capability and the torch thread count. In-process jobs only: no Ray start here (the Ray
path is checked in ``test_stage_fanout.test_a_single_job_runs_in_the_driver_bit_identical_to_ray``)."""

from __future__ import annotations

import json
import os

import torch

from recast.machine import cpu_model
from stages.config.params import RuntimeParams
from stages.jobs.fanout import run_jobs
from stages.jobs.inputs import InputStore
from stages.jobs.result import JobResult

CALLS: list[int] = []


def counted_job(spec, inputs):
    """Records its thread count; a float sum that depends on it."""
    CALLS.append(torch.get_num_threads())
    x = torch.linspace(0, 1, 10_000) ** 2
    return JobResult({"arch": "vit", "method": "recast", "task": spec["task"], "seed": 0, "val_acc": 0.5,
                      "test_acc": 0.5, "stored_params": 3, "bytes": 12, "num_classes": 2, "recast": True,
                      "sum": float(x.sum()), "threads": torch.get_num_threads()}, {"coef": torch.arange(3.0)})


def test_a_cached_result_of_another_thread_count_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    CALLS.clear()
    spec = {"id": "count/1", "task": "t"}
    one = RuntimeParams(num_cpus=2, cpus_per_task=2, cache_dir=str(tmp_path / "cache"), progress=False)
    run_jobs("count", counted_job, [spec], one)
    run_jobs("count", counted_job, [spec], one)  # cached
    assert CALLS == [1]
    two = run_jobs("count", counted_job, [spec], one.model_copy(update={"torch_threads": 2}))
    assert CALLS == [1, 2] and two["count/1"].metrics["threads"] == 2
    run_jobs("count", counted_job, [spec], one.model_copy(update={"torch_threads": 2}))  # cached again
    assert CALLS == [1, 2]


def test_every_run_records_the_cpu_and_torch_threads(tmp_path, monkeypatch):
    """The parent run: the driver's machine; a job's child run and its ``job/spec.json``: the
    machine and thread count the job ran with (1 here, while the driver runs 2 threads)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from stages.jobs.driver import StageRun
    from stages.jobs.results import publish_job
    from stages.tracking.runs import Tracker

    capability = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    rt = RuntimeParams(num_cpus=2, cpus_per_task=2, cache_dir=str(tmp_path / "cache"), progress=False)
    spec = {"id": "tune/vit/recast/t/s0", "arch": "vit", "method_name": "recast", "task": "t", "seed": 0,
            "bank_sha": "b"}
    try:
        with Tracker("tune", "machine") as tracker:
            run = StageRun("tune", rt, tracker, InputStore(), tmp_path / "out")
            run_jobs("tune", counted_job, [spec], rt, lambda s, result, cached: publish_job(run, s, result, cached))
            tracker.finish()
    finally:
        torch.set_num_threads(threads)
    runs = tracker.client.search_runs([tracker.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kind") == "stage")
    child = next(r for r in runs if r.data.tags.get("job") == spec["id"])
    for run, expected_threads in ((parent, "2"), (child, "1")):
        t = run.data.tags
        assert t["cpu.model"] == cpu_model() != "", run.info.run_name
        assert t["torch.cpu_capability"] == capability and t["torch.threads"] == expected_threads, run.info.run_name
        assert t["torch.version"] == torch.__version__
    assert child.data.metrics["threads"] == 1
    local = tracker.client.download_artifacts(child.info.run_id, "job/spec.json", str(tmp_path / "dl"))
    job = json.loads(open(local).read())
    assert job["torch_threads"] == 1 and job["machine"]["cpu_model"] == cpu_model()
    assert job["machine"]["cpu_capability"] == capability and os.path.exists(local)
