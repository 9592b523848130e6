"""Job specs of the tune and combine stages: one JSON-serialisable dict per (arch, method,
task, seed), with a stable id and everything a Ray job needs. Inputs are named by content
(``spec["inputs"]``: role -> ``stages.jobs.inputs`` key), never by a path on the driver."""

from __future__ import annotations

import json

from stages.config.common import ParamsError, resolve
from stages.config.params import MethodParams, TuneParams
from stages.jobs.backbones import bank_meta
from stages.jobs.inputs import InputStore, backbone_bundle, banks_bundle, task_bundle


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


def common_fields(p: TuneParams, arch: str, device: str) -> dict:
    """Fields every job of the tune/combine stages carries (the recipe is the arch's own)."""
    return {"train": p.train_for(arch).model_dump(), "device": device}


def method_specs(stage: str, p: TuneParams, methods: dict[str, MethodParams], device: str,
                 store: InputStore) -> list[dict]:
    """One job per arch x method x task x seed (a method's ``archs`` limits where it runs);
    their inputs are added to ``store``. ``lr``/``lr_source``: the method's learning rate and
    where it comes from (``TuneParams.lr_for``; a method's own ``lr`` wins when no
    ``tune.lr_by_method`` is set)."""
    tasks = task_names(p)
    data = resolve(p.data_dir)
    task_keys = {task: store.add(task_bundle(data / task)) for task in tasks}
    specs = []
    for arch in p.archs:
        common = common_fields(p, arch, device)
        backbone = store.add(backbone_bundle(resolve(p.pretrain_dir), arch))
        bank_sha = bank_meta(resolve(p.mimic_dir), arch).get("bank_sha256", "")
        for name, m in methods.items():
            if m.archs is not None and arch not in m.archs:
                continue
            if m.needs_recast and not bank_sha:
                raise ParamsError(f"{stage}.methods.{name}: needs the mimic stage output for arch '{arch}' "
                                  f"under {resolve(p.mimic_dir)}")
            roles = {"backbone": backbone}
            if m.needs_recast:
                roles["banks"] = store.add(banks_bundle(resolve(p.mimic_dir), arch))
            lr, source = (m.lr, f"params:{stage}.methods.{name}.lr") if m.lr is not None else p.lr_for(arch, name)
            for task in tasks:
                for seed in p.seeds:
                    specs.append({"id": f"{stage}/{arch}/{name}/{task}/s{seed}", "arch": arch, "method_name": name,
                                  "method": m.model_dump(), "task": task, "seed": seed, "bank_sha": bank_sha,
                                  "lr": lr, "lr_source": source,
                                  "inputs": {**roles, "task": task_keys[task]}, **common})
    return specs
