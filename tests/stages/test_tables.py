"""Results tables: a sequential run of a method that also runs per task keeps its own name."""

from __future__ import annotations

import io

import pandas as pd

from stages.report.tables import accuracies, method_stats, results_frame, task_stats


def test_sequential_recast_does_not_mix_with_per_task_recast():
    rows = [{"arch": "vit", "method": "recast", "task": t, "seed": s, "test_acc": acc, "sequential": False}
            for t, s, acc in (("a", 0, 0.9), ("b", 0, 0.8), ("a", 1, 0.7), ("b", 1, 0.6))]
    rows.append({"arch": "vit", "method": "recast", "seed": 0, "sequential": True, "task_names": ["a", "b"],
                 "final_acc": [0.5, 0.4], "acc_matrix": [[0.5, None], [0.5, 0.4]]})
    rows.append({"arch": "vit", "method": "lwf", "seed": 0, "sequential": True, "task_names": ["a", "b"],
                 "final_acc": [0.3, 0.2], "acc_matrix": [[0.3, None], [0.1, 0.2]]})
    frame = results_frame(rows)
    frame = pd.read_parquet(_roundtrip(frame))  # as evaluate reads it: list columns are JSON text
    acc = accuracies(frame)
    assert sorted(acc["method"].unique()) == ["lwf", "recast", "recast_sequential"]
    stats = task_stats(acc).set_index(["method", "task"])
    assert stats.loc[("recast", "a"), "n_seeds"] == 2 and abs(stats.loc[("recast", "a"), "mean"] - 0.8) < 1e-12
    assert stats.loc[("recast_sequential", "b"), "n_seeds"] == 1
    assert abs(stats.loc[("recast_sequential", "b"), "mean"] - 0.4) < 1e-12
    methods = method_stats(acc).set_index("method")
    assert abs(methods.loc["recast", "mean"] - 0.75) < 1e-12 and methods.loc["recast", "n_seeds"] == 2
    assert abs(methods.loc["lwf", "mean"] - 0.25) < 1e-12


def _roundtrip(frame: pd.DataFrame) -> io.BytesIO:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    buf.seek(0)
    return buf
