"""Training and evaluation loops shared by RECAST-FT, adapters and the plain baselines.

``fit`` trains the given parameters with the paper's recipe (AdamW, StepLR per epoch, grad-norm
clipping), selects the epoch with the best validation accuracy (never the test split) and
restores that state. BatchNorm running statistics are frozen by default so that no hidden
per-task state drifts in a shared backbone; with ``freeze_bn_stats=False`` they are updated in
training and the best epoch's statistics are restored with its parameters. A RecastModel with
``RecastConfig.bn_stats="frozen"`` keeps its BatchNorm layers in eval mode either way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recast.checkpoint import Checkpointer, pack_fit_state, unpack_fit_state
from recast.checks import check_finite_loss
from recast.validation import AtLeast0, AtLeast1, NonNegative, Positive, UnitInterval, validate_fields

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision the device cannot train in (fp16 on CPU: no grad scaler there, and no gain)."""

    def __init__(self, precision: str, device: str) -> None:
        self.precision, self.device = precision, device
        super().__init__(precision, device)

    def __str__(self) -> str:
        return (f"precision {self.precision!r} on device {self.device!r}: fp16 autocast needs a CUDA device; "
                f"use 'bf16' (works on CPU) or 'fp32'")


def check_precision(precision: str, device: str | torch.device) -> None:
    """Raise ValueError for an unknown precision, ``PrecisionError`` for fp16 off CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise PrecisionError(precision, str(device))


def autocast(device: str | torch.device, precision: Precision = "fp32") -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the precision's dtype on ``device``'s type; fp32: no autocast.

    Parameters keep their dtype (fp32): only the ops autocast lists (matmuls, convolutions) run in
    the lower precision, and their outputs are cast back where an op needs fp32 (losses, norms).
    """
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def make_grad_scaler(device: str | torch.device, precision: Precision) -> torch.amp.GradScaler:
    """A dynamic loss scaler for fp16 (its gradients underflow otherwise); disabled (a no-op
    pass-through) for fp32 and bf16."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


@dataclass(frozen=True)
class TuneConfig:
    """The training recipe of every loop: ``fit`` here and the continual baselines' loop
    (``recast.baselines``, whose ``TrainConfig`` is this class with other defaults).

    Defaults are the paper's per-task recipe: AdamW 2e-3, wd 1e-6, StepLR(33, 0.1), 100 epochs,
    clip 1.0.

    Attributes:
        epochs: passes over the training batches.
        lr: learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        step_size: StepLR step in epochs, or None for a constant learning rate.
        gamma: StepLR decay factor.
        grad_clip: max global gradient norm, or None for no clipping.
        optimizer: ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum (ignored by AdamW).
        freeze_bn_stats: keep BatchNorm running statistics frozen while training.
        seed: seed of a continual run (``run_sequential`` seeds torch's RNG with it inside a
            fork); ``fit`` does no seeding of its own.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda"``.
        progress: show a tqdm bar over epochs.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + grad scaler; CUDA
            only). The trained tensors stay fp32 either way.
    """

    epochs: AtLeast1 = 100
    lr: Positive = 2e-3
    weight_decay: NonNegative = 1e-6
    step_size: AtLeast1 | None = 33
    gamma: Positive = 0.1
    grad_clip: Positive | None = 1.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: UnitInterval = 0.9  # [0, 1)
    freeze_bn_stats: bool = True
    seed: AtLeast0 = 0
    device: str = "cpu"
    progress: bool = True
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        validate_fields(self, prefix=f"{type(self).__name__}.")  # every field by its annotation (pydantic)
        torch.device(self.device)  # raises RuntimeError naming a malformed device string
        check_precision(self.precision, self.device)


@dataclass
class FitResult:
    """Outcome of ``fit``: best validation accuracy/epoch, timing, and ``history``: one row per
    epoch (``epoch``, mean ``train_loss``, ``val_acc``, the ``lr`` it trained with)."""

    best_val_acc: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    seconds_per_step: float = 0.0
    resumed_epoch: int = 0


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


def module_device(model: object) -> torch.device:
    """Device of a module's first parameter (CPU for a parameter-free module or a non-module)."""
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module | Callable[..., torch.Tensor], loader: Batches,
             device: str | torch.device | None = None, task: str | None = None,
             precision: Precision = "fp32") -> float:
    """Top-1 accuracy of ``model(x)`` (``model(x, task)`` when ``task`` is given) over ``loader``.

    A module is evaluated in eval mode and its mode restored afterwards.

    Args:
        model: a module or any callable returning logits.
        loader: ``(images, labels)`` batches.
        device: where batches go; default: the device of the model's first parameter (CPU for
            a parameter-free module or a plain callable).
        task: passed as the second argument of a task-conditioned model (e.g. a continual
            baseline with one head per task).
        precision: forward under ``autocast(device, precision)``.
    """
    device = module_device(model) if device is None else device
    is_module = isinstance(model, nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                logits = model(x) if task is None else model(x, task)
            correct += int((logits.argmax(dim=1) == y).sum())
            total += y.numel()
    finally:
        if is_module:
            model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no examples" + (f" (task {task!r})" if task is not None else ""))
    return correct / total


@torch.no_grad()
def evaluate_mixed(model: nn.Module, loaders: Mapping[str, Batches],
                   device: str | torch.device | None = None, precision: Precision = "fp32") -> dict[str, float]:
    """Top-1 accuracy of every task of ``loaders`` in mixed-task batches: the k-th batches of
    all tasks (those whose loader has a k-th batch) concatenated into one batch and run in ONE
    ``model(x, tasks=[...])`` forward (``RecastModel``'s mixed-task forward), accuracy counted
    per task from its rows. Each row's logits are its task's own (to float rounding), so the
    accuracies are those of ``evaluate`` task by task; a batch holds one loader batch per task.

    A module is evaluated in eval mode and its mode restored afterwards.

    Args:
        model: a module taking ``tasks=`` (one task name per row); rows of narrower heads are
            padded with -inf, which argmax never picks.
        loaders: task name -> ``(images, labels)`` batches of that task.
        device: where batches go; default: the device of the model's first parameter.
        precision: forward under ``autocast(device, precision)``.
    """
    if not loaders:
        raise ValueError("evaluate_mixed: no tasks given")
    device = module_device(model) if device is None else device
    was_training = model.training
    model.eval()
    names = list(loaders)
    correct = dict.fromkeys(names, 0)
    total = dict.fromkeys(names, 0)
    iters = {t: iter(loaders[t]) for t in names}
    try:
        while iters:
            xs, ys, rows = [], [], []
            for t in list(iters):
                batch = next(iters[t], None)
                if batch is None:
                    del iters[t]
                    continue
                xs.append(batch[0].to(device))
                ys.append(batch[1].to(device))
                rows += [t] * len(batch[1])
            if not xs:
                break
            with autocast(device, precision):
                pred = model(torch.cat(xs), tasks=rows).argmax(dim=1)
            hit = pred == torch.cat(ys)
            start = 0
            for y in ys:
                t = rows[start]
                correct[t] += int(hit[start:start + len(y)].sum())
                total[t] += len(y)
                start += len(y)
    finally:
        model.train(was_training)
    empty = [t for t in names if total[t] == 0]
    if empty:
        raise ValueError(f"evaluate_mixed: the loaders of {empty} yielded no examples")
    return {t: correct[t] / total[t] for t in names}


def make_optimizer(params: list[nn.Parameter], cfg: TuneConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` as set by ``cfg``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TuneConfig) -> torch.optim.lr_scheduler.StepLR | None:
    """StepLR(step_size, gamma) stepped once per epoch, or None for a constant learning rate."""
    if cfg.step_size is None:
        return None
    return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    train: Batches,
    val: Batches,
    cfg: TuneConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    desc: str = "tune",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    checkpoint: Checkpointer | None = None,
) -> FitResult:
    """Train ``params`` of ``model`` on ``train``; keep the state with the best ``val`` accuracy.

    Only ``params`` are optimised (the caller sets requires_grad); the best state of exactly
    those tensors, and with ``cfg.freeze_bn_stats=False`` of the BatchNorm buffers, is
    restored at the end. ``on_epoch`` (if given) receives each epoch's history entry as soon
    as it is measured (e.g. to report it to a scheduler).

    With ``checkpoint``, training starts from its last checkpoint (``recast.checkpoint``: the
    epoch, trained tensors, optimizer/scheduler/scaler state, RNG, best epoch and history) and a
    new one is saved after every epoch; the result is bit-identical to a run never stopped.
    ``FitResult.resumed_epoch`` says where it started.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("fit: no trainable parameters given")
    model.to(cfg.device)
    bn_buffers = [] if cfg.freeze_bn_stats else [
        b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers(recurse=False)]
    restored = [*params, *bn_buffers]
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg)
    scaler = make_grad_scaler(cfg.device, cfg.precision)
    best_acc, best_epoch, best_state = -1.0, -1, None
    history, steps, step_time = [], 0, 0.0
    first = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        first, (best_acc, best_epoch, best_state), history, counters = unpack_fit_state(
            *saved, restored, opt, sched, scaler, cfg.device)
        steps, step_time = int(counters["steps"]), float(counters["step_time"])
    start = time.perf_counter()
    bar = tqdm(range(first, cfg.epochs), desc=desc, disable=not cfg.progress, leave=False)
    for epoch in bar:
        _set_epoch(train, epoch)
        train_mode(model, cfg.freeze_bn_stats)
        total_loss, batches = 0.0, 0
        for x, y in train:
            t0 = time.perf_counter()
            x, y = x.to(cfg.device), y.to(cfg.device)
            with autocast(cfg.device, cfg.precision):
                loss = loss_fn(model(x), y)
            value = float(loss.detach())
            check_finite_loss(value, desc, epoch, steps)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            step_time += time.perf_counter() - t0
            total_loss += value
            batches += 1
            steps += 1
        lr = float(opt.param_groups[0]["lr"])  # the rate this epoch trained with
        if sched is not None:
            sched.step()
        acc = evaluate(model, val, cfg.device, precision=cfg.precision)
        history.append({"epoch": epoch, "train_loss": total_loss / max(batches, 1), "val_acc": acc, "lr": lr})
        if on_epoch is not None:
            on_epoch(dict(history[-1]))
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best_state = [t.detach().clone() for t in restored]
        bar.set_postfix(loss=f"{total_loss / max(batches, 1):.3f}", val=f"{acc:.3f}", refresh=False)
        if checkpoint is not None:
            checkpoint.save(*pack_fit_state(epoch + 1, restored, opt, sched, scaler, (best_acc, best_epoch, best_state),
                                            history, {"steps": steps, "step_time": step_time}, cfg.device))
    with torch.no_grad():
        for t, b in zip(restored, best_state):
            t.copy_(b)
    model.eval()
    return FitResult(best_acc, best_epoch, history, time.perf_counter() - start, steps, step_time / max(steps, 1),
                     resumed_epoch=first)
