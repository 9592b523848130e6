"""Trial functions, run in-process on the pipeline's tiny backbone: parameter accounting of each
sweep point, closed-form mimicry quality, RECAST's order invariance and per-trial peak memory."""

from __future__ import annotations

import pytest

from pipelines.config import BudgetSweep, GnSweep, OrderSweep, TrialMethod
from stages.jobs.memory import current_rss_mb, peak_memory, reset_peak_memory
from pipelines.specs import build_specs
from pipelines.trials import run_trial
from stages.jobs.inputs import InputStore

ROLE = 64 * 192  # test_vit: qkv, fc1 and fc2 weights each hold 12,288 values


def _specs(sweep, cfg):
    """{name: (spec, its JobInputs read from the stage outputs)}."""
    store = InputStore()
    return {s["name"]: (s, store.local(s["inputs"])) for s in build_specs(sweep, cfg, "cpu", store)}


def test_gn_points_count_templates_and_coefficients(stage_outputs, tiny_train) -> None:
    specs = _specs("gn", GnSweep(pairs=[(1, 2), (2, 1), (6, 1)], train=tiny_train))
    metas = {name: run_trial(*spec) for name, spec in specs.items()}
    for name in ("G1-n2", "G2-n1"):  # G*n = 2: the same template parameters, a third of the weights
        assert metas[name]["templates"] == 2 * 3 * ROLE
        assert metas[name]["template_ratio"] == pytest.approx(1 / 3)
        assert metas[name]["min_weight_cosine"] < 0.9  # a rank-n fit of 6/G layers per group
    assert metas["G6-n1"]["templates"] == metas["G6-n1"]["replaced"] == 6 * 3 * ROLE
    assert metas["G6-n1"]["min_weight_cosine"] == pytest.approx(1.0, abs=1e-9)  # one template per layer: exact
    counts = {name: (m["coefficients"], m["effective_coefficients"]) for name, m in metas.items()}
    assert counts == {"G1-n2": (18 * 2 * 2, 18 * 2), "G2-n1": (18 * 2 * 1, 18), "G6-n1": (18 * 2 * 1, 18)}
    for meta in metas.values():
        assert meta["task_params"] == meta["coefficients"] and meta["head_params"] == 64 * 5 + 5
        assert 0.0 <= meta["test_acc"] <= 1.0 and meta["steps"] == 1 and meta["peak_rss_mb"] >= meta["rss_start_mb"]


def test_budget_rows_count_lora_and_recast_lora(stage_outputs, tiny_train) -> None:
    recast = {"preset": "recast_att_mlp", "overrides": {"groups": 3}}
    cfg = BudgetSweep(train=tiny_train, methods={
        "lora": TrialMethod(adapter={"preset": "lora_tiny"}),
        "recast_lora": TrialMethod(recast=recast, adapter={"preset": "lora_tiny"})})
    specs = _specs("budget", cfg)
    assert (specs["lora"][0]["family"], specs["recast_lora"][0]["family"]) == ("lora", "recast+lora")
    lora = run_trial(*specs["lora"])
    both = run_trial(*specs["recast_lora"])
    assert lora["adapter_params"] == lora["task_params"] == 64 + 192  # r=1 on blocks.0.attn.qkv
    assert both["coefficients"] == 72 and both["task_params"] == 72 + 256
    assert both["stored_params"] == both["trainable_params"] == 72 + 256 + 325


def test_recast_sequence_is_order_invariant(stage_outputs, tiny_train) -> None:
    cfg = OrderSweep(tasks=["mnist_lo5", "mnist_hi5_inv"], continual=[], train=tiny_train)
    store = InputStore()
    metas = [run_trial(s, store.local(s["inputs"])) for s in build_specs("order", cfg, "cpu", store)]
    assert [m["task_names"] for m in metas] == [["mnist_lo5", "mnist_hi5_inv"], ["mnist_hi5_inv", "mnist_lo5"]]
    assert metas[0]["final_acc"] == metas[1]["final_acc"]  # exactly: same start, same seed per task
    for m in metas:
        assert m["avg_forgetting"] == 0.0
        assert m["acc_matrix"][0][0] == m["acc_matrix"][1][0]  # the first task is untouched by the second
        assert m["coefficients"] == 72


def test_trials_report_every_epoch(stage_outputs, tiny_train) -> None:
    cfg = BudgetSweep(train={**tiny_train, "epochs": 2}, methods={"head_only": TrialMethod()})
    epochs: list[dict] = []
    meta = run_trial(*_specs("budget", cfg)["head_only"], on_epoch=epochs.append)
    assert [e["epoch"] for e in epochs] == [0, 1] and meta["steps"] == 2
    assert meta["val_acc"] == max(e["val_acc"] for e in epochs)  # the best epoch's state is kept


def test_peak_memory_is_per_trial() -> None:
    reset_peak_memory()
    before = peak_memory()["peak_rss_mb"]
    block = bytearray(200 * 2**20)  # touch 200 MiB
    block[:: 4096] = b"x" * len(block[:: 4096])
    grown = peak_memory()["peak_rss_mb"]
    del block
    reset_peak_memory()
    assert grown - before > 150
    assert peak_memory()["peak_rss_mb"] < grown - 150 and current_rss_mb() > 0


def test_hpo_continual_trial_is_the_baseline_on_the_first_task_alone(stage_outputs, tiny_train, monkeypatch) -> None:
    """A continual baseline in the hpo sweep (issue 22): one task, the recipe's (searched) lr and
    epochs, scalar val/test accuracies as a tune trial has; replay baselines get the raw view."""
    from pipelines.config import HpoSweep
    from pipelines.sweep import trial_spec
    from recast.data.augment import TaskAugment
    import stages.jobs.sequential as seq

    cfg = HpoSweep(train=tiny_train, methods={"ewc": TrialMethod(continual="ewc"),
                                              "er_ace": TrialMethod(continual="er_ace", options={"memory_size": 8})})
    specs = _specs("hpo", cfg)
    assert specs["ewc"][0]["kind"] == "continual" and specs["ewc"][0]["task_order"] == ["mnist_lo5"]
    spec = trial_spec({"ewc|mnist_lo5|42": specs["ewc"][0]},
                      {"name": "ewc", "task": "mnist_lo5", "seed": 42, "lr": 0.0123, "epochs": 1, "weight_decay": 1e-6})
    seen = {}
    real = seq.run_sequential

    def spy(method, tasks, cfg, progress=None, checkpoint=None):
        seen[method.name] = (cfg.lr, cfg.epochs, len(next(iter(tasks[0].train))), getattr(method, "replay_augment", 0))
        return real(method, tasks, cfg, progress, checkpoint)

    monkeypatch.setattr(seq, "run_sequential", spy)
    meta = run_trial(spec, specs["ewc"][1])
    assert seen["ewc"][:3] == (0.0123, 1, 2)  # the searched lr, the recipe's epochs, plain batches
    assert isinstance(meta["val_acc"], float) and meta["test_acc"] == meta["acc_matrix"][0][0]
    er = run_trial(specs["er_ace"][0], specs["er_ace"][1])
    lr, epochs, width, augment = seen["er_ace"]
    assert (lr, width) == (tiny_train["lr"], 3) and isinstance(augment, TaskAugment)  # (augmented, labels, raw)
    assert set(augment.tasks) == {0} and augment.tasks[0][2] is not None  # task 0's own policy
    assert 0.0 <= er["test_acc"] <= 1.0
