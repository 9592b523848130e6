"""Training and evaluation loops shared by RECAST-FT, adapters and the plain baselines.

``fit`` trains the given parameters with the paper's recipe (AdamW, StepLR per epoch, grad-norm
clipping), selects the epoch with the best validation accuracy (never the test split) and
restores that state. BatchNorm running statistics are frozen by default so that no hidden
per-task state drifts in a shared backbone; with ``freeze_bn_stats=False`` they are updated in
training and the best epoch's statistics are restored with its parameters. A RecastModel with
``RecastConfig.bn_stats="frozen"`` keeps its BatchNorm layers in eval mode either way.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TuneConfig:
    """Per-task tuning recipe (paper: AdamW 2e-3, wd 1e-6, StepLR(33, 0.1), 100 epochs, clip 1.0)."""

    epochs: int = 100
    lr: float = 2e-3
    weight_decay: float = 1e-6
    step_size: int = 33
    gamma: float = 0.1
    grad_clip: float | None = 1.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    freeze_bn_stats: bool = True
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not isinstance(self.step_size, int) or self.step_size < 1:
            raise ValueError(f"step_size must be an integer >= 1, got {self.step_size!r}")


@dataclass
class FitResult:
    """Outcome of ``fit``: best validation accuracy/epoch, per-epoch history, timing."""

    best_val_acc: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    seconds_per_step: float = 0.0


def _set_epoch(loader: object, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)


def train_mode(model: nn.Module, freeze_bn_stats: bool = True) -> None:
    """``model.train()``, keeping BatchNorm layers in eval mode (frozen running statistics)."""
    model.train()
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no examples")
    return correct / total


def make_optimizer(params: list[nn.Parameter], cfg: TuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    train: Batches,
    val: Batches,
    cfg: TuneConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    desc: str = "tune",
) -> FitResult:
    """Train ``params`` of ``model`` on ``train``; keep the state with the best ``val`` accuracy.

    Only ``params`` are optimised (the caller sets requires_grad); the best state of exactly
    those tensors, and with ``cfg.freeze_bn_stats=False`` of the BatchNorm buffers, is
    restored at the end.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("fit: no trainable parameters given")
    model.to(cfg.device)
    bn_buffers = [] if cfg.freeze_bn_stats else [
        b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers(recurse=False)]
    restored = [*params, *bn_buffers]
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    best_acc, best_epoch, best_state = -1.0, -1, None
    history, steps, step_time = [], 0, 0.0
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        _set_epoch(train, epoch)
        train_mode(model, cfg.freeze_bn_stats)
        total_loss, batches = 0.0, 0
        for x, y in train:
            t0 = time.perf_counter()
            x, y = x.to(cfg.device), y.to(cfg.device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step_time += time.perf_counter() - t0
            total_loss += float(loss.detach())
            batches += 1
            steps += 1
        sched.step()
        acc = evaluate(model, val, cfg.device)
        history.append({"epoch": epoch, "train_loss": total_loss / max(batches, 1), "val_acc": acc})
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best_state = [t.detach().clone() for t in restored]
        bar.set_postfix(loss=f"{total_loss / max(batches, 1):.3f}", val=f"{acc:.3f}", refresh=False)
    with torch.no_grad():
        for t, b in zip(restored, best_state):
            t.copy_(b)
    model.eval()
    return FitResult(best_acc, best_epoch, history, time.perf_counter() - start, steps, step_time / max(steps, 1))


def clone_model(model: nn.Module) -> nn.Module:
    """Deep copy (used to give each task its own copy of a shared backbone)."""
    return copy.deepcopy(model)
