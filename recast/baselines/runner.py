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
from recast.baselines.method import ContinualMethod, unique_numel
from recast.baselines.recast_seq import RecastSequential
from recast.baselines.results import SequentialResult
from recast.checkpoint import Checkpointer, CheckpointMismatchError
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


SEQUENTIAL_FORMAT = "recast-sequential-checkpoint/1"


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
        checkpoint: where a checkpoint is saved after every task (the method's state, its RNG,
            the rows measured so far; ``meta["task"]``: tasks done) and loaded from at the start:
            a run stopped between tasks resumes there, bit-identical to a run never stopped
            (``SequentialResult.resumed_task``).
        on_task: called after each task ``i`` with the validation accuracy of every task seen so
            far, measured then (``tasks[:i + 1]``, each ``val`` required): a sweep's score at the
            end of the stream counts forgetting. Not called for tasks restored from a checkpoint.
    """
    progress = cfg.progress if progress is None else progress
    _check_tasks(tasks)
    device = torch.device(cfg.device)
    size = len(tasks)
    acc: list[list[float | None]] = []
    val_acc: list[float | None] = []
    trainable: list[int] = []
    train_bytes: list[int] = []
    wall: list[float] = []
    cuda = [device] if device.type == "cuda" else []
    first = 0
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        method.to(device)
        method.num_tasks = size
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            tensors, meta = saved
            names = [t.name for t in tasks]
            if meta.get("format") != SEQUENTIAL_FORMAT or meta["task_names"] != names or meta["method"] != method.name:
                raise CheckpointMismatchError(f"checkpoint of {meta.get('method')!r} over {meta.get('task_names')}; "
                                              f"this run: {method.name!r} over {names}")
            first = int(meta["task"])
            method.restore_checkpoint({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")},
                                      meta["method_state"], tasks[:first])
            method.to(device)
            acc, val_acc, trainable = meta["acc_matrix"], meta["val_acc"], meta["trainable_params"]
            train_bytes, wall = meta["training_state_bytes"], meta["wall_time_s"]
            torch.set_rng_state(tensors["rng.cpu"])
            if cuda and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        for i, task in enumerate(tasks):
            if i < first:
                continue
            _sync(device)
            start = time.perf_counter()
            method.before_task(task)
            method.to(device)
            trainable.append(unique_numel(method.trainable_parameters()))
            method.fit_task(task, cfg, progress)
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
                state, method_meta = method.checkpoint_state()
                tensors = {f"method.{k}": v for k, v in state.items()}
                tensors["rng.cpu"] = torch.get_rng_state()
                if cuda:
                    tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
                checkpoint.save(tensors, {
                    "format": SEQUENTIAL_FORMAT, "task": i + 1, "task_names": [t.name for t in tasks],
                    "method": method.name, "method_state": method_meta, "acc_matrix": acc, "val_acc": val_acc,
                    "trainable_params": trainable, "training_state_bytes": train_bytes, "wall_time_s": wall})
    return SequentialResult(
        method=method.name, task_names=[t.name for t in tasks], acc_matrix=acc, val_acc=val_acc,
        trainable_params=trainable, shared_bytes=state_bytes(method.shared_state()),
        task_bytes=[state_bytes(method.task_state(t.name)) for t in tasks],
        training_state_bytes=train_bytes, wall_time_s=wall, resumed_task=first)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
