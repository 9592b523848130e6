"""Every sweep runs on Ray Tune at tiny scale (one task, one epoch, 32 examples): its table, plot
and MLflow runs, and its per-epoch reports; trial inputs travel through the object store.

One local Ray (2 CPUs) serves the whole module; each test has its own MLflow store, Tune storage
and output directory under ``tmp_path``.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.sweep import main

RECAST = {"preset": "recast_att_mlp", "overrides": {"groups": 3}}
TWO_TASKS = ["mnist_lo5", "mnist_hi5_inv"]
# sweep -> (config fields, trials, Tune iterations of each finished trial: one per epoch, plus the final report)
TINY = {
    "gn": ({"pairs": [[6, 1]], "coef_sets": 1}, 1, 2),
    "k": ({"recast": {"preset": "recast_att", "overrides": {"groups": 3, "templates": 2}}, "coef_sets": [1]}, 1, 2),
    "targets": ({"presets": ["recast_att"], "overrides": {"groups": 3}}, 1, 2),
    "budget": ({"methods": {"lora": {"adapter": {"preset": "lora_tiny"}}}}, 1, 2),
    # recast: one epoch per task (2) + final; lwf: one report per task (its Tune checkpoint) + final
    "order": ({"tasks": TWO_TASKS, "orders": [TWO_TASKS], "continual": ["lwf"], "continual_epochs": 1}, 2, None),
    "seeds": ({"methods": {"recast": {"kind": "recast"}}, "seeds": [42]}, 1, 2),
    # the pipeline config's recast and ewc, each trial on both tasks: 2 lrs x 2 methods
    "hpo": ({"num_samples": 2, "lr": [0.005, 0.05], "grace_period": 1}, 4, None),
}
ORDER_ITERATIONS = {"recast": 3, "lwf": 3}


@pytest.fixture(scope="module")
def module_ray():
    ray = pytest.importorskip("ray")
    from stages.config.params import RuntimeParams
    from stages.jobs.fanout import init_ray

    old = os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    init_ray(RuntimeParams(num_cpus=2))
    yield ray
    ray.shutdown()
    if old is not None:
        os.environ["RAY_ADDRESS"] = old


# `make test-fast` keeps the hpo sweep (the one the default params use); the others run in `make test`
@pytest.mark.parametrize("sweep", [s if s == "hpo" else pytest.param(s, marks=pytest.mark.slow) for s in TINY])
def test_sweep_runs_on_tune(sweep: str, stage_outputs, write_config, pipeline_params, module_ray, monkeypatch,
                            tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    fields, trials, iterations = dict(TINY[sweep][0]), *TINY[sweep][1:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if sweep == "hpo":  # tasks and recipe come from the pipeline config
        params = pipeline_params(methods={"recast": {"kind": "recast"}}, continual={"methods": {"vit": ["ewc"]}})
        config = write_config(sweep, params=str(params), **fields)
    else:
        config = write_config(sweep, tasks=fields.pop("tasks", ["mnist_lo5"]), **fields)
    summary = main(["--sweep", sweep, "--config", str(config)])

    table = pq.read_table(tmp_path / f"sweeps/{sweep}/results.parquet").to_pylist()
    assert len(table) == summary["trials"] == trials
    finished = [r for r in table if r["final"]]
    assert finished, "no trial finished"
    acc = "avg_acc" if sweep == "order" else "test_acc"
    assert all(0.0 <= r[acc] <= 1.0 and r["peak_rss_mb"] > 0 for r in finished)
    for r in table:
        expected = ORDER_ITERATIONS[r["name"]] if sweep == "order" else iterations
        if sweep == "hpo":  # one report per task (2) + the final; a trial ASHA stopped has fewer
            expected = 3 if r["final"] else r["training_iteration"]
            assert expected in (1, 2, 3), r
        assert r["training_iteration"] == expected, r
    assert (tmp_path / f"sweeps/{sweep}/{sweep}.png").stat().st_size > 1000

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-tests")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    children = collections.Counter(r.info.run_name for r in kids)
    assert sorted(children) == sorted(r["id"] for r in table) and set(children.values()) == {1}
    if iterations == 2:  # one epoch: its report is the child's epoch_val_acc history
        for kid in kids:
            (epoch,) = client.get_metric_history(kid.info.run_id, "epoch_val_acc")
            assert epoch.step == 1 and 0.0 <= epoch.value <= 1.0
    if sweep == "hpo":
        assert sorted(summary["best"]) == ["ewc|all|s42", "recast|all|s42"]
        for name, best in ((k.split("|")[0], b) for k, b in summary["best"].items()):
            mine = [r for r in finished if r["name"] == name]
            assert best["val_acc"] == max(r["val_acc"] for r in mine) and 0.005 <= best["lr"] <= 0.05
            # the score is the mean over BOTH tasks' validation splits
            assert sorted(best["val_acc_by_task"]) == ["mnist_hi5_inv", "mnist_lo5"]
            assert best["val_acc"] == pytest.approx(sum(best["val_acc_by_task"].values()) / 2)
        assert set(summary["lr_by_method"]) == {"ewc", "recast"}


def test_inputs_reach_trials_through_the_object_store(stage_outputs, module_ray) -> None:
    """What ``run_sweep`` passes a trial (``InputStore.refs``) resolves, in a Ray task, to the
    bundles of its spec: the bytes of the driver's files, only the roles it names."""
    from pipelines.config import SeedsSweep
    from pipelines.specs import build_specs
    from stages.jobs.inputs import InputStore, JobInputs

    cfg = SeedsSweep(tasks=TWO_TASKS, seeds=[1], methods={"head": {"kind": "head_only"}, "recast": {"kind": "recast"}})
    store = InputStore()
    specs = {s["name"]: s for s in build_specs("seeds", cfg, "cpu", store) if s["task"] == "mnist_lo5"}
    refs = store.refs(list(specs.values()))
    assert len(refs) == 3  # one task (the other is not named by these specs), the backbone, the banks
    assert sorted(specs["recast"]["inputs"]) == ["backbone", "banks", "task"]
    assert sorted(specs["head"]["inputs"]) == ["backbone", "task"]  # head only: no banks

    @module_ray.remote
    def fetched(roles: dict, refs: dict) -> dict:
        inputs = JobInputs.fetch(roles, refs)
        return {key: {n: bytes(a.tobytes()) for n, a in inputs.payloads[key].items()} for key in set(roles.values())}

    got = module_ray.get(fetched.remote(specs["recast"]["inputs"], refs))
    for role, key in specs["recast"]["inputs"].items():
        driver = store.bundles[key].files
        assert sorted(got[key]) == sorted(driver), role
        assert all(got[key][n] == driver[n].read_bytes() for n in driver), role
    assert sorted(got[specs["recast"]["inputs"]["backbone"]]) == ["meta.json", "state.safetensors"]
