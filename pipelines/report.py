"""Tables and plots of a sweep: ``results.parquet`` (every trial), ``results.md`` (trials and a
summary per sweep point), ``summary.json`` and a PNG per sweep under ``outputs/sweeps/<sweep>/``.

Plots: accuracy vs parameters per task on a log axis (``budget``, paper Fig. 3), accuracy vs G at
constant G*n and vs K (``gn``/``k``, paper Fig. 7), bars for targets, orders and seeds, and
validation accuracy vs learning rate for ``hpo`` (trials stopped early by ASHA hollow).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages.config.common import write_json_atomic
from stages.report.markdown import table

_ROW_KEYS = ("id", "sweep", "name", "family", "arch", "task", "seed")
COLUMNS: dict[str, tuple[str, ...]] = {
    "gn": ("G_times_n", "G", "n", "K", "task", "seed", "test_acc", "val_acc", "coefficients", "effective_coefficients",
           "templates", "template_ratio", "min_weight_cosine", "seconds_per_step", "peak_rss_mb"),
    "k": ("K", "G", "n", "task", "seed", "test_acc", "val_acc", "coefficients", "effective_coefficients", "templates",
          "seconds_per_step", "peak_rss_mb"),
    "targets": ("name", "targets", "task", "seed", "test_acc", "val_acc", "coefficients", "templates", "template_ratio",
                "min_weight_cosine", "seconds_per_step", "peak_rss_mb"),
    "budget": ("name", "family", "task", "seed", "task_params", "coefficients", "adapter_params", "head_params",
               "test_acc", "val_acc", "seconds_per_step", "peak_rss_mb"),
    "order": ("name", "order", "seed", "avg_acc", "avg_forgetting", "final_acc", "seconds_per_step", "peak_rss_mb"),
    "seeds": ("name", "family", "task", "seed", "test_acc", "val_acc", "trainable_params", "stored_params",
              "seconds_per_step", "peak_rss_mb"),
    "hpo": ("name", "seed", "lr", "training_iteration", "final", "val_acc", "test_acc", "task_params",
            "trial_seconds"),
}
_POINT_COLUMNS = ("family", "G_times_n", "G", "n", "K", "task_params", "trainable_params", "coefficients", "templates",
                  "acc_mean",
                  "acc_std", "acc_by_task", "trials", "max_final_acc_spread", "order_invariant", "avg_forgetting_mean",
                  "seconds_per_step", "peak_rss_mb")
# Per-point columns carried into the summary (constant over tasks and seeds of one point).
_POINT_KEYS = ("family", "G_times_n", "G", "n", "K", "targets", "task_params", "coefficients", "effective_coefficients",
               "adapter_params", "templates", "template_ratio", "trainable_params", "stored_params")


def make_row(spec: dict, meta: dict[str, Any]) -> dict[str, Any]:
    """One table row: the spec's identity and sweep point, then the trial's metrics."""
    row: dict[str, Any] = {k: spec[k] for k in _ROW_KEYS}
    row.update(spec.get("point", {}))
    for k, v in meta.items():
        if not k.startswith("_") and k not in row and k not in ("method", "sequential"):
            row[k] = v
    return row


def _metric(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(sweep: str, rows: list[dict]) -> dict[str, Any]:
    """Per sweep point (trial name): accuracy averaged over seeds per task, then over tasks
    (``acc_std``: the std over seeds, averaged over tasks), and the point's parameter counts;
    for ``order`` also the spread of each task's final accuracy over the orders."""
    acc_key = "avg_acc" if sweep == "order" else "test_acc"
    by_name: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_name[r["name"]].append(r)
    points = {}
    for name, rs in by_name.items():
        by_task: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            by_task[r["task"]].append(r)
        per_task = {task: _mean_std(_metric(trs, acc_key)) for task, trs in sorted(by_task.items())}
        point = {"acc_mean": statistics.fmean(m for m, _ in per_task.values()),
                 "acc_std": statistics.fmean(s for _, s in per_task.values()), "trials": len(rs),
                 "val_acc_mean": _mean_std(_metric(rs, "val_acc"))[0],
                 "seconds_per_step": _mean_std(_metric(rs, "seconds_per_step"))[0],
                 "peak_rss_mb": max(_metric(rs, "peak_rss_mb"), default=math.nan)}
        if len(per_task) > 1 and sweep != "order":
            point["acc_by_task"] = {task: m for task, (m, _) in per_task.items()}
        point.update({k: rs[0][k] for k in _POINT_KEYS if rs[0].get(k) is not None})
        if sweep == "order":
            point.update(_order_spread(rs))
        points[name] = point
    return {"sweep": sweep, "accuracy": acc_key, "points": points}


def _order_spread(rows: list[dict]) -> dict[str, Any]:
    """Max - min over orders of each task's final accuracy (per seed, then the worst seed)."""
    spread: dict[str, float] = {}
    for seed in {r["seed"] for r in rows}:
        finals = [r["final_acc"] for r in rows if r["seed"] == seed]
        for task in finals[0]:
            values = [f[task] for f in finals]
            spread[task] = max(spread.get(task, 0.0), max(values) - min(values))
    worst = max(spread.values(), default=0.0)
    forgetting = _metric(rows, "avg_forgetting")
    return {"final_acc_spread": spread, "max_final_acc_spread": worst, "order_invariant": worst == 0.0,
            "avg_forgetting_mean": statistics.fmean(forgetting) if forgetting else math.nan}


# ----------------------------------------------------------------------------- files
def _column(values: list[Any]) -> pa.Array:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, pa.bool_())
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, pa.int64())
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                     for v in values], pa.string())


def to_arrow(rows: list[dict]) -> pa.Table:
    """Rows as an Arrow table: numbers typed, lists/dicts as JSON strings."""
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    return pa.table({k: _column([r.get(k) for r in rows]) for k in names})


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """``rows`` as a Markdown pipe table of ``columns`` (cells formatted by ``_fmt``; a pandas
    DataFrame written by ``stages.report.markdown.table``, as the stage report's tables)."""
    frame = pd.DataFrame([[_fmt(r.get(c)) for c in columns] for r in rows], columns=columns, dtype=object)
    return table(frame)


SWEEP_NOTES = {
    "k": ("What K can and cannot change: eq. 2 uses only the mean of the K coefficient sets, so K adds no "
          "expressiveness (effective coefficients stay L*M*n). Closed-form mimicry writes K identical sets, which "
          "stay identical; from the paper's random-init gradient mimicry, K changes the initial mean, the mimicry "
          "noise on the mean and what gradient clipping sees, and under Adam the mean then moves as with K=1 up to "
          "Adam's epsilon."),
}


def write_report(sweep: str, rows: list[dict], out_dir: Path,
                 extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Write the sweep's table, summary and plot; returns the summary and the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["id"])
    summary = {**summarise(sweep, rows), **(extra or {})}
    table = out_dir / "results.parquet"
    tmp = table.with_name(table.name + ".tmp")
    pq.write_table(to_arrow(rows), tmp)
    tmp.replace(table)
    write_json_atomic(out_dir / "summary.json", summary)
    order_cols = {"order": "task"}  # the order sweep's ``task`` column holds the order label
    columns = [c for c in COLUMNS[sweep] if any(order_cols.get(c, c) in r for r in rows)]
    shown = [{**r, "order": r["task"]} if sweep == "order" else r for r in rows]
    point_rows = [{"point": name, **p} for name, p in summary["points"].items()]
    point_cols = ["point"] + [c for c in _POINT_COLUMNS if any(c in p for p in point_rows)]
    header = [f"# Sweep `{sweep}`", ""] + ([SWEEP_NOTES[sweep], ""] if sweep in SWEEP_NOTES else [])
    if extra:
        header += [", ".join(f"{k}: {_fmt(v)}" for k, v in extra.items()), ""]
    text = "\n".join(header + [f"## Per point ({summary['accuracy']}: mean over seeds and tasks; std over seeds)", "",
                               markdown_table(point_rows, point_cols), "", "## Trials", "",
                               markdown_table(shown, columns), ""])
    (out_dir / "results.md").write_text(text)
    paths = [table, out_dir / "results.md", out_dir / "summary.json"]
    plot = plot_sweep(sweep, rows, summary, out_dir / f"{sweep}.png")
    return summary, paths + ([plot] if plot else [])


# ----------------------------------------------------------------------------- plots
def plot_sweep(sweep: str, rows: list[dict], summary: dict[str, Any], path: Path) -> Path | None:
    """The sweep's figure as a PNG; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = summary["points"]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        _PLOTS[sweep](ax, rows, points)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _plot_budget(ax, rows, points) -> None:
    families: dict[str, list[tuple[float, float, float, str]]] = defaultdict(list)
    for name, p in points.items():
        families[p.get("family", name)].append((p.get("task_params", 0), p["acc_mean"], p["acc_std"], name))
    for family, pts in sorted(families.items()):
        if family == "head_only":
            for _, acc, _, name in pts:
                ax.axhline(acc, ls="--", color="grey", label=f"head only ({name})")
            continue
        pts = sorted(p for p in pts if p[0] > 0)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=family)
    ax.set_xscale("log")
    ax.set_xlabel("parameters per task (without the head, log)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs parameters per task (Fig. 3)")
    ax.legend(fontsize=8)


def _plot_gn(ax, rows, points) -> None:
    by_product: dict[int, list[tuple[int, int, float, float]]] = defaultdict(list)
    for p in points.values():
        by_product[p["G_times_n"]].append((p["G"], p["n"], p["acc_mean"], p["acc_std"]))
    for product, pts in sorted(by_product.items()):
        pts.sort()
        ax.errorbar([g for g, *_ in pts], [a for *_, a, _ in pts], yerr=[s for *_, s in pts], marker="o", capsize=3,
                    label=f"G*n = {product}")
        for g, n, acc, _ in pts:
            ax.annotate(f"n={n}", (g, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    groups = sorted({p["G"] for p in points.values()})
    ax.set_xticks(groups, [str(g) for g in groups])
    ax.set_xlabel("groups G (templates n = product / G)")
    ax.set_ylabel("test accuracy")
    ax.set_title("G x n at constant template parameters (Fig. 7)")
    ax.legend(fontsize=8)


def _plot_k(ax, rows, points) -> None:
    pts = sorted((p["K"], p["acc_mean"], p["acc_std"]) for p in points.values())
    ax.errorbar([k for k, *_ in pts], [a for _, a, _ in pts], yerr=[s for *_, s in pts], marker="o", capsize=3)
    ax.set_xticks([k for k, *_ in pts])
    ax.set_xlabel("coefficient sets K")
    ax.set_ylabel("test accuracy")
    ax.set_title("K at fixed G and n (Fig. 7)")


def _bars(ax, labels: list[str], means: list[float], stds: list[float], notes: list[str]) -> None:
    xs = range(len(labels))
    ax.bar(xs, means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
    for x, m, note in zip(xs, means, notes, strict=True):
        ax.annotate(note, (x, m), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    finite = [m for m in means if m == m]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.15), min(1.0, max(finite) + 0.08))


def _plot_targets(ax, rows, points) -> None:
    names = list(points)
    _bars(ax, names, [points[n]["acc_mean"] for n in names], [points[n]["acc_std"] for n in names],
          [f"{points[n].get('coefficients', '')} coef" for n in names])
    ax.set_ylabel("test accuracy")
    ax.set_title("Attention vs MLP targets")


def _plot_order(ax, rows, points) -> None:
    labels, means, notes = [], [], []
    for r in sorted(rows, key=lambda r: (r["name"], r["task"], r["seed"])):
        labels.append(f"{r['name']}\n{r['task']}")
        means.append(r["avg_acc"])
        notes.append(f"fgt {r.get('avg_forgetting', 0):.3f}")
    _bars(ax, labels, means, [0.0] * len(means), notes)
    ax.set_ylabel("average final test accuracy")
    ax.set_title("Task order (forgetting annotated)")


def _plot_seeds(ax, rows, points) -> None:
    names = list(points)
    _bars(ax, names, [points[n]["acc_mean"] for n in names], [points[n]["acc_std"] for n in names],
          [f"n={points[n]['trials']}" for n in names])
    ax.set_ylabel("test accuracy (mean and std over seeds)")
    ax.set_title("Seeds")


def _plot_hpo(ax, rows, points) -> None:
    for name in sorted({r["name"] for r in rows}):
        for final, fill in ((True, None), (False, "none")):
            pts = [(r["lr"], r["val_acc"]) for r in rows if r["name"] == name and bool(r.get("final")) == final]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], facecolors=fill,
                           edgecolors=None if fill is None else "tab:grey",
                           label=f"{name}{'' if final else ' (stopped early)'}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("validation accuracy (last report)")
    ax.set_title("Hyperparameter search")
    ax.legend(fontsize=8)


_PLOTS = {"budget": _plot_budget, "gn": _plot_gn, "k": _plot_k, "targets": _plot_targets, "order": _plot_order,
          "seeds": _plot_seeds, "hpo": _plot_hpo}
