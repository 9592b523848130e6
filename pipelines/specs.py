"""Trial specs of each sweep: JSON-serialisable dicts, one Tune trial each (``pipelines.trials``).

A spec holds everything its trial needs (the method, the recipe) and its inputs by content
(``spec["inputs"]``: role -> key of a ``stages.jobs.inputs.InputStore`` bundle: backbone, task,
banks), so the sweep's key (``pipelines.sweep.sweep_key``, over each spec's
``stages.jobs.cache.spec_key``) changes whenever a result would (the key also hashes the code) and
never depends on where the project lies. ``point`` holds the sweep coordinates that land in the table.
"""

from __future__ import annotations

import json
from typing import Any

from pipelines.config import (
    BudgetSweep,
    GnSweep,
    HpoSweep,
    KSweep,
    OrderSweep,
    SeedsSweep,
    SweepBase,
    TargetsSweep,
    TrialMethod,
    check_backbone,
)
from stages.config.common import ParamsError, resolve
from stages.config.params import MimicArch
from stages.jobs.backbones import pretrained_meta
from stages.jobs.inputs import InputStore, backbone_bundle, banks_bundle, task_bundle
from stages.jobs.sequential import continual_specs
from stages.jobs.specs import method_specs, task_names


def _task_key(store: InputStore, cfg: SweepBase, task: str) -> str:
    task_dir = resolve(cfg.data_dir) / task
    if not (task_dir / "manifest.json").exists():
        raise ParamsError(f"tasks: no prepared task at {task_dir}; run the prepare stage")
    return store.add(task_bundle(task_dir))


def _common(sweep: str, cfg: SweepBase, device: str, store: InputStore) -> dict[str, Any]:
    pretrained_meta(resolve(cfg.pretrain_dir), cfg.arch)  # a missing backbone is named here
    return {"sweep": sweep, "arch": cfg.arch, "train": cfg.train.model_dump(), "device": device,
            "apply_seed": cfg.apply_seed, "inputs": {"backbone": store.add(backbone_bundle(resolve(cfg.pretrain_dir),
                                                                                           cfg.arch))}}


def _tune_specs(sweep: str, cfg: SweepBase, device: str, store: InputStore,
                rows: list[tuple[str, TrialMethod, dict[str, Any]]]) -> list[dict]:
    """(name, method, point) rows x tasks x seeds as ``tune`` trials."""
    common = _common(sweep, cfg, device, store)
    tasks = {task: _task_key(store, cfg, task) for task in cfg.tasks}
    specs = []
    for name, method, point in rows:
        for task in cfg.tasks:
            for seed in cfg.seeds:
                specs.append({
                    "id": f"{sweep}/{cfg.arch}/{name}/{task}/s{seed}", "kind": "tune", "name": name,
                    "family": method.family, "point": point, "method": method.model_dump(), "task": task,
                    "seed": seed, **common, "inputs": {**common["inputs"], "task": tasks[task]}})
    return specs


def _recast_method(base: MimicArch, **overrides: Any) -> TrialMethod:
    return TrialMethod(recast=MimicArch(preset=base.preset, overrides={**base.overrides, **overrides},
                                        mimicry=base.mimicry))


def gn_specs(store: InputStore, cfg: GnSweep, device: str) -> list[dict]:
    rows = [(f"G{g}-n{n}", _recast_method(cfg.recast, groups=g, templates=n, coef_sets=cfg.coef_sets),
             {"G": g, "n": n, "K": cfg.coef_sets, "G_times_n": g * n}) for g, n in cfg.pairs]
    return _tune_specs("gn", cfg, device, store, rows)


def k_specs(store: InputStore, cfg: KSweep, device: str) -> list[dict]:
    rc = cfg.recast.recast_config()
    rows = [(f"K{k}", _recast_method(cfg.recast, coef_sets=k), {"G": rc.groups, "n": rc.templates, "K": k})
            for k in cfg.coef_sets]
    return _tune_specs("k", cfg, device, store, rows)


def targets_specs(store: InputStore, cfg: TargetsSweep, device: str) -> list[dict]:
    rows = []
    for name in cfg.presets:
        variant = cfg.variant(name)
        rows.append((name, TrialMethod(recast=variant), {"targets": ",".join(variant.recast_config().targets)}))
    return _tune_specs("targets", cfg, device, store, rows)


def budget_specs(store: InputStore, cfg: BudgetSweep, device: str) -> list[dict]:
    rows = [(name, m, {}) for name, m in cfg.methods.items()]
    return _tune_specs("budget", cfg, device, store, rows)


def order_specs(store: InputStore, cfg: OrderSweep, device: str) -> list[dict]:
    common = _common("order", cfg, device, store)
    common["inputs"].update({f"task/{t}": _task_key(store, cfg, t) for t in cfg.tasks})
    specs = []
    for order in cfg.task_orders():
        label = ">".join(order)
        for seed in cfg.seeds:
            base = {"task": label, "order": order, "task_order": order, "seed": seed, "point": {"order": label},
                    **common}
            if cfg.recast is not None:
                specs.append({**base, "id": f"order/{cfg.arch}/recast/{label}/s{seed}", "kind": "recast_sequence",
                              "name": "recast", "family": "recast", "recast": cfg.recast.model_dump()})
            for method in cfg.continual:
                # the keys stages.jobs.sequential.continual_job reads
                specs.append({**base, "id": f"order/{cfg.arch}/{method}/{label}/s{seed}", "kind": "continual",
                              "name": method, "family": method, "method_name": method,
                              "train": {**common["train"], "epochs": cfg.continual_epochs}, "lr": cfg.continual_lr,
                              "options": cfg.options.get(method, {})})
    return specs


def seeds_specs(store: InputStore, cfg: SeedsSweep, device: str) -> list[dict]:
    """The keys ``stages.jobs.train.tune_job`` reads, plus the sweep's own."""
    common = _common("seeds", cfg, device, store)
    tasks = {task: _task_key(store, cfg, task) for task in cfg.tasks}
    mimic_dir = resolve(cfg.mimic_dir)
    specs = []
    for name, m in cfg.methods.items():
        bank_sha, roles = "", dict(common["inputs"])
        if m.kind == "recast" or m.recast:
            mimic_json = mimic_dir / cfg.arch / "recast.json"
            if not mimic_json.exists():
                raise ParamsError(f"seeds.methods.{name}: needs the mimic stage output {mimic_json}")
            bank_sha = json.loads(mimic_json.read_text())["bank_sha256"]
            roles["banks"] = store.add(banks_bundle(mimic_dir, cfg.arch))
        family = m.kind if m.kind != "adapter" else (f"recast+{m.adapter}" if m.recast else m.adapter)
        for task in cfg.tasks:
            for seed in cfg.seeds:
                specs.append({"id": f"seeds/{cfg.arch}/{name}/{task}/s{seed}", "kind": "stage_tune", "name": name,
                              "family": family, "point": {}, "method_name": name, "method": m.model_dump(),
                              "task": task, "seed": seed, "bank_sha": bank_sha, **common,
                              "inputs": {**roles, "task": tasks[task]}})
    return specs


def hpo_specs(store: InputStore, cfg: HpoSweep, device: str) -> list[dict]:
    """One base spec per method of the pipeline config and seed, each running the pipeline's own
    jobs on every task of the config (the search sets their lr):

    - ``stage_tasks``: a per-task method, ``jobs`` = its tune-stage job spec for each task
      (``stages.jobs.specs.method_specs``), run one after the other in one trial;
    - ``continual``: a sequential baseline over the config's task order
      (``stages.jobs.sequential.continual_specs``), scored on the validation splits at the end.
    """
    tp, methods = cfg.pipeline()
    tasks = task_names(tp)
    check_backbone(cfg)  # a missing backbone, or another config's, is named here
    specs = []
    jobs = method_specs("hpo", tp, methods["per_task"], device, store)
    for name, m in methods["per_task"].items():
        family = m.kind if m.kind != "adapter" else (f"recast+{m.adapter}" if m.recast else m.adapter)
        for seed in cfg.seeds:
            mine = [j for j in jobs if j["method_name"] == name and j["seed"] == seed]
            roles = {"backbone": mine[0]["inputs"]["backbone"], **{f"task/{j['task']}": j["inputs"]["task"]
                                                                   for j in mine}}
            if "banks" in mine[0]["inputs"]:
                roles["banks"] = mine[0]["inputs"]["banks"]
            specs.append({"id": f"hpo/{cfg.arch}/{name}/s{seed}", "sweep": "hpo", "kind": "stage_tasks",
                          "name": name, "family": family, "arch": cfg.arch, "task": "all", "tasks": tasks,
                          "seed": seed, "point": {}, "jobs": mine, "device": device, "inputs": roles})
    for job in continual_specs("hpo", tp, device, store):
        if job["method_name"] not in methods["continual"]:
            continue
        specs.append({**job, "id": f"hpo/{cfg.arch}/{job['method_name']}/s{job['seed']}", "sweep": "hpo",
                      "name": job["method_name"], "family": job["method_name"], "task": "all", "tasks": tasks,
                      "point": {}, "score_val": True})
    return specs


_BUILDERS = {"gn": gn_specs, "k": k_specs, "targets": targets_specs, "budget": budget_specs, "order": order_specs,
             "seeds": seeds_specs, "hpo": hpo_specs}


def build_specs(sweep: str, cfg: SweepBase, device: str, store: InputStore) -> list[dict]:
    """Every trial of ``sweep`` as a spec dict; their inputs are added to ``store``."""
    return _BUILDERS[sweep](store, cfg, device)


def recast_variants(specs: list[dict]) -> list[MimicArch]:
    """The distinct RECAST variants the specs build (for a preflight check in the driver)."""
    seen: dict[str, MimicArch] = {}
    for s in specs:
        raw = s.get("recast") or (s.get("method") or {}).get("recast")
        if isinstance(raw, dict):
            seen.setdefault(json.dumps(raw, sort_keys=True), MimicArch(**raw))
    return list(seen.values())
