"""Figures: the parent run's picture of its jobs' learning curves (train loss, validation accuracy
and learning rate per epoch, one line per job), and the report's accuracy against parameters."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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


def plot_params_vs_acc(summary: dict[str, dict], path: Path) -> Path:
    """Per arch, each method's average test accuracy against its trainable parameters per task (log x)."""
    archs = sorted({k.split("/")[0] for k in summary})
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for key, v in sorted(summary.items()):
            a, method = key.split("/", 1)
            if a != arch or "avg_test_acc" not in v:
                continue
            x = v.get("trainable_params") or v.get("trainable_params_per_task") or 1
            x = statistics.mean(x) if isinstance(x, list) else x
            ax.scatter([x], [100 * v["avg_test_acc"]], s=40)
            ax.annotate(method, (x, 100 * v["avg_test_acc"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters per task (log)")
        ax.set_ylabel("average test accuracy (%)")
        ax.set_title(arch)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=110)
