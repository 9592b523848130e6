"""The one driver loop of the fanned-out stages (``stages.jobs.driver.drive``) and the typed job
result (``stages.jobs.result.JobResult``): every job's result reaches the stage's ``publish``
once, its rows are written sorted, its histories become the curves, the summary becomes the
metrics file and the parent run's metrics; a second run takes every job from the cache. In
process only (two jobs, ``inline_jobs`` 2: no Ray)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from stages.config.params import RuntimeParams
from stages.jobs import driver
from stages.jobs.cache import spec_key
from stages.jobs.driver import FannedOutStage, drive
from stages.jobs.inputs import InputStore
from stages.jobs.result import JobResult
from stages.tracking.lineage import StageLineage

COMPUTED: list[str] = []


def square_job(spec, inputs):
    """Its square as a metric, a tensor, and (job b only) a two-epoch history."""
    COMPUTED.append(spec["id"])
    history = ([{"epoch": 1, "train_loss": 1.0, "val_acc": 0.25, "lr": 0.1},
                {"epoch": 2, "train_loss": 0.5, "val_acc": 0.5, "lr": 0.01}] if spec["id"] == "sq/b" else [])
    return JobResult({"name": spec["id"][3:], "y": spec["x"] ** 2}, {"t": torch.full((2,), float(spec["x"]))},
                     history=history, nondeterministic=["scatter_add_"] if spec["x"] == 3 else [])


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """A stage 'sq' with two jobs, its MLflow store and job cache under ``tmp_path``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    lineage = StageLineage("sq", "abc123", "false", {"stages": "d41d8"}, {"sq": {"x": 1}}, "params.yaml", "md5")
    monkeypatch.setattr(driver, "stage_lineage", lambda name: lineage)
    rt = RuntimeParams(num_cpus=1, inline_jobs=2, cache_dir=str(tmp_path / "cache"), experiment="driver",
                       progress=False)
    published = []

    def publish(run, spec, result, cached):
        published.append((spec["id"], cached, result.metrics["y"], result.determinism_tags()["nondeterministic_ops"]))
        return {"name": result.metrics["name"], "y": result.metrics["y"], **run.lineage_columns()}

    def make() -> FannedOutStage:
        return FannedOutStage(
            "sq", square_job, [{"id": "sq/b", "x": 3}, {"id": "sq/a", "x": 2}], InputStore(), {"x": 1}, [],
            str(tmp_path / "out"), "elsewhere", publish,
            summarise=lambda results, rows: {"total": sum(r.metrics["y"] for r in results.values()),
                                             "order": [r["name"] for r in rows]},
            order=lambda row: row["name"], finish=lambda summary: {"total": summary["total"]})

    return make, rt, published, tmp_path


def test_drive_publishes_each_job_and_writes_the_stage_outputs(stage):
    make, rt, published, tmp_path = stage
    COMPUTED.clear()
    summary = drive(make(), rt)
    assert summary == {"total": 13, "order": ["a", "b"]}
    assert sorted(COMPUTED) == ["sq/a", "sq/b"]
    assert sorted(published) == [("sq/a", False, 4, "none"), ("sq/b", False, 9, "scatter_add_")]
    rows = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert rows["name"].tolist() == ["a", "b"] and rows["y"].tolist() == [4, 9]
    assert rows["git_commit"].tolist() == ["abc123"] * 2
    assert not (tmp_path / "out" / "results.json").exists()  # only where the stage asks for it
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0  # job b's history
    # a side run (out_dir is not the default): <out_dir>/metrics.json
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == summary

    import mlflow

    client = mlflow.tracking.MlflowClient()
    (parent,) = client.search_runs([client.get_experiment_by_name("driver").experiment_id], "tags.kind = 'stage'")
    assert parent.data.metrics["total"] == 13 and parent.data.tags["git.commit"] == "abc123"
    assert parent.info.status == "FINISHED"

    # a second run computes nothing: both jobs come from the cache, published again as cached
    published.clear()
    assert drive(make(), rt) == summary
    assert sorted(COMPUTED) == ["sq/a", "sq/b"]
    assert sorted(published) == [("sq/a", True, 4, "none"), ("sq/b", True, 9, "scatter_add_")]


def test_the_job_cache_holds_the_typed_result_without_private_keys(stage):
    """The cache entry keeps metrics, history, nondeterministic ops and the machine record apart:
    no metric key starts with an underscore, and each field comes back as it went in."""
    make, rt, _, tmp_path = stage
    drive(make(), rt)
    entry = json.loads((tmp_path / "cache" / "sq" / f"{spec_key({'id': 'sq/b', 'x': 3})}.json").read_text())
    record = entry["record"]
    assert sorted(record) == ["history", "machine", "metrics", "nondeterministic"]
    assert not [k for k in record["metrics"] if k.startswith("_")]
    assert record["metrics"]["y"] == 9 and record["history"][1]["val_acc"] == 0.5
    assert record["nondeterministic"] == ["scatter_add_"] and record["machine"]["torch_threads"] == 1
    tags = JobResult.from_record(record, {}).determinism_tags()
    assert tags["nondeterministic_ops"] == "scatter_add_" and tags["torch.threads"] == "1"
    assert JobResult({"y": 1}).determinism_tags() == {"torch.deterministic": "warn_only",
                                                      "nondeterministic_ops": "none"}  # no machine: no machine tags
