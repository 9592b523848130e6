"""Run a method over a task sequence; build methods by name."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from recast.baselines.common import TaskSpec, config_from_mapping, state_bytes
from recast.baselines.derpp import DERPP, DERPPConfig
from recast.baselines.er_ace import ERACE, ReplayConfig
from recast.baselines.ewc import EWC, EWCConfig
from recast.baselines.finetune import FinetuneFull, FinetuneHead
from recast.baselines.gdumb import GDumb, GDumbConfig
from recast.baselines.hat import HAT, HATConfig
from recast.baselines.inflora import InfLoRA, InfLoRAConfig
from recast.baselines.l2p import L2P, L2PConfig
from recast.baselines.lwf import LwF, LwFConfig
from recast.baselines.method import ContinualMethod, TaskCursor, unique_numel
from recast.baselines.recast_seq import RecastSequential
from recast.baselines.results import SequentialResult
from recast.checkpoint import Checkpointer, CheckpointMismatchError, pack_optimizer, pack_rng_states, unpack_rng_states
from recast.io import tensors_sha256
from recast.training import TuneConfig, autocast, evaluate

METHODS: dict[str, tuple[type[ContinualMethod], type | None]] = {
    "finetune_head": (FinetuneHead, None),
    "finetune_full": (FinetuneFull, None),
    "ewc": (EWC, EWCConfig),
    "lwf": (LwF, LwFConfig),
    "gdumb": (GDumb, GDumbConfig),
    "er_ace": (ERACE, ReplayConfig),
    "derpp": (DERPP, DERPPConfig),
    "hat": (HAT, HATConfig),
    "l2p": (L2P, L2PConfig),
    "inflora": (InfLoRA, InfLoRAConfig),
    "recast": (RecastSequential, None),  # takes a RecastModel (after mimicry), not a plain backbone
}


def make_method(name: str, backbone: nn.Module, cfg: Any = None) -> ContinualMethod:
    """Build a method by name.

    Args:
        name: one of ``METHODS``.
        backbone: timm model created with ``num_classes=0`` (the method takes ownership).
        cfg: the method's config object, a mapping of its fields, or None for the defaults
            (methods without settings accept only None or an empty mapping).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")
    cls, cfg_cls = METHODS[name]
    if cfg_cls is None:
        if cfg is not None and not (isinstance(cfg, Mapping) and not cfg):
            raise ValueError(f"method {name!r} takes no config, got {cfg!r}")
        return cls(backbone)
    if isinstance(cfg, Mapping):
        cfg = config_from_mapping(cfg_cls, cfg)
    elif cfg is not None and not isinstance(cfg, cfg_cls):
        raise TypeError(f"method {name!r} takes a {cfg_cls.__name__}, got {type(cfg).__name__}")
    return cls(backbone, cfg)  # type: ignore[call-arg]


def _check_tasks(tasks: list[TaskSpec]) -> None:
    if not tasks:
        raise ValueError("run_sequential needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")


SEQUENTIAL_FORMAT = "recast-sequential-checkpoint/2"


def run_sequential(method: ContinualMethod, tasks: list[TaskSpec], cfg: TuneConfig,
                   progress: bool | None = None, checkpoint: Checkpointer | None = None,
                   on_task: Callable[[int, list[float]], None] | None = None) -> SequentialResult:
    """Train ``method`` on ``tasks`` in order; after each task test every task seen so far.

    Randomness of the run (heads, buffers, task embeddings, dropout) comes from torch's RNG
    seeded with ``cfg.seed`` inside ``torch.random.fork_rng``, so the caller's RNG state is left
    untouched. Data order is the loaders' own. The same backbone weights, loaders and config give
    the same result (on CPU; CUDA kernels may add nondeterminism).

    Args:
        method: a fresh method (see ``make_method``).
        tasks: the sequence; names must be unique.
        cfg: optimisation settings and seed.
        progress: tqdm bars per task; None: ``cfg.progress``.
        checkpoint: where a checkpoint is saved after every task (the method's state, the global
            RNGs, the rows measured so far; ``meta["task"]``: tasks done, ``meta["phase"]``
            None) and after every epoch inside a task (the same, plus the optimizer, scheduler
            and grad-scaler state, ``meta["phase"]``/``"phase_epoch"``/``"task_epoch"``: where in
            the task; see ``recast.baselines.method.TaskCursor``), and loaded from at the start: a
            run stopped anywhere resumes at its last checkpoint, bit-identical to a run never
            stopped (``SequentialResult.resumed_task``/``resumed_epoch``). ``meta["step"]`` numbers
            the checkpoints of a run (1, 2, ...) and ``meta["point"]`` names each: ``task:<j>``
            (j tasks done) or ``task:<j>:epoch:<k>`` (k epochs of task j, 0-based, done).
        on_task: called after each task ``i`` with the validation accuracy of every task seen so
            far, measured then (``tasks[:i + 1]``, each ``val`` required): a sweep's score at the
            end of the stream counts forgetting. Not called for tasks restored from a checkpoint.
    """
    progress = cfg.progress if progress is None else progress
    _check_tasks(tasks)
    device = torch.device(cfg.device)
    size = len(tasks)
    names = [t.name for t in tasks]
    acc: list[list[float | None]] = []
    val_acc: list[float | None] = []
    trainable: list[int] = []
    train_bytes: list[int] = []
    wall: list[float] = []
    cuda = [device] if device.type == "cuda" else []
    first, first_epoch, step, in_task = 0, 0, 0, None
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        method.to(device)
        method.num_tasks = size
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            tensors, meta = saved
            if meta.get("format") != SEQUENTIAL_FORMAT or meta["task_names"] != names or meta["method"] != method.name:
                raise CheckpointMismatchError(f"checkpoint {meta.get('format')!r} of {meta.get('method')!r} over "
                                              f"{meta.get('task_names')}; this run: {SEQUENTIAL_FORMAT!r} of "
                                              f"{method.name!r} over {names}")
            first, step = int(meta["task"]), int(meta["step"])
            mid = meta["phase"] is not None
            method.restore_checkpoint({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
                                      meta["method_state"], tasks[:first], tasks[first] if mid else None)
            method.to(device)
            acc, val_acc, trainable = meta["acc_matrix"], meta["val_acc"], meta["trainable_params"]
            train_bytes, wall = meta["training_state_bytes"], meta["wall_time_s"]
            unpack_rng_states(tensors, meta["rng"], device)
            if mid:
                first_epoch, in_task = int(meta["task_epoch"]), (tensors, meta)
        for i, task in enumerate(tasks):
            if i < first:
                continue
            _sync(device)
            start = time.perf_counter() - (in_task[1]["task_seconds"] if in_task is not None else 0.0)
            if in_task is None:  # (resumed inside this task: its structure and state are restored already)
                method.before_task(task)
                method.to(device)
            trainable.append(unique_numel(method.trainable_parameters()))

            def save_epoch(cursor: TaskCursor, phase: int, opt: torch.optim.Optimizer, sched: Any,
                           scaler: torch.amp.GradScaler, i: int = i, start: float = start) -> None:
                nonlocal step
                step += 1
                opt_tensors, opt_meta = pack_optimizer(opt)
                _save(checkpoint, method, device, step, f"task:{i}:epoch:{cursor.task_epoch}", opt_tensors, {
                    "task": i, "phase": phase, "phase_epoch": cursor.phase_epoch, "task_epoch": cursor.task_epoch,
                    "optimizer": opt_meta, "scheduler": sched.state_dict() if sched is not None else None,
                    "scaler": scaler.state_dict(), "task_seconds": time.perf_counter() - start,
                    "task_names": names, "acc_matrix": acc, "val_acc": val_acc, "trainable_params": trainable[:i],
                    "training_state_bytes": train_bytes, "wall_time_s": wall})

            cursor = TaskCursor(save_epoch, in_task) if checkpoint is not None else None
            method.task_cursor = cursor
            try:
                method.fit_task(task, cfg, progress)
            finally:
                method.task_cursor = None
            if cursor is not None and cursor.resuming:  # its training never reached the checkpoint's phase
                raise CheckpointMismatchError(f"checkpoint in phase {in_task[1]['phase']} of task {task.name!r}; "
                                              f"this run's training of it has {cursor.phase + 1} phase(s)")
            in_task = None
            method.after_task(task, task.train)
            _sync(device)
            wall.append(time.perf_counter() - start)
            with autocast(device, cfg.precision):  # every method's own evaluation under the run's precision
                val_acc.append(evaluate(method, task.val, device, task=task.name) if task.val is not None else None)
                row: list[float | None] = list(method.evaluate_tasks(tasks[:i + 1], device))
            acc.append(row + [None] * (size - i - 1))
            train_bytes.append(state_bytes(method.training_state()))
            if on_task is not None:
                with autocast(device, cfg.precision):
                    seen = [replace(t, test=t.val) for t in tasks[:i + 1]]
                    on_task(i, list(method.evaluate_tasks(seen, device)))
            if checkpoint is not None:
                step += 1
                _save(checkpoint, method, device, step, f"task:{i + 1}", {}, {
                    "task": i + 1, "phase": None, "task_names": names, "acc_matrix": acc, "val_acc": val_acc,
                    "trainable_params": trainable, "training_state_bytes": train_bytes, "wall_time_s": wall})
    return SequentialResult(
        method=method.name, task_names=names, acc_matrix=acc, val_acc=val_acc,
        trainable_params=trainable, shared_bytes=state_bytes(method.shared_state()),
        task_bytes=[state_bytes(method.task_state(t.name)) for t in tasks],
        training_state_bytes=train_bytes, wall_time_s=wall, resumed_task=first, resumed_epoch=first_epoch,
        state_sha256=tensors_sha256(method.checkpoint_state()[0]))


def _save(checkpoint: Checkpointer, method: ContinualMethod, device: torch.device, step: int, point: str,
          tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """One checkpoint of ``run_sequential``: the method's state, the global RNGs, ``tensors``
    (the optimizer's, inside a task) and ``meta``."""
    state, method_meta = method.checkpoint_state()
    rng_tensors, rng_meta = pack_rng_states(device)
    checkpoint.save({**{f"method.{k}": v for k, v in state.items()}, **rng_tensors, **tensors}, {
        "format": SEQUENTIAL_FORMAT, "step": step, "point": point, "method": method.name,
        "method_state": method_meta, "rng": rng_meta, **meta})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
