"""Job specs of the tune and combine stages: one JSON-serialisable dict per (arch, method,
task, seed), with a stable id and everything a Ray job needs."""

from __future__ import annotations

import json

from stages.backbones import bank_meta, pretrained_meta
from stages.common import ParamsError, manifest_sha, resolve
from stages.params import MethodParams, TuneParams


def task_names(p: TuneParams) -> list[str]:
    """The tasks to run, in the configured order: ``tune.tasks``, else every prepared task in
    the order the prepare stage built them (``suite.json``)."""
    root = resolve(p.data_dir)
    suite = root / "suite.json"
    available = list(json.loads(suite.read_text())["tasks"]) if suite.exists() else []
    if p.tasks is None:
        if not available:
            raise ParamsError(f"tune.data_dir: no prepared tasks under {root}; run the prepare stage")
        return available
    unknown = [t for t in p.tasks if t not in available]
    if unknown and available:
        raise ParamsError(f"tune.tasks: unknown task(s) {unknown}; prepared: {available}")
    return list(p.tasks)


def common_fields(p: TuneParams, device: str) -> dict:
    """Fields every job of the tune/combine stages carries."""
    return {"train": p.train.model_dump(), "pretrain_dir": str(resolve(p.pretrain_dir)),
            "mimic_dir": str(resolve(p.mimic_dir)), "device": device}


def method_specs(stage: str, p: TuneParams, methods: dict[str, MethodParams], device: str) -> list[dict]:
    """One job per arch x method x task x seed (a method's ``archs`` limits where it runs)."""
    tasks = task_names(p)
    data = resolve(p.data_dir)
    common = common_fields(p, device)
    specs = []
    for arch in p.archs:
        bb_sha = pretrained_meta(resolve(p.pretrain_dir), arch).get("sha256", "")
        bank_sha = bank_meta(resolve(p.mimic_dir), arch).get("bank_sha256", "")
        for name, m in methods.items():
            if m.archs is not None and arch not in m.archs:
                continue
            if m.needs_recast and not bank_sha:
                raise ParamsError(f"{stage}.methods.{name}: needs the mimic stage output for arch '{arch}' "
                                  f"under {resolve(p.mimic_dir)}")
            for task in tasks:
                for seed in p.seeds:
                    specs.append({"id": f"{stage}/{arch}/{name}/{task}/s{seed}", "arch": arch, "method_name": name,
                                  "method": m.model_dump(), "task": task, "seed": seed,
                                  "task_dir": str(data / task), "backbone_sha": bb_sha, "bank_sha": bank_sha,
                                  "task_sha": manifest_sha(data / task), **common})
    return specs
