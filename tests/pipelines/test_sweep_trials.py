"""Trial functions, run in-process on the pipeline's tiny backbone: parameter accounting of each
sweep point, closed-form mimicry quality, RECAST's order invariance and per-trial peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import BudgetSweep, GnSweep, OrderSweep, TrialMethod
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


PEAK_PROBE = """
import json
from stages.jobs.memory import current_rss_mb, peak_memory, reset_peak_memory
reset_peak_memory()
before = peak_memory()["peak_rss_mb"]
block = bytearray(200 * 2**20)  # touch 200 MiB
block[:: 4096] = b"x" * len(block[:: 4096])
grown = peak_memory()["peak_rss_mb"]
del block
reset_peak_memory()
print(json.dumps({"before": before, "grown": grown, "after": peak_memory()["peak_rss_mb"], "rss": current_rss_mb()}))
"""


def test_peak_memory_is_per_trial() -> None:
    # in a fresh process: a long-lived test worker that freed big models earlier can serve the
    # block from pages it still holds, and its many threads update the kernel's RSS lazily
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["grown"] - m["before"] > 150
    assert m["after"] < m["grown"] - 150 and m["rss"] > 0


def test_hpo_trials_run_the_pipelines_jobs_on_every_task(stage_outputs, pipeline_params, monkeypatch) -> None:
    """The lr rule: a per-task method is the tune stage's own job on each task of the config at the
    trial's lr, scored by the mean validation accuracy over the tasks (one report per task); a
    sequential baseline runs the config's task stream at that lr and is scored on every task's
    validation split at the END of the stream (after the last task, so forgetting counts)."""
    import stages.jobs.sequential as seq
    from pipelines.config import HpoSweep
    from pipelines.sweep import trial_spec

    params = pipeline_params(methods={"head_only": {"kind": "head_only"}}, continual={"methods": {"vit": ["ewc"]}})
    specs = _specs("hpo", HpoSweep(params=str(params), arch="vit"))
    assert sorted(specs) == ["ewc", "head_only"]
    head, ewc = specs["head_only"][0], specs["ewc"][0]
    assert head["kind"] == "stage_tasks" and [j["task"] for j in head["jobs"]] == ["mnist_lo5", "mnist_hi5_inv"]
    assert ewc["kind"] == "continual" and ewc["task_order"] == ["mnist_lo5", "mnist_hi5_inv"] and ewc["score_val"]
    trial = {"task": "all", "seed": 42, "lr": 0.0123}
    head_t = trial_spec({"head_only|all|42": head}, {**trial, "name": "head_only"})
    ewc_t = trial_spec({"ewc|all|42": ewc}, {**trial, "name": "ewc"})
    assert [j["lr"] for j in head_t["jobs"]] == [0.0123, 0.0123] and ewc_t["lr"] == 0.0123
    assert head_t["id"] == "hpo/vit/head_only/s42/lr0.0123"

    reports: list[dict] = []
    meta = run_trial(head_t, specs["head_only"][1], reports.append)
    assert [r["tasks_done"] for r in reports] == [1, 2]
    by_task = meta["val_acc_by_task"]
    assert reports[0]["val_acc"] == by_task["mnist_lo5"]
    assert meta["val_acc"] == reports[1]["val_acc"] == pytest.approx((by_task["mnist_lo5"] + by_task["mnist_hi5_inv"]) / 2)

    seen, real = {}, seq.run_sequential

    def spy(method, tasks, cfg, progress=None, checkpoint=None, on_task=None):
        seen["lr"], seen["tasks"] = cfg.lr, [t.name for t in tasks]

        def record(i, row):
            seen.setdefault("rows", []).append(row)
            on_task(i, row)
        return real(method, tasks, cfg, progress, checkpoint, on_task=record)

    monkeypatch.setattr(seq, "run_sequential", spy)
    reports.clear()
    meta = run_trial(ewc_t, specs["ewc"][1], reports.append)
    assert seen["lr"] == 0.0123 and seen["tasks"] == ["mnist_lo5", "mnist_hi5_inv"]
    assert [len(r) for r in seen["rows"]] == [1, 2]  # after task i: every task seen so far
    assert [r["tasks_done"] for r in reports] == [1, 2]
    assert meta["val_acc_by_task"] == dict(zip(seen["tasks"], seen["rows"][-1]))  # measured after the LAST task
    assert meta["val_acc"] == pytest.approx(sum(seen["rows"][-1]) / 2) and meta["test_acc"] == meta["avg_acc"]
