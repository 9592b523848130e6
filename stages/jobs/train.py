"""The Ray job of the tune and combine stages: one method on one task and seed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from recast.checkpoint import Checkpointer
from recast.data import BatchLoader
from recast.recipes import MethodSpec, build_method
from recast.training import evaluate, fit
from stages.config.common import record_nondeterminism, seed_everything
from stages.config.params import MethodParams, TrainParams
from stages.jobs.checkpoints import job_checkpoints
from stages.jobs.inputs import JobInputs, TaskData
from stages.jobs.result import JobResult
from stages.jobs.sequential import continual_job

log = logging.getLogger(__name__)


def task_loaders(data: TaskData, tr: TrainParams, seed: int,
                 device: str = "cpu") -> tuple[BatchLoader, BatchLoader, BatchLoader]:
    """The (train, val, test) loaders of one task input under the recipe ``tr``."""

    def loader(split: str, train: bool, limit: int | None) -> BatchLoader:
        return data.loader(split, tr.batch_size, tr.image_size, train=train, seed=seed, limit=limit, device=device)

    return (loader("train", True, tr.limit_train), loader("val", False, tr.limit_eval),
            loader("test", False, tr.limit_eval))


def tune_job(spec: dict, inputs: JobInputs, on_epoch: Callable[[dict[str, float]], None] | None = None,
             checkpoint: Checkpointer | None = None) -> JobResult:
    """Train one method on one task (inputs ``task``, ``backbone``, ``banks`` for RECAST);
    its metrics, payload tensors, per-epoch history and the ops torch warned about as
    nondeterministic. ``on_epoch`` receives each epoch's ``recast.training.fit`` history entry
    (a sweep reports it). ``checkpoint``: where ``fit``
    checkpoints (a sweep trial: Tune's own); default: the job's ``stages.jobs.checkpoints``."""
    seed_everything(spec["seed"])
    tr = TrainParams(**spec["train"])
    m = MethodParams(**spec["method"])
    data = inputs.task("task")
    manifest = data.manifest
    bb = inputs.backbone("backbone", banks="banks" if m.needs_recast else None)
    built = build_method(MethodSpec(m.kind, m.adapter, m.recast, m.overrides, m.lr), bb, spec["task"],
                         manifest.num_classes)
    cfg = replace(tr.recipe(spec["device"], spec.get("lr", m.lr)),  # spec["lr"]: TuneParams.lr_for (stage specs)
                  precision=spec.get("precision", "fp32"))
    built.prepare(data.loader("train", tr.batch_size, tr.image_size, train=True, seed=spec["seed"],  # RoSA's
                              limit=tr.limit_train, device=spec["device"]), cfg.device)  # gradient support
    train, val, test = task_loaders(data, tr, spec["seed"], spec["device"])  # fresh: as if prepare never ran
    checkpoints = job_checkpoints(spec)
    with record_nondeterminism() as nondeterministic:
        res = fit(built.model, built.trainable, train, val, cfg, desc=spec["id"], on_epoch=on_epoch,
                  checkpoint=checkpoint if checkpoint is not None else checkpoints)
        test_acc = evaluate(built.model, test, cfg.device, precision=cfg.precision)
    if res.resumed_epoch:
        log.warning("%s: resumed at epoch %d from its checkpoint", spec["id"], res.resumed_epoch)
    payload = built.payload()
    if checkpoints is not None:
        checkpoints.clear()  # finished: its result goes to the job cache
    meta = {
        "arch": spec["arch"], "method": spec["method_name"], "task": spec["task"], "seed": spec["seed"],
        "val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch,
        "trainable_params": int(sum(p.numel() for p in built.trainable)),
        "head_params": built.head_params(),
        "task_params": int(sum(p.numel() for p in built.trainable)) - built.head_params(),
        "stored_params": int(sum(t.numel() for t in payload.values())),
        "bytes": int(sum(t.numel() * t.element_size() for t in payload.values())),
        "seconds_per_step": res.seconds_per_step, "train_seconds": res.seconds, "steps": res.steps,
        "num_classes": manifest.num_classes, "recast": m.needs_recast, "torch_threads": torch.get_num_threads(),
        "lr": cfg.lr, "epochs": cfg.epochs, "precision": cfg.precision, "resumed_epoch": res.resumed_epoch,
    }
    return JobResult(meta, payload, history=res.history, nondeterministic=nondeterministic)


def dispatch(spec: dict, inputs: JobInputs) -> JobResult:
    """Ray entry point: a per-task job or a sequential baseline."""
    return continual_job(spec, inputs) if spec.get("kind") == "continual" else tune_job(spec, inputs)
