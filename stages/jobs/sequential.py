"""Sequential continual-learning baselines in the tune stage: one job per (arch, method, seed)
trains ONE shared backbone on every task in the configured order (``recast.baselines``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from recast.baselines import TaskSpec, make_method, run_sequential
from recast.checkpoint import Checkpointer
from recast.data.augment import TaskAugment
from stages.config.common import record_nondeterminism, resolve, seed_everything
from stages.config.params import TrainParams, TuneParams
from stages.jobs.checkpoints import job_checkpoints
from stages.jobs.inputs import InputStore, JobInputs, backbone_bundle, banks_bundle, task_bundle
from stages.jobs.result import JobResult
from stages.jobs.specs import common_fields, task_names

log = logging.getLogger(__name__)


def continual_specs(stage: str, p: TuneParams, device: str, store: InputStore) -> list[dict]:
    """One job per ``tune.continual.methods.<arch>`` entry and seed; inputs ``backbone`` and
    ``task/<name>`` for every task (added to ``store``)."""
    tasks = task_names(p)
    data = resolve(p.data_dir)
    c = p.continual
    specs = []
    for arch in p.archs:
        if not c.methods.get(arch):
            continue
        roles = {"backbone": store.add(backbone_bundle(resolve(p.pretrain_dir), arch)),
                 **{f"task/{t}": store.add(task_bundle(data / t)) for t in tasks}}
        for name in c.methods[arch]:
            if name == "recast":  # RECAST itself under the protocol: one RecastModel on the mimicked banks
                roles = {**roles, "banks": store.add(banks_bundle(resolve(p.mimic_dir), arch))}
            lr, source = p.lr_for(arch, name)
            for seed in p.seeds:
                specs.append({"id": f"{stage}/{arch}/{name}/sequential/s{seed}", "kind": "continual", "arch": arch,
                              "method_name": name, "seed": seed, "lr": lr, "lr_source": source,
                              "options": c.options.get(name, {}), "task_order": list(tasks), "inputs": roles,
                              **common_fields(p, arch, device)})
    return specs


def continual_job(spec: dict, inputs: JobInputs, on_task: Callable[[int, list[float]], None] | None = None,
                  checkpoint: Checkpointer | None = None) -> JobResult:
    """Ray task: one sequential continual-learning baseline over all tasks of one arch.
    ``on_task``: ``run_sequential``'s (the validation accuracy of every task seen, after each task).
    ``checkpoint``: where its checkpoints go (a sweep trial's, through Tune); default the job's own
    (``stages.jobs.checkpoints.job_checkpoints``: deleted when the job finishes)."""
    seed_everything(spec["seed"])
    tr = TrainParams(**spec["train"])
    if spec["method_name"] == "recast":
        backbone = inputs.backbone("backbone", banks="banks").recast()
    else:
        backbone = inputs.backbone("backbone").plain()
        backbone.reset_classifier(0)
    method = make_method(spec["method_name"], backbone, spec.get("options") or None)
    replay = hasattr(method, "replay_augment")  # ER-ACE, DER++, GDumb: a memory of raw views, re-augmented
    tasks, augment = [], {}
    for i, name in enumerate(spec["task_order"]):
        data = inputs.task(f"task/{name}")

        def mk(split: str, train: bool, limit: int | None, data=data):
            return data.loader(split, tr.batch_size, tr.image_size, train=train, seed=spec["seed"], limit=limit,
                               device=spec["device"])

        train = mk("train", True, tr.limit_train)
        if replay:  # batches (augmented, labels, raw); replays get their own task's augmentation again
            train = train.with_raw_view()
            m = data.manifest
            augment[i] = (m.mean, m.std, m.augment, m.image_size[0])
        tasks.append(TaskSpec(name, data.num_classes, train, mk("val", False, tr.limit_eval),
                              mk("test", False, tr.limit_eval)))
    if replay:
        method.replay_augment = TaskAugment(augment, seed=spec["seed"])
    # equal budget: every method trains with the per-task recipe (epochs, StepLR schedule, weight
    # decay, clipping) at its own lr (``spec["lr"]``: tune.lr_by_method, else tune.train.lr); the
    # baselines that train the backbone update its BatchNorm statistics (TrainConfig's default)
    cfg = replace(tr.recipe(spec["device"], spec.get("lr")), seed=spec["seed"], precision=spec.get("precision", "fp32"))
    if spec["method_name"] != "recast":
        cfg = replace(cfg, freeze_bn_stats=False)
    own = job_checkpoints(spec) if checkpoint is None else None
    with record_nondeterminism() as nondeterministic:
        out = run_sequential(method, tasks, cfg, progress=False, checkpoint=checkpoint or own, on_task=on_task).to_json()
    if out["resumed_task"] or out["resumed_epoch"]:
        log.warning("%s: resumed at task %d (%s) epoch %d from its checkpoint", spec["id"], out["resumed_task"],
                    spec["task_order"][out["resumed_task"]] if out["resumed_task"] < len(spec["task_order"]) else "end",
                    out["resumed_epoch"])
    if own is not None:
        own.clear()  # finished: its result goes to the job cache
    return JobResult({**out, "arch": spec["arch"], "method": spec["method_name"], "seed": spec["seed"],
                      "sequential": True, "lr": cfg.lr, "epochs": cfg.epochs, "precision": cfg.precision,
                      "torch_threads": torch.get_num_threads()}, nondeterministic=nondeterministic)
