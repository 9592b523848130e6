"""A sweep through local Ray survives worker deaths, and a rerun recomputes and re-logs nothing.

Ray runs inside the test process (``init_ray`` starts it, the fixture shuts it down); MLflow is an
sqlite store in ``tmp_path``; the job cache is in ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.sweep import main

METHODS = {"head_only": {}, "recast_att": {"recast": {"preset": "recast_att", "overrides": {"groups": 3}}}}


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if ray.is_initialized():  # init_ray would reuse it, without this test's fault injection
        ray.shutdown()
    yield ray
    ray.shutdown()


def _children(uri: str, parent: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-tests")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent], runs


def test_fault_injected_sweep_completes_and_resume_recomputes_nothing(
        stage_outputs, write_config, local_ray, monkeypatch, tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    monkeypatch.setenv("RECAST_FAULT_ONCE_DIR", str(faults))
    config = write_config("budget", methods=METHODS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = main(["--sweep", "budget", "--config", str(config), "--num-cpus", "2"])
    # every trial's worker was killed once (a marker per trial) and Ray's retry finished it
    assert sorted(p.name for p in faults.iterdir()) == [
        "budget_vit_head_only_mnist_lo5_s42.killed", "budget_vit_recast_att_mnist_lo5_s42.killed"]
    assert (first["trials"], first["computed"], first["cached"]) == (2, 2, 0)
    assert first["mlflow_new_children"] == 2
    assert first["points"]["recast_att"]["coefficients"] == 6 * 2 * 2  # 6 qkv x K=2 x n=2
    assert first["points"]["head_only"]["task_params"] == 0
    table = pq.read_table(tmp_path / "sweeps/budget/results.parquet").to_pylist()
    assert sorted(r["name"] for r in table) == ["head_only", "recast_att"]
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["peak_rss_mb"] > 0 for r in table)
    assert (tmp_path / "sweeps/budget/budget.png").stat().st_size > 0

    local_ray.shutdown()  # the rerun must not need Ray at all
    second = main(["--sweep", "budget", "--config", str(config)])
    assert (second["computed"], second["cached"], second["mlflow_new_children"]) == (0, 2, 0)
    assert second["mlflow_parent_run"] == first["mlflow_parent_run"]
    assert not local_ray.is_initialized()
    assert second["points"] == first["points"]

    children, runs = _children(uri, first["mlflow_parent_run"])
    assert sorted(r.info.run_name for r in children) == [
        "budget/vit/head_only/mnist_lo5/s42", "budget/vit/recast_att/mnist_lo5/s42"]
    assert all(r.info.status == "FINISHED" and r.data.tags["cached"] == "False" for r in children)
    assert len(runs) == 3  # one parent, two children: nothing logged twice
