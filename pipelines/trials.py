"""Trial functions of the sweeps: ``run_trial(spec, inputs, on_epoch) -> metrics`` runs inside one Tune trial
(``inputs``: the trial's ``stages.jobs.inputs.JobInputs``).

Kinds (``spec["kind"]``):

- ``tune``: build the trial's RecastConfig, ``recast.apply`` + closed-form ``recast.mimic`` on the
  pretrained backbone, then tune one task with ``recast.recipes.build_method`` (RECAST,
  an adapter alone, both by eq. 6, or head only) and ``recast.training.fit``.
- ``stage_tune``: the tune stage's own job (``stages.jobs.train.tune_job``).
- ``recast_sequence``: one RecastModel trained task after task in the spec's order; every earlier
  task is re-evaluated after each new one (its accuracy matrix shows zero forgetting, and the
  final accuracies do not depend on the order).
- ``continual``: a sequential baseline over the order (``stages.jobs.sequential.continual_job``);
  in ``hpo`` (``score_val``) scored on every task's validation split at the end of the stream.
- ``stage_tasks``: ``hpo``'s per-task method: the tune stage's job on every task of the config,
  one after the other, scored by the mean validation accuracy over the tasks.

``on_epoch`` receives every epoch of ``recast.training.fit`` (the sweep reports it to Tune); the
``hpo`` kinds report once per task instead (ASHA's rungs are tasks). Every kind reports the peak memory of the
trial itself (the worker's resident-set high-water mark is reset first).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pipelines.config import TrialMethod
from recast.accounting import count_parameters
from recast.adapters import count_adapter_parameters
from recast.baselines.results import forgetting_per_task
from recast.checkpoint import Checkpointer
from recast.model import RecastModel
from recast.recipes import MethodSpec, build_method
from recast.training import evaluate, fit
from stages.config.common import seed_everything
from stages.config.params import MimicArch, TrainParams
from stages.jobs.inputs import JobInputs
from stages.jobs.memory import current_rss_mb, peak_memory, reset_peak_memory
from stages.jobs.sequential import continual_job
from stages.jobs.train import task_loaders, tune_job

EpochHook = Callable[[dict[str, Any]], None] | None
CHECKPOINTED_KINDS = ("tune", "stage_tune", "recast_sequence")  # fits: resumable from an epoch checkpoint
SEQUENCE_CHECKPOINTED_KINDS = ("continual",)  # run_sequential: resumable from a task checkpoint


# ----------------------------------------------------------------------------- helpers
def _mimicked(backbone, variant: MimicArch, apply_seed: int, mimic_seed: int):
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
    if isinstance(model, RecastModel):
        heads = model.task_heads
        head = heads.heads[heads.task] if heads is not None and heads.task is not None else None
    else:
        head = model.get_classifier()
    return sum(p.numel() for p in head.parameters()) if head is not None else 0


# ----------------------------------------------------------------------------- kinds
def tune_trial(spec: dict, inputs: JobInputs, on_epoch: EpochHook = None,
               checkpoint: Checkpointer | None = None) -> dict[str, Any]:
    """Apply + mimic the spec's RECAST variant (if any), add its adapter (if any), tune one task."""
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
    train, val, test = task_loaders(data, tr, spec["seed"])
    cfg = tr.recipe(spec["device"], method.lr)
    res = fit(built.model, built.trainable, train, val, cfg, desc=spec["id"], on_epoch=on_epoch, checkpoint=checkpoint)
    trainable = sum(p.numel() for p in built.trainable)
    head = _head_params(built.model)
    root = built.model.model if isinstance(built.model, RecastModel) else built.model
    meta.update({
        "val_acc": res.best_val_acc, "test_acc": evaluate(built.model, test, cfg.device), "best_epoch": res.best_epoch,
        "trainable_params": trainable, "head_params": head, "task_params": trainable - head,
        "adapter_params": count_adapter_parameters(root), "stored_params": built.stored_params(),
        "seconds_per_step": res.seconds_per_step, "train_seconds": res.seconds, "steps": res.steps,
        "num_classes": num_classes, "resumed_epoch": res.resumed_epoch,
    })
    if isinstance(built.model, RecastModel):
        counts = count_parameters(built.model, task)
        meta.update(coefficients=counts.coefficients, effective_coefficients=counts.effective_coefficients,
                    templates=counts.templates, replaced=counts.replaced,
                    template_ratio=counts.templates / max(counts.replaced, 1))
    return meta


class _SequenceFit:
    """``fit``'s Checkpointer for task ``index`` of a ``recast_sequence`` trial: every epoch's
    checkpoint (reported to Tune by ``outer``, a ``TuneTrialCheckpoints``) also holds the model's
    whole state (``rc.*``: the earlier tasks) and the trial's accumulators (``meta["sequence"]``);
    ``load`` gives the checkpoint the trial resumed from to the task it was taken in only."""

    def __init__(self, outer, rc: RecastModel, index: int, acc: dict[str, Any],
                 resume: tuple[dict, dict] | None) -> None:
        self.outer, self.rc, self.index, self.acc, self.resume = outer, rc, index, acc, resume

    def load(self):
        return self.resume

    def save(self, tensors, meta) -> None:
        model = {f"rc.{k}": v.detach().cpu().clone() for k, v in self.rc.state_dict().items()}
        self.outer.extra["task_index"] = self.index
        self.outer.save({**tensors, **model}, {**meta, "point": f"task:{self.index}:epoch:{meta['epoch']}",
                                               "sequence": {**self.acc, "task": self.index}})


def recast_sequence_trial(spec: dict, inputs: JobInputs, on_epoch: EpochHook = None,
                          checkpoint: Checkpointer | None = None) -> dict[str, Any]:
    """RECAST-FT over the spec's task order in one model; accuracy matrix after every task.

    Each task is seeded the same way whatever its position (``seed_everything`` before its head
    is created), so equal final accuracies across orders show order invariance exactly.
    ``checkpoint`` (a ``pipelines.tune_checkpoints.TuneTrialCheckpoints``): every epoch of every
    task is reported with a checkpoint of the whole trial; a retried trial rebuilds the tasks
    done, loads the model and resumes the task it was in at its epoch (``resumed_task``,
    ``resumed_epoch``), with the same results as a trial never stopped.
    """
    tr = TrainParams(**spec["train"])
    order = list(spec["order"])
    backbone = inputs.backbone("backbone")
    rc, report = _mimicked(backbone, MimicArch(**spec["recast"]), spec["apply_seed"], spec["seed"])
    rc.drop_reference()
    cfg = tr.recipe(spec["device"])
    acc: dict[str, Any] = {"acc_matrix": [], "val_acc": {}, "seconds": 0.0, "steps": 0, "step_time": 0.0}
    saved = checkpoint.load() if checkpoint is not None else None
    first = saved[1]["sequence"]["task"] if saved is not None else 0
    if saved is not None:
        acc = {k: v for k, v in saved[1]["sequence"].items() if k != "task"}
    tests, resumed_epoch = {}, 0
    for i, task in enumerate(order):
        data = inputs.task(f"task/{task}")
        seed_everything(spec["seed"])
        rc.add_task(task, num_classes=data.num_classes)
        rc.set_task(task)
        train, val, tests[task] = task_loaders(data, tr, spec["seed"])
        if i < first:
            continue
        if i == first and saved is not None:  # the tasks done are built: load their state
            rc.load_state_dict({k[3:]: v for k, v in saved[0].items() if k.startswith("rc.")})
            rc.set_task(task)
        hook = None if on_epoch is None else (lambda h, i=i: on_epoch({**h, "task_index": i}))
        store = None if checkpoint is None else _SequenceFit(checkpoint, rc, i, acc, saved if i == first else None)
        res = fit(rc, [p for p in rc.parameters() if p.requires_grad], train, val, cfg, desc=f"{spec['id']}:{task}",
                  on_epoch=hook, checkpoint=store)
        acc["val_acc"][task] = res.best_val_acc
        acc["seconds"], acc["steps"] = acc["seconds"] + res.seconds, acc["steps"] + res.steps
        acc["step_time"] += res.seconds_per_step * res.steps
        row = []
        for earlier in order[: i + 1]:
            rc.set_task(earlier, freeze=False)
            row.append(evaluate(rc, tests[earlier], cfg.device))
        acc["acc_matrix"].append(row + [None] * (len(order) - i - 1))
        if i == first:
            resumed_epoch = res.resumed_epoch
    acc_matrix = acc["acc_matrix"]
    final = {t: acc_matrix[-1][j] for j, t in enumerate(order)}
    forgetting = [f for f in forgetting_per_task(acc_matrix) if f is not None]
    counts = count_parameters(rc, order[0])
    return {
        **_mimic_metrics(report), "task_names": order, "acc_matrix": acc_matrix, "final_acc": final,
        "val_acc_per_task": acc["val_acc"], "avg_acc": sum(final.values()) / len(final),
        "avg_forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
        "coefficients": counts.coefficients, "templates": counts.templates,
        "train_seconds": acc["seconds"], "steps": acc["steps"],
        "seconds_per_step": acc["step_time"] / max(acc["steps"], 1),
        "resumed_task": first, "resumed_epoch": resumed_epoch,
    }


def continual_trial(spec: dict, inputs: JobInputs, on_epoch: EpochHook = None,
                    checkpoint: Checkpointer | None = None) -> dict[str, Any]:
    """``stages.jobs.sequential.continual_job`` over the spec's order, final accuracies keyed by task
    (``recast.baselines.run_sequential`` has no per-epoch hook). With ``score_val`` (``hpo``): after
    each task, ``on_epoch`` gets ``val_acc`` = the mean validation accuracy of every task seen,
    measured then; the final ``val_acc`` is that mean at the end of the stream (forgetting counts).

    ``checkpoint`` (a ``pipelines.tune_checkpoints.TuneSequenceCheckpoints``): each task is reported
    with its checkpoint instead of through ``on_epoch`` (scored or not: ``tasks_done``); a retried
    trial resumes after its last finished task (``resumed_task``), its validation rows so far
    restored from the checkpoint."""
    state: dict[str, Any] = checkpoint.state if checkpoint is not None else {}  # load() replaces it

    def on_task(i: int, val_row: list[float]) -> None:
        held = checkpoint.state if checkpoint is not None else state
        held.setdefault("rows", []).append(val_row)
        entry = {"val_acc": sum(val_row) / len(val_row), "tasks_done": i + 1}
        if checkpoint is not None:
            checkpoint.pending = entry  # reported with the task's checkpoint
        elif on_epoch is not None:
            on_epoch(entry)

    meta = continual_job(spec, inputs, on_task=on_task if spec.get("score_val") else None,
                         checkpoint=checkpoint).metrics
    rows = (checkpoint.state if checkpoint is not None else state).get("rows", [])
    meta["final_acc"] = dict(zip(meta["task_names"], meta["final_acc"], strict=True))
    if spec.get("score_val"):
        meta["val_acc_by_task"] = dict(zip(meta["task_names"], rows[-1], strict=True))
        meta["val_acc"] = sum(rows[-1]) / len(rows[-1])
        meta["test_acc"] = meta["avg_acc"]
    return meta


def stage_tasks_trial(spec: dict, inputs: JobInputs, on_epoch: EpochHook = None,
                      checkpoint: Checkpointer | None = None) -> dict[str, Any]:
    """The tune stage's job of one per-task method on every task of the config in turn (``hpo``):
    after each task ``on_epoch`` gets ``val_acc`` = the mean best validation accuracy over the
    tasks so far; the final ``val_acc`` is the mean over all of them (``test_acc`` likewise,
    recorded and never selected on)."""
    val, test, seconds = {}, {}, 0.0
    first: dict[str, Any] = {}
    for i, job in enumerate(spec["jobs"]):
        meta = tune_job(job, JobInputs(job["inputs"], inputs.payloads)).metrics
        val[job["task"]], test[job["task"]] = meta["val_acc"], meta["test_acc"]
        seconds += meta["train_seconds"]
        first = first or meta
        if on_epoch is not None:
            on_epoch({"val_acc": sum(val.values()) / len(val), "tasks_done": i + 1})
    return {"val_acc": sum(val.values()) / len(val), "test_acc": sum(test.values()) / len(test),
            "val_acc_by_task": val, "test_acc_by_task": test, "train_seconds": seconds,
            "epochs": first["epochs"], "task_params": first["task_params"], "tasks_done": len(val)}


def stage_tune_trial(spec: dict, inputs: JobInputs, on_epoch: EpochHook = None,
                     checkpoint: Checkpointer | None = None) -> dict[str, Any]:
    """The tune stage's per-task job, unchanged; the sweep keeps its metrics, not its payload."""
    return tune_job(spec, inputs, on_epoch=on_epoch, checkpoint=checkpoint).metrics


_KINDS = {"tune": tune_trial, "stage_tune": stage_tune_trial, "recast_sequence": recast_sequence_trial,
          "continual": continual_trial, "stage_tasks": stage_tasks_trial}


def run_trial(spec: dict, inputs: JobInputs, on_epoch: EpochHook = None,
              checkpoint: Checkpointer | None = None) -> dict[str, Any]:
    """Run the spec's kind with its inputs; add the trial's peak memory and wall time.
    ``checkpoint``: the epoch checkpoints of a kind in ``CHECKPOINTED_KINDS`` or the task checkpoints of
    one in ``SEQUENCE_CHECKPOINTED_KINDS`` (ignored by the others)."""
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown trial kind {kind!r}; choose one of {sorted(_KINDS)}")
    reset_peak_memory(spec["device"])
    rss_start = current_rss_mb()
    start = time.perf_counter()
    kept = checkpoint if kind in CHECKPOINTED_KINDS + SEQUENCE_CHECKPOINTED_KINDS else None
    meta = _KINDS[kind](spec, inputs, on_epoch, kept)
    return {**meta, "trial_seconds": time.perf_counter() - start, "rss_start_mb": rss_start,
            **peak_memory(spec["device"], rss_start)}
