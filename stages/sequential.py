"""Sequential continual-learning baselines in the tune stage: one job per (arch, method, seed)
trains ONE shared backbone on every task in the configured order (``recast.baselines``)."""

from __future__ import annotations

from pathlib import Path

import torch

from recast.baselines import TaskSpec, TrainConfig, make_method, run_sequential
from recast.data import BatchLoader, read_manifest
from stages.backbones import load_backbone, pretrained_meta
from stages.common import record_nondeterminism, resolve, seed_everything
from stages.params import TrainParams, TuneParams
from stages.specs import common_fields, manifest_sha, task_names


def continual_specs(stage: str, p: TuneParams, device: str) -> list[dict]:
    """One job per ``tune.continual.methods.<arch>`` entry and seed."""
    tasks = task_names(p)
    data = resolve(p.data_dir)
    c = p.continual
    specs = []
    for arch in p.archs:
        bb_sha = pretrained_meta(resolve(p.pretrain_dir), arch).get("sha256", "")
        for name in c.methods.get(arch, []):
            for seed in p.seeds:
                specs.append({"id": f"{stage}/{arch}/{name}/sequential/s{seed}", "kind": "continual", "arch": arch,
                              "method_name": name, "seed": seed, "epochs": c.epochs, "lr": c.lr,
                              "options": c.options.get(name, {}), "backbone_sha": bb_sha,
                              "task_dirs": {t: str(data / t) for t in tasks}, "task_order": list(tasks),
                              "task_sha": {t: manifest_sha(data / t) for t in tasks}, **common_fields(p, arch, device)})
    return specs


def continual_job(spec: dict) -> tuple[dict, dict]:
    """Ray task: one sequential continual-learning baseline over all tasks of one arch."""
    seed_everything(spec["seed"])
    tr = TrainParams(**spec["train"])
    backbone = load_backbone(spec["arch"], Path(spec["pretrain_dir"])).plain()
    backbone.reset_classifier(0)
    tasks = []
    for name in spec["task_order"]:
        tdir = Path(spec["task_dirs"][name])

        def mk(split: str, train: bool, limit: int | None, tdir: Path = tdir) -> BatchLoader:
            return BatchLoader(tdir, split, tr.batch_size, tr.image_size, train=train, seed=spec["seed"], limit=limit)

        tasks.append(TaskSpec(name, read_manifest(tdir).num_classes, mk("train", True, tr.limit_train),
                              mk("val", False, tr.limit_eval), mk("test", False, tr.limit_eval)))
    cfg = TrainConfig(epochs=spec["epochs"], lr=spec["lr"], seed=spec["seed"], device=spec["device"],
                      grad_clip=tr.grad_clip)
    method = make_method(spec["method_name"], backbone, spec.get("options") or None)
    with record_nondeterminism() as nondeterministic:
        out = run_sequential(method, tasks, cfg, progress=False).to_json()
    return {**out, "arch": spec["arch"], "method": spec["method_name"], "seed": spec["seed"], "sequential": True,
            "torch_threads": torch.get_num_threads(), "_nondeterministic": nondeterministic}, {}
