"""The Ray job of the tune and combine stages: one method on one task and seed."""

from __future__ import annotations

from pathlib import Path

import torch

from recast.data import BatchLoader, read_manifest
from recast.recipes import MethodSpec, build_method
from recast.training import evaluate, fit
from stages.backbones import load_backbone
from stages.common import record_nondeterminism, seed_everything
from stages.params import MethodParams, TrainParams
from stages.sequential import continual_job


def tune_job(spec: dict) -> tuple[dict, dict]:
    """Train one method on one task; returns (metrics, payload tensors). The metrics carry the
    per-epoch ``_history`` and the ``_nondeterministic`` ops torch warned about."""
    seed_everything(spec["seed"])
    tr = TrainParams(**spec["train"])
    m = MethodParams(**spec["method"])
    task_dir = Path(spec["task_dir"])
    manifest = read_manifest(task_dir)
    bb = load_backbone(spec["arch"], Path(spec["pretrain_dir"]), Path(spec["mimic_dir"]) if m.needs_recast else None)
    built = build_method(MethodSpec(m.kind, m.adapter, m.recast, m.overrides, m.lr), bb, spec["task"],
                         manifest.num_classes)

    def loader(split: str, train: bool, limit: int | None) -> BatchLoader:
        return BatchLoader(task_dir, split, tr.batch_size, tr.image_size, train=train, seed=spec["seed"], limit=limit)

    cfg = tr.recipe(spec["device"], m.lr)
    built.prepare(loader("train", True, tr.limit_train), cfg.device)  # e.g. RoSA's gradient-chosen support
    with record_nondeterminism() as nondeterministic:
        res = fit(built.model, built.trainable, loader("train", True, tr.limit_train),
                  loader("val", False, tr.limit_eval), cfg, desc=spec["id"])
        test_acc = evaluate(built.model, loader("test", False, tr.limit_eval), cfg.device)
    payload = built.payload()
    meta = {
        "arch": spec["arch"], "method": spec["method_name"], "task": spec["task"], "seed": spec["seed"],
        "val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch,
        "trainable_params": int(sum(p.numel() for p in built.trainable)),
        "stored_params": int(sum(t.numel() for t in payload.values())),
        "bytes": int(sum(t.numel() * t.element_size() for t in payload.values())),
        "seconds_per_step": res.seconds_per_step, "train_seconds": res.seconds, "steps": res.steps,
        "num_classes": manifest.num_classes, "recast": m.needs_recast, "torch_threads": torch.get_num_threads(),
        "_history": res.history, "_nondeterministic": nondeterministic,
    }
    return meta, payload


def dispatch(spec: dict) -> tuple[dict, dict]:
    """Ray entry point: a per-task job or a sequential baseline."""
    return continual_job(spec) if spec.get("kind") == "continual" else tune_job(spec)
