"""Figures: the parent run's picture of its jobs' learning curves (train loss, validation accuracy
and learning rate per epoch, one line per job), and the report's accuracy against parameters."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# isort: split
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import pandas as pd  # noqa: E402

PANELS = (("train_loss", "train loss"), ("val_acc", "validation accuracy"), ("lr", "learning rate"))


def plot_curves(histories: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """One column per metric in ``PANELS``, one line per job id; writes a PNG to ``path``."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.0 * len(PANELS), 4.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], PANELS):
        for job, rows in sorted(histories.items()):
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker=".", linewidth=1, label=job)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.set_yscale("log")
    if 0 < len(histories) <= 12:
        axes[0][-1].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=100)


def save_figure(fig: plt.Figure, path: Path, dpi: int) -> Path:
    """Lay out, write atomically (a reader never sees half a PNG) and close ``fig``."""
    try:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path


def plot_params_vs_acc(summary: dict[str, dict], path: Path, methods: pd.DataFrame | None = None) -> Path:
    """Per arch, each method's average test accuracy (mean over seeds, error bar: std over seeds
    when there are several) against its trainable parameters per task. The x axis is logarithmic
    with labelled decades when the methods span one; otherwise linear (log ticks inside one decade
    overlap into an unreadable strip)."""
    archs = sorted({k.split("/")[0] for k in summary})
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.6), squeeze=False)
    stats = {} if methods is None else {(r["arch"], r["method"]): r for _, r in methods.iterrows()}
    for ax, arch in zip(axes[0], archs):
        xs = []
        for key, v in sorted(summary.items()):
            a, method = key.split("/", 1)
            if a != arch or "avg_test_acc" not in v:
                continue
            x = v.get("trainable_params") or v.get("trainable_params_per_task") or 1
            x = statistics.mean(x) if isinstance(x, list) else x
            row = stats.get((arch, method))
            mean = 100 * float(row["mean"]) if row is not None else 100 * v["avg_test_acc"]
            std = 100 * float(row["std"]) if row is not None and not pd.isna(row["std"]) else None
            ax.errorbar([x], [mean], yerr=None if std is None else [std], fmt="o", ms=5, capsize=3)
            ax.annotate(method, (x, mean), fontsize=8, xytext=(4, 3), textcoords="offset points")
            xs.append(x)
        if xs and max(xs) / max(min(xs), 1) >= 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("trainable parameters per task (log scale)")
        else:
            ax.xaxis.set_major_locator(ticker.MaxNLocator(5, integer=True))
            ax.set_xlabel("trainable parameters per task")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_count_label))
        ax.set_ylabel("average test accuracy (%)" + (", mean ± std over seeds" if stats else ""))
        ax.set_title(arch)
        ax.margins(x=0.12)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _count_label(value: float, _pos: int) -> str:
    """A parameter count as a short label: 650, 12k, 1.5M."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.0f}"
