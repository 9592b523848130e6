"""Equal budget (issue 22): the sequential baselines cannot get a budget of their own, every method
that runs has its lr from ``tune.lr_by_method`` (a missing one is named), and the job specs and
MLflow runs carry the lr and its source."""

from __future__ import annotations

import copy

import pytest
import yaml

from stages.config.common import REPO_ROOT, ParamsError
from stages.config.params import TuneParams
from stages.config.validate import validate_all


@pytest.fixture(scope="module")
def default_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("key, value", [("epochs", 3), ("lr", 1e-3), ("step_size", 10), ("gamma", 0.5),
                                        ("weight_decay", 0.0)])
def test_sequential_baselines_cannot_have_their_own_budget(default_params, key, value):
    p = copy.deepcopy(default_params)
    p["tune"]["continual"][key] = value
    with pytest.raises(ParamsError) as err:
        validate_all(p)
    assert f"tune.continual.{key}" in str(err.value) and "equal budget" in str(err.value), str(err.value)


QUICK = {("vit", "head_only"), ("vit", "recast"), ("vit", "ewc"), ("vit", "inflora"), ("vit", "adaptformer"),
         ("vit", "adaptformer_recast"), ("resnet", "head_only"), ("resnet", "recast")}
FULL = QUICK | {("vit", "lwf"), ("vit", "lora_tiny"), ("resnet", "clr"), ("resnet", "clr_recast")}


@pytest.mark.parametrize("config, expected, removed", [
    ("params.yaml", QUICK, (("vit", "ewc"), ("vit", "adaptformer_recast"), ("resnet", "recast"))),
    ("configs/offline-full.yaml", FULL, (("vit", "lwf"), ("vit", "adaptformer_recast"), ("resnet", "clr"))),
])
def test_every_method_that_runs_needs_an_lr_from_the_sweep(config, expected, removed):
    params = yaml.safe_load((REPO_ROOT / config).read_text())
    validate_all(params)  # the config covers every method it runs on every arch
    table = params["tune"]["lr_by_method"]["archs"]
    covered = {(a, m) for a, ms in table.items() for m in ms}
    # tune (per arch), combine and the sequential baselines of the config
    assert covered == expected
    for arch, method in removed:
        p = copy.deepcopy(params)
        del p["tune"]["lr_by_method"]["archs"][arch][method]
        with pytest.raises(ParamsError) as err:
            validate_all(p)
        assert f"tune.lr_by_method.archs.{arch}.{method}: missing" in str(err.value), str(err.value)


def test_a_method_lr_beside_the_table_is_rejected(default_params):
    p = copy.deepcopy(default_params)
    p["tune"]["methods"]["recast"]["lr"] = 0.05
    with pytest.raises(ParamsError) as err:
        validate_all(p)
    assert "tune.methods.recast.lr" in str(err.value), str(err.value)


def test_lr_for_reads_the_table_and_falls_back_to_the_recipe(default_params):
    tune = TuneParams.model_validate(default_params["tune"])
    lr, source = tune.lr_for("vit", "inflora")
    assert lr == default_params["tune"]["lr_by_method"]["archs"]["vit"]["inflora"]
    assert source == default_params["tune"]["lr_by_method"]["source"]["vit"] and source.startswith("hpo:")
    p = copy.deepcopy(default_params)
    del p["tune"]["lr_by_method"]["source"]["resnet"]
    with pytest.raises(ParamsError, match=r"tune\.lr_by_method.*source\.resnet: missing"):
        validate_all(p)
    plain = TuneParams.model_validate({k: v for k, v in default_params["tune"].items() if k != "lr_by_method"})
    assert plain.lr_for("vit", "inflora") == (plain.train.lr, "params:tune.train.lr")


def test_lr_and_its_source_reach_the_job_run(tmp_path, monkeypatch):
    """A published job's MLflow child run has the lr as a param and ``lr.source`` as a tag."""
    import mlflow

    from stages.config.params import RuntimeParams
    from stages.jobs.driver import StageRun
    from stages.jobs.inputs import InputStore
    from stages.jobs.result import JobResult
    from stages.jobs.results import LR_SOURCE_TAG, publish_job
    from stages.tracking.runs import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rt = RuntimeParams(num_cpus=1, cache_dir=str(tmp_path / "cache"), experiment="lr-source", progress=False)
    spec = {"id": "tune/vit/ewc/sequential/s0", "kind": "continual", "arch": "vit", "method_name": "ewc", "seed": 0,
            "lr": 0.0042, "lr_source": "hpo:abc123-asha", "inputs": {}}
    meta = {"arch": "vit", "method": "ewc", "seed": 0, "sequential": True, "avg_acc": 0.5, "bwt": -0.1, "lr": 0.0042}
    with Tracker("tune", rt.experiment, {}) as tracker:
        row = publish_job(StageRun("tune", rt, tracker, InputStore(), tmp_path / "out"), spec, JobResult(meta), False)
        parent = tracker.parent_id
    client = mlflow.tracking.MlflowClient()
    (child,) = client.search_runs([client.get_experiment_by_name("lr-source").experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert child.data.tags[LR_SOURCE_TAG] == "hpo:abc123-asha" and float(child.data.params["lr"]) == 0.0042
    assert child.data.metrics["bwt"] == -0.1 and child.data.metrics["avg_acc"] == 0.5
    assert row["run_id"] == child.info.run_id and row["bwt"] == -0.1 and row["payload_sha256"] == ""
