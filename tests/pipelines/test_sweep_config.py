"""Sweep configs: the shipped YAMLs validate and expand into the expected trials; bad keys and
bad RECAST variants fail early, naming the key or the variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import SWEEP_NAMES, GnSweep, load_config, runtime_params
from pipelines.specs import build_specs
from pipelines.sweep import preflight, sweep_key
from stages.config.common import ParamsError
from stages.jobs.inputs import InputStore

EXPECTED_TRIALS = {"gn": 6, "k": 4, "targets": 6, "budget": 11, "order": 4, "seeds": 9, "hpo": 6}  # hpo: per method


@pytest.mark.parametrize("sweep", SWEEP_NAMES)
def test_shipped_configs_expand_to_trials(stage_outputs, sweep: str) -> None:
    cfg = load_config(sweep)
    if sweep == "hpo":  # the stage root's own config (its backbone was pretrained with it)
        tiny = stage_outputs / "tiny.yaml"
        cfg = cfg.model_copy(update={"params": str(tiny if tiny.exists() else stage_outputs / "params.yaml")})
    specs = build_specs(sweep, cfg, "cpu", InputStore())
    assert len(specs) == EXPECTED_TRIALS[sweep]
    assert len({s["id"] for s in specs}) == len(specs)
    # inputs are named by content digest, never by a path on the driver
    assert all(s["inputs"]["backbone"].startswith("backbone-") for s in specs)
    assert not any(str(stage_outputs) in json.dumps(s) for s in specs)
    preflight(specs, cfg)  # every RECAST variant fits test_vit (6 blocks)


def test_gn_pairs_keep_template_parameters_constant(stage_outputs) -> None:
    specs = build_specs("gn", load_config("gn"), "cpu", InputStore())
    products = {(s["point"]["G"], s["point"]["n"]): s["point"]["G_times_n"] for s in specs}
    assert products == {(1, 2): 2, (2, 1): 2, (1, 6): 6, (2, 3): 6, (3, 2): 6, (6, 1): 6}
    assert all(s["method"]["recast"]["overrides"]["coef_sets"] == 2 for s in specs)


def test_order_sweep_runs_every_permutation(stage_outputs) -> None:
    specs = build_specs("order", load_config("order"), "cpu", InputStore())
    assert sorted((s["kind"], s["task"]) for s in specs) == [
        ("continual", "mnist_hi5_inv>mnist_lo5"), ("continual", "mnist_lo5>mnist_hi5_inv"),
        ("recast_sequence", "mnist_hi5_inv>mnist_lo5"), ("recast_sequence", "mnist_lo5>mnist_hi5_inv")]
    continual = next(s for s in specs if s["kind"] == "continual")
    assert continual["task_order"] == continual["order"]  # continual_job trains in this order
    assert {f"task/{t}" for t in continual["order"]} <= set(continual["inputs"])


def test_unknown_and_ill_typed_keys_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "gn.yaml"
    bad.write_text("pairs: [[1, 2]]\nepochs: 3\n")
    with pytest.raises(ParamsError, match=r"gn\.epochs: Extra inputs are not permitted"):
        load_config("gn", bad)
    bad.write_text("pairs: [[1, 2]]\nruntime: {num_cpu: 2}\n")
    with pytest.raises(ParamsError, match=r"num_cpu"):
        load_config("gn", bad)
    bad.write_text("pairs: [[1, 2]]\nrecast: {preset: recast_att, overrides: {groups: 2}}\n")
    with pytest.raises(ParamsError, match=r"recast.overrides sets \['groups'\]"):
        load_config("gn", bad)
    bad.write_text("lr: [0.1, 0.01]\n")
    with pytest.raises(ParamsError, match=r"lr: need 0 < low <= high, got \[0.1, 0.01\]"):
        load_config("hpo", bad)
    bad.write_text("tasks: [mnist_lo5]\ntrain: {epochs: 1}\n")  # the rule scores the config's own tasks and recipe
    with pytest.raises(ParamsError, match=r"tasks, train: taken from the pipeline config \(params.yaml\); remove"):
        load_config("hpo", bad)
    with pytest.raises(ValueError, match="unknown sweep 'lr'"):
        load_config("lr")


def test_preflight_names_a_variant_that_does_not_fit(stage_outputs) -> None:
    cfg = GnSweep(pairs=[(4, 1)])  # 4 groups do not divide 6 blocks
    with pytest.raises(ValueError, match=r"recast_att_mlp with .*'groups': 4.* does not fit arch 'vit'"):
        preflight(build_specs("gn", cfg, "cpu", InputStore()), cfg)


def test_runtime_overrides_and_sweep_identity(stage_outputs) -> None:
    cfg = load_config("k")
    rt = runtime_params(cfg.model_copy(update={"runtime": {"cache_dir": "/tmp/x"}}), num_cpus=1)
    assert (rt.cache_dir, rt.num_cpus) == ("/tmp/x", 1)
    specs = build_specs("k", cfg, "cpu", InputStore())
    assert sweep_key("k", specs) == sweep_key("k", list(reversed(specs)))
    assert sweep_key("k", specs) != sweep_key("k", specs[:-1])


@pytest.mark.parametrize("name", ["hpo", "hpo_resnet", "hpo_full", "hpo_full_resnet"])
def test_shipped_lr_rules_search_every_method_of_their_config(name: str) -> None:
    """Each shipped hpo config searches exactly the methods whose lr its pipeline config reads
    (``tune.lr_by_method.archs.<arch>``; RECAST's sequential run shares the per-task RECAST lr)."""
    import yaml

    from stages.config.common import resolve

    cfg = load_config("hpo", Path("pipelines/configs") / f"{name}.yaml")
    tp, methods = cfg.pipeline()
    searched = set(methods["per_task"]) | set(methods["continual"])
    assert searched, name
    table = yaml.safe_load(resolve(cfg.params).read_text())["tune"]["lr_by_method"]["archs"][cfg.arch]
    assert set(table) == searched, (name, sorted(set(table) ^ searched))
    assert set(methods["continual"]) <= set(tp.continual.methods[cfg.arch]) and "recast" not in methods["continual"]
