"""Trial functions of the sweeps: ``run_trial(spec, inputs) -> (metrics, tensors)`` runs as one Ray task
(``inputs``: the trial's ``stages.inputs.JobInputs``).

Kinds (``spec["kind"]``):

- ``tune``: build the trial's RecastConfig, ``recast.apply`` + closed-form ``recast.mimic`` on the
  pretrained backbone, then tune one task with ``recast.recipes.build_method`` (RECAST,
  an adapter alone, both by eq. 6, or head only) and ``recast.training.fit``.
- ``stage_tune``: the tune stage's own job (``stages.jobs.tune_job``).
- ``recast_sequence``: one RecastModel trained task after task in the spec's order; every earlier
  task is re-evaluated after each new one (its accuracy matrix shows zero forgetting, and the
  final accuracies do not depend on the order).
- ``continual``: a sequential baseline over the order (``stages.sequential.continual_job``).

Every kind reports the peak memory of the trial itself (the worker's resident-set high-water
mark is reset first), so reused Ray workers do not inflate it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from stages.memory import current_rss_mb, peak_memory, reset_peak_memory

Result = tuple[dict[str, Any], dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------- helpers
def _loaders(data, train_params, seed: int):
    """train, val and test loaders of a ``stages.inputs.TaskData``."""
    tr = train_params

    def make(split: str, train: bool, limit: int | None):
        return data.loader(split, tr.batch_size, tr.image_size, train=train, seed=seed, limit=limit)

    return make("train", True, tr.limit_train), make("val", False, tr.limit_eval), make("test", False, tr.limit_eval)


def _tune_config(train_params, lr: float | None, device: str):
    from recast.training import TuneConfig

    tr = train_params
    return TuneConfig(epochs=tr.epochs, lr=lr or tr.lr, weight_decay=tr.weight_decay, step_size=tr.step_size,
                      gamma=tr.gamma, grad_clip=tr.grad_clip, device=device, progress=False)


def _mimicked(backbone, variant, apply_seed: int, mimic_seed: int):
    """``recast.apply`` + ``recast.mimic`` on the plain backbone; returns (RecastModel, report)."""
    import recast
    from recast.config import MimicryConfig

    cfg = variant.recast_config()
    rc = recast.apply(backbone.plain(), cfg, seed=apply_seed, inplace=True)
    report = recast.mimic(rc, MimicryConfig(**{"seed": mimic_seed, "progress": False, **variant.mimicry}))
    return rc, report


def _mimic_metrics(report) -> dict[str, float]:
    return {"mimic_seconds": report.seconds, "min_weight_cosine": report.min_weight_cosine,
            "mean_weight_cosine": report.mean_weight_cosine}


def _head_params(model) -> int:
    from recast.model import RecastModel

    if isinstance(model, RecastModel):
        heads = model.task_heads
        head = heads.heads[heads.task] if heads is not None and heads.task is not None else None
    else:
        head = model.get_classifier()
    return sum(p.numel() for p in head.parameters()) if head is not None else 0


# ----------------------------------------------------------------------------- kinds
def tune_trial(spec: dict, inputs) -> Result:
    """Apply + mimic the spec's RECAST variant (if any), add its adapter (if any), tune one task."""
    from pipelines.config import TrialMethod
    from recast.accounting import count_parameters
    from recast.adapters import count_adapter_parameters
    from recast.model import RecastModel
    from recast.recipes import MethodSpec, build_method
    from recast.training import evaluate, fit
    from stages.common import seed_everything
    from stages.params import TrainParams

    seed_everything(spec["seed"])
    tr = TrainParams(**spec["train"])
    method = TrialMethod(**spec["method"])
    task, data = spec["task"], inputs.task("task")
    num_classes = data.num_classes
    backbone = inputs.backbone("backbone")
    meta: dict[str, Any] = {}
    if method.recast is not None:
        rc, report = _mimicked(backbone, method.recast, spec["apply_seed"], spec["seed"])
        meta.update(_mimic_metrics(report))
        backbone = replace(backbone, recast_config=rc.config, apply_seed=spec["apply_seed"],
                           banks={k: b.templates.detach() for k, b in rc.banks.items()},
                           base=rc.task_tensors(rc.config.base_task))
        del rc
    if method.adapter is not None:
        mspec = MethodSpec("adapter", method.adapter.preset, method.recast is not None, method.adapter.overrides)
    else:
        mspec = MethodSpec("recast" if method.recast is not None else "head_only")
    built = build_method(mspec, backbone, task, num_classes)
    train, val, test = _loaders(data, tr, spec["seed"])
    cfg = _tune_config(tr, method.lr, spec["device"])
    res = fit(built.model, built.trainable, train, val, cfg, desc=spec["id"])
    trainable = sum(p.numel() for p in built.trainable)
    head = _head_params(built.model)
    root = built.model.model if isinstance(built.model, RecastModel) else built.model
    meta.update({
        "val_acc": res.best_val_acc, "test_acc": evaluate(built.model, test, cfg.device), "best_epoch": res.best_epoch,
        "trainable_params": trainable, "head_params": head, "task_params": trainable - head,
        "adapter_params": count_adapter_parameters(root), "stored_params": built.stored_params(),
        "seconds_per_step": res.seconds_per_step, "train_seconds": res.seconds, "steps": res.steps,
        "num_classes": num_classes,
    })
    if isinstance(built.model, RecastModel):
        counts = count_parameters(built.model, task)
        meta.update(coefficients=counts.coefficients, effective_coefficients=counts.effective_coefficients,
                    templates=counts.templates, replaced=counts.replaced,
                    template_ratio=counts.templates / max(counts.replaced, 1))
    return meta, {}


def recast_sequence_trial(spec: dict, inputs) -> Result:
    """RECAST-FT over the spec's task order in one model; accuracy matrix after every task.

    Each task is seeded the same way whatever its position (``seed_everything`` before its head
    is created), so equal final accuracies across orders show order invariance exactly.
    """
    from recast.accounting import count_parameters
    from recast.training import evaluate, fit
    from stages.common import seed_everything
    from stages.params import MimicArch
    from stages.params import TrainParams

    tr = TrainParams(**spec["train"])
    order = list(spec["order"])
    backbone = inputs.backbone("backbone")
    rc, report = _mimicked(backbone, MimicArch(**spec["recast"]), spec["apply_seed"], spec["seed"])
    rc.drop_reference()
    cfg = _tune_config(tr, None, spec["device"])
    tests, acc_matrix, val_acc, seconds, steps = {}, [], {}, 0.0, 0
    step_time = 0.0
    for i, task in enumerate(order):
        data = inputs.task(f"task/{task}")
        seed_everything(spec["seed"])
        rc.add_task(task, num_classes=data.num_classes)
        rc.set_task(task)
        train, val, tests[task] = _loaders(data, tr, spec["seed"])
        res = fit(rc, [p for p in rc.parameters() if p.requires_grad], train, val, cfg, desc=f"{spec['id']}:{task}")
        val_acc[task], seconds, steps = res.best_val_acc, seconds + res.seconds, steps + res.steps
        step_time += res.seconds_per_step * res.steps
        row = []
        for earlier in order[: i + 1]:
            rc.set_task(earlier, freeze=False)
            row.append(evaluate(rc, tests[earlier], cfg.device))
        acc_matrix.append(row + [None] * (len(order) - i - 1))
    final = {t: acc_matrix[-1][j] for j, t in enumerate(order)}
    forgetting = [max(acc_matrix[r][j] for r in range(j, len(order))) - final[t] for j, t in enumerate(order[:-1])]
    counts = count_parameters(rc, order[0])
    meta = {
        **_mimic_metrics(report), "task_names": order, "acc_matrix": acc_matrix, "final_acc": final,
        "val_acc_per_task": val_acc, "avg_acc": sum(final.values()) / len(final),
        "avg_forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
        "coefficients": counts.coefficients, "templates": counts.templates,
        "train_seconds": seconds, "steps": steps, "seconds_per_step": step_time / max(steps, 1),
    }
    return meta, {}


def continual_trial(spec: dict, inputs) -> Result:
    """``stages.sequential.continual_job`` over the spec's order, final accuracies keyed by task."""
    from stages.sequential import continual_job

    meta, tensors = continual_job(spec, inputs)
    meta["final_acc"] = dict(zip(meta["task_names"], meta["final_acc"], strict=True))
    return meta, tensors


def stage_tune_trial(spec: dict, inputs) -> Result:
    """The tune stage's per-task job, unchanged."""
    from stages.jobs import tune_job

    meta, _ = tune_job(spec, inputs)
    return meta, {}  # the sweep keeps metrics only; the tune stage stores payloads


_KINDS = {"tune": tune_trial, "stage_tune": stage_tune_trial, "recast_sequence": recast_sequence_trial,
          "continual": continual_trial}


def run_trial(spec: dict, inputs) -> Result:
    """Ray entry point: run the spec's kind with its ``stages.inputs.JobInputs``; add the trial's
    peak memory and wall time."""
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown trial kind {kind!r}; choose one of {sorted(_KINDS)}")
    reset_peak_memory(spec["device"])
    rss_start = current_rss_mb()
    start = time.perf_counter()
    meta, tensors = _KINDS[kind](spec, inputs)
    meta = {**meta, "trial_seconds": time.perf_counter() - start, "rss_start_mb": rss_start,
            **peak_memory(spec["device"])}
    return meta, tensors
