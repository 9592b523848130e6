"""Base class of the baselines and the shared training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from recast.baselines.common import MultiHeadNet, TaskSpec, prefixed
from recast.checkpoint import CheckpointMismatchError, unpack_optimizer
from recast.checks import check_finite_loss
from recast.training import (
    TuneConfig,
    autocast,
    evaluate,
    make_grad_scaler,
    make_optimizer,
    make_scheduler,
    module_device,
    train_mode,
)


def unique_parameters(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Parameters in order, each tensor once."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def unique_numel(params: Iterable[nn.Parameter]) -> int:
    """Total numel of the distinct tensors."""
    return sum(p.numel() for p in unique_parameters(params))


def move(batch: Any, device: torch.device) -> Any:
    """Move a tensor or a tuple/list of tensors to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(move(b, device) for b in batch)


EpochSave = Callable[["TaskCursor", int, torch.optim.Optimizer, Any, torch.amp.GradScaler], None]


class TaskCursor:
    """Where a checkpointed sequential run stands inside the task it is training, and its epoch
    checkpoints there (``run_sequential`` sets one on the method as ``task_cursor``).

    Every ``train_epochs`` call of a task is one *phase* (LwF: its warm-up, then its training;
    the others: one). After each epoch ``train_epochs`` calls ``save`` (the run's callback that
    writes the checkpoint). A cursor built with ``resume`` (the tensors and meta of a checkpoint
    taken inside this task, the method's state already restored from it) makes the phases
    before the checkpoint's a no-op and starts the checkpoint's phase at its epoch, with its
    optimizer, scheduler and grad-scaler state.

    Attributes:
        phase: index of the phase running (-1 before the first).
        phase_epoch: epochs finished in the running phase.
        task_epoch: epochs finished in this task, over its phases.
    """

    def __init__(self, save: EpochSave, resume: tuple[dict[str, Tensor], dict[str, Any]] | None = None) -> None:
        self._save, self.pending = save, resume
        self.phase, self.phase_epoch, self.task_epoch = -1, 0, 0

    @property
    def resuming(self) -> bool:
        """True until the phase the run resumes in has started (work before it must not be redone)."""
        return self.pending is not None

    def begin_phase(self, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler) -> int | None:
        """Start the next phase: the epoch it starts at (0, or the checkpoint's when the run
        resumes in it), or None when the run resumes in a later phase (skip this one)."""
        self.phase += 1
        self.phase_epoch = 0
        if self.pending is None:
            return 0
        tensors, meta = self.pending
        if meta["phase"] > self.phase:  # (a phase the run never reaches: run_sequential refuses it after the task)
            return None
        unpack_optimizer(optimizer, tensors, meta["optimizer"])
        if (scheduler is None) != (meta["scheduler"] is None):
            raise CheckpointMismatchError("checkpoint and run differ in having a learning-rate schedule")
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if meta["scaler"]:  # empty for a disabled (fp32/bf16) scaler
            scaler.load_state_dict(meta["scaler"])
        self.phase_epoch, self.task_epoch = int(meta["phase_epoch"]), int(meta["task_epoch"])
        self.pending = None
        return self.phase_epoch

    def end_epoch(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> None:
        """An epoch of the running phase finished: count it and save the checkpoint."""
        self.phase_epoch += 1
        self.task_epoch += 1
        self._save(self, self.phase, optimizer, scheduler, scaler)


class ContinualMethod(nn.Module):
    """A method trained task after task on one backbone with a head per task.

    The runner calls, per task: ``before_task(task)``, ``fit_task(task, cfg)`` (the loop below,
    which calls ``training_loss`` on every batch), ``after_task(task, task.train)``; then
    ``self(x, task_name)`` to evaluate. The method owns (and may freeze or copy) the backbone.

    Args:
        backbone: timm model created with ``num_classes=0``.
    """

    name: ClassVar[str] = "sequential"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.net = MultiHeadNet(backbone)
        self.tasks: list[str] = []
        self.batch_index, self.num_batches = 0, None  # set by the loop (HAT anneals on them)
        self.num_tasks: int | None = None  # length of the stream, set by run_sequential (InfLoRA's schedule)
        self.task_cursor: TaskCursor | None = None  # set by run_sequential while a task trains with checkpoints

    @property
    def resuming_task(self) -> bool:
        """True while a run resumed inside a task has not reached its checkpoint's phase yet:
        work a task does before its training (GDumb filling its memory) is in the restored state."""
        return self.task_cursor is not None and self.task_cursor.resuming

    @property
    def current_task(self) -> str:
        """Name of the task being (or last) trained."""
        if not self.tasks:
            raise ValueError("no task started yet; call before_task first")
        return self.tasks[-1]

    @property
    def device(self) -> torch.device:
        """Device of the method's parameters."""
        return module_device(self)

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.net(x, task)

    # ---- hooks -------------------------------------------------------------------------
    def before_task(self, task: TaskSpec) -> None:
        """Register the task and create its head."""
        if task.name in self.tasks:
            raise ValueError(f"task {task.name!r} already trained; tasks so far: {self.tasks}")
        self.net.add_head(task.name, task.num_classes)
        self.tasks.append(task.name)

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec) -> Tensor:
        """Loss of one batch of the current task (plain cross-entropy here)."""
        return F.cross_entropy(self(x, task.name), y)

    def after_task(self, task: TaskSpec, train: Iterable[Any]) -> None:
        """Work after a task was fitted (Fisher, masks, ...); nothing here."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters optimised for the current task: backbone + current head."""
        return unique_parameters([*self.net.backbone.parameters(),
                                  *self.net.head(self.current_task).parameters()])

    def before_step(self) -> None:
        """Called after ``backward`` and before clipping/step (gradient surgery)."""

    def after_step(self) -> None:
        """Called after the optimiser step."""

    # ---- checkpoints (a sequential run resumed at a task boundary or an epoch inside a task) --
    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything the rest of the run depends on, between two tasks or between two epochs of
        a task: the module's ``state_dict`` (weights, heads, registered buffers: ``module.*``) and
        what a subclass keeps outside it (``extra_checkpoint_state``: ``extra.*`` tensors, JSON;
        mid-task state included: replay memories and their generators, ER-ACE's ``seen_max``,
        InfLoRA's branches). Copies: safetensors-ready."""
        tensors = {f"module.{k}": v.detach().cpu().clone() for k, v in self.state_dict().items()}
        extra, meta = self.extra_checkpoint_state()
        tensors.update({f"extra.{k}": v.detach().cpu().clone() for k, v in extra.items()})
        return tensors, {"tasks": list(self.tasks), "extra": meta}

    def restore_checkpoint(self, tensors: dict[str, Tensor], meta: dict[str, Any], done: list[TaskSpec],
                           current: TaskSpec | None = None) -> None:
        """Load ``checkpoint_state`` into a freshly built method: rebuild the per-task structure
        of the ``done`` tasks (``rebuild_task``) and, for a checkpoint taken inside a task, of the
        ``current`` one (``rebuild_current_task``), then load the tensors and the extra state."""
        for task in done:
            self.rebuild_task(task)
        if current is not None:
            self.rebuild_current_task(current, {k[len("module."):]: v for k, v in tensors.items()
                                                if k.startswith("module.")}, meta["extra"])
        if list(self.tasks) != list(meta["tasks"]):
            raise ValueError(f"checkpoint of tasks {meta['tasks']}; this run rebuilt {self.tasks}")
        module = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        self.load_state_dict(module, strict=True)
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}  # CPU: generator states
        self.load_extra_checkpoint_state(extra, meta["extra"])

    def rebuild_task(self, task: TaskSpec) -> None:
        """The structure a finished task left (its head, ...) without its training: ``before_task``
        here; a method whose ``before_task`` computes from the task's data overrides it."""
        self.before_task(task)

    def rebuild_current_task(self, task: TaskSpec, module: dict[str, Tensor], extra: dict[str, Any]) -> None:
        """The structure of the task in progress at a mid-task checkpoint (its head, ...; the
        values come from the checkpoint's ``module`` state_dict and ``extra`` meta afterwards):
        ``before_task`` here (what it draws from the RNG is overwritten by the checkpoint)."""
        self.before_task(task)

    def extra_checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """State outside the ``state_dict`` (Fisher, memories, generators); none here."""
        return {}, {}

    def load_extra_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore ``extra_checkpoint_state`` (``tensors`` on the CPU: move what the method uses on its device)."""

    # ---- storage accounting ------------------------------------------------------------
    def shared_state(self) -> dict[str, Tensor]:
        """Tensors stored once for all tasks (here the shared backbone)."""
        return prefixed("backbone", self.net.backbone)

    def task_state(self, task: str) -> dict[str, Tensor]:
        """Tensors needed only by ``task`` (here its head)."""
        return prefixed(f"heads.{task}", self.net.head(task))

    def training_state(self) -> dict[str, Tensor]:
        """Tensors kept between tasks only to train later ones (none here)."""
        return {}

    # ---- evaluation --------------------------------------------------------------------
    def evaluate_tasks(self, tasks: list[TaskSpec], device: str | torch.device) -> list[float]:
        """Test accuracy of each of ``tasks`` (one row of the accuracy matrix), task by task."""
        return [evaluate(self, t.test, device, task=t.name) for t in tasks]

    # ---- training ----------------------------------------------------------------------
    def fit_task(self, task: TaskSpec, cfg: TuneConfig, progress: bool = False) -> None:
        """Train on ``task.train`` for ``cfg.epochs`` with ``training_loss``."""
        train_epochs(self, task.train, lambda b: self.training_loss(b[0], b[1], task),
                     self.trainable_parameters(), cfg, f"{self.name}:{task.name}", progress)


def train_epochs(method: ContinualMethod, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor],
                 params: list[nn.Parameter], cfg: TuneConfig, desc: str = "",
                 progress: bool = False) -> None:
    """The training loop: epochs x batches of loss, backward, hooks, clip, step (+ StepLR).

    With ``method.task_cursor`` set (``run_sequential`` with a checkpoint), it is one phase of
    the task: a checkpoint is saved after every epoch, and a resumed run starts at its epoch
    (or skips the phase when it resumed in a later one), see ``TaskCursor``.

    Args:
        method: module put in train mode; its ``before_step``/``after_step`` hooks are called
            and ``batch_index``/``num_batches`` set before each ``loss_fn`` call.
        batches: re-iterable of batches (tuples of tensors); ``set_epoch`` is called if present.
        loss_fn: batch (already on the method's device) -> scalar loss.
        params: optimised parameters.
        cfg: optimiser, epochs, clipping and schedule.
        desc: progress-bar label.
        progress: show a tqdm bar over epochs.
    """
    if not params:
        raise ValueError(f"{desc}: no trainable parameters")
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    scaler = make_grad_scaler(method.device, cfg.precision)
    cursor = getattr(method, "task_cursor", None)
    first = cursor.begin_phase(optimizer, scheduler, scaler) if cursor is not None else 0
    if first is None:  # a run resumed in a later phase of this task: this one is in the restored state
        method.eval()
        return
    if first and hasattr(batches, "set_epoch"):
        batches.set_epoch(first - 1)  # where a run never stopped leaves the loader (after_task iterates it)
    device = method.device
    method.num_batches = len(batches) if hasattr(batches, "__len__") else None
    train_mode(method, cfg.freeze_bn_stats)
    bar = tqdm(range(first, cfg.epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        loss = None
        for index, batch in enumerate(batches):
            method.batch_index = index
            with autocast(device, cfg.precision):
                loss = loss_fn(move(batch, device))
            check_finite_loss(float(loss.detach()), desc, epoch, index)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # hooks and clipping see the true gradients (no-op unless fp16)
            method.before_step()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            method.after_step()
        if loss is None:
            raise ValueError(f"{desc}: the training batches are empty")
        if scheduler is not None:
            scheduler.step()
        bar.set_postfix(loss=float(loss.detach()))
        if cursor is not None:
            cursor.end_epoch(optimizer, scheduler, scaler)
    method.eval()
