"""Sweep tables and plots from synthetic trial rows: typed Parquet, Markdown, summary, PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import markdown_rows
from pipelines.report import make_row, summarise, write_report


def _row(name: str, family: str, task: str, seed: int, acc: float, **extra) -> dict:
    spec = {"id": f"budget/vit/{name}/{task}/s{seed}", "sweep": "budget", "name": name, "family": family,
            "arch": "vit", "task": task, "seed": seed, "point": {}}
    return make_row(spec, {"test_acc": acc, "val_acc": acc, "seconds_per_step": 0.01, "peak_rss_mb": 900.0,
                           "method": "dropped", "_has_tensors": False, **extra})


def test_budget_report_files(tmp_path: Path) -> None:
    rows = [_row("head_only", "head_only", "a", 1, 0.5, task_params=0),
            _row("lora_r1", "lora", "a", 1, 0.6, task_params=256, adapter_params=256),
            _row("lora_r1", "lora", "a", 2, 0.7, task_params=256, adapter_params=256),
            _row("recast", "recast", "a", 1, 0.8, task_params=72, coefficients=72, templates=73728)]
    summary, paths = write_report("budget", rows, tmp_path, {"trials": 4, "wall_s": 1.5})
    assert [p.name for p in paths] == ["results.parquet", "results.md", "summary.json", "budget.png"]
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.num_rows == 4 and "method" not in table.column_names and "_has_tensors" not in table.column_names
    assert table.schema.field("task_params").type == pa.int64()
    assert table.schema.field("test_acc").type == pa.float64()
    assert "cached" not in table.column_names
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    lora = summary["points"]["lora_r1"]
    assert (lora["acc_mean"], lora["trials"], lora["task_params"]) == (pytest.approx(0.65), 2, 256)
    assert lora["acc_std"] == pytest.approx(0.0707107, abs=1e-6)
    text = (tmp_path / "results.md").read_text()
    assert ["lora_r1", "lora", "256"] in [row[:3] for row in markdown_rows(text)] and "wall_s: 1.5000" in text
    assert (tmp_path / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_is_averaged_over_seeds_then_tasks() -> None:
    rows = [_row("r", "recast", "easy", 1, 0.9), _row("r", "recast", "easy", 2, 0.7),
            _row("r", "recast", "hard", 1, 0.2), _row("r", "recast", "hard", 2, 0.2)]
    point = summarise("budget", rows)["points"]["r"]
    assert point["acc_by_task"] == pytest.approx({"easy": 0.8, "hard": 0.2})
    assert point["acc_mean"] == pytest.approx(0.5)
    assert point["acc_std"] == pytest.approx((0.1414214 + 0.0) / 2, abs=1e-6)  # over seeds, not tasks


def test_order_summary_measures_spread_over_orders() -> None:
    def order_row(name: str, order: str, finals: dict, forgetting: float) -> dict:
        spec = {"id": f"order/vit/{name}/{order}/s1", "sweep": "order", "name": name, "family": name,
                "arch": "vit", "task": order, "seed": 1, "point": {"order": order}}
        return make_row(spec, {"final_acc": finals, "avg_acc": sum(finals.values()) / 2,
                               "avg_forgetting": forgetting})

    rows = [order_row("recast", "a>b", {"a": 0.9, "b": 0.8}, 0.0),
            order_row("recast", "b>a", {"b": 0.8, "a": 0.9}, 0.0),
            order_row("lwf", "a>b", {"a": 0.5, "b": 0.8}, 0.4),
            order_row("lwf", "b>a", {"b": 0.6, "a": 0.9}, 0.2)]
    points = summarise("order", rows)["points"]
    assert points["recast"]["order_invariant"] and points["recast"]["max_final_acc_spread"] == 0.0
    assert points["lwf"]["final_acc_spread"] == pytest.approx({"a": 0.4, "b": 0.2})
    assert not points["lwf"]["order_invariant"] and points["lwf"]["avg_forgetting_mean"] == pytest.approx(0.3)


@pytest.mark.parametrize("sweep, point", [("gn", {"G": 2, "n": 1, "K": 2, "G_times_n": 2}),
                                          ("k", {"G": 3, "n": 2, "K": 4}),
                                          ("targets", {"targets": "attn.qkv"}), ("seeds", {}),
                                          ("hpo", {"lr": 0.01, "epochs": 2, "weight_decay": 1e-4})])
def test_every_sweep_plots(tmp_path: Path, sweep: str, point: dict) -> None:
    spec = {"id": f"{sweep}/x/t/s1", "sweep": sweep, "name": "p", "family": "recast", "arch": "vit", "task": "t",
            "seed": 1, "point": point}
    rows = [make_row(spec, {"test_acc": 0.7, "val_acc": 0.6, "final": True, "coefficients": 72})]
    _, paths = write_report(sweep, rows, tmp_path)
    assert paths[-1].name == f"{sweep}.png" and paths[-1].stat().st_size > 1000
