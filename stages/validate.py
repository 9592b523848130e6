"""Validate every params.yaml section before any compute, and print the stage plan.

``python -m stages.validate [--params FILE]`` is the dry run of a configuration (for example
``configs/paper.yaml``): it checks types and unknown keys of every section, that timm knows
every model, that tasks exist in the chosen suite, that each RECAST variant fits its model
(G divides the targeted depth, targets match), and lists the jobs each stage would run. It
downloads nothing: models are built on the meta device.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import timm
import torch

from recast.baselines import METHODS
from recast.baselines.common import config_from_mapping
from recast.targets import build_plan
from stages.common import ParamsError, read_params, validate_section
from stages.params import SECTIONS, suite_tasks


def _plan_recast(arch_name: str, pre, mim) -> dict[str, Any]:
    arch = pre.archs[arch_name]
    kwargs = dict(arch.kwargs)
    with torch.device("meta"):
        model = timm.create_model(arch.model, pretrained=False, **kwargs)
    try:
        plan = build_plan(model, mim.archs[arch_name].recast_config())
    except ValueError as err:
        raise ParamsError(f"mimic.archs.{arch_name}: {err}") from None
    return {"model": arch.model, "banks": len(plan.banks), "coefficients_per_task": plan.coefficients_per_task,
            "template_params": sum(torch.Size(b.shape).numel() * b.templates for b in plan.banks)}


def validate_all(data: dict[str, Any]) -> dict[str, Any]:
    """Validate all sections; returns the stage plan. Raises ParamsError naming the bad key."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"params: unknown section(s) {unknown}; valid: {sorted(SECTIONS)}")
    v = {name: validate_section(name, model, data) for name, model in SECTIONS.items()}
    rt, prep, pre, mim, tune, comb = (v[k] for k in ("runtime", "prepare", "pretrain", "mimic", "tune", "combine"))
    ev = v["evaluate"]

    tasks = suite_tasks(prep)
    if tune.tasks is not None:
        bad = [t for t in tune.tasks if t not in tasks]
        if bad:
            raise ParamsError(f"tune.tasks: {bad} are not prepared by the '{prep.suite}' suite; choose from {tasks}")
        tasks = list(tune.tasks)
    for section, archs in (("mimic.archs", mim.archs), ("tune.archs", tune.archs)):
        missing = [a for a in archs if a not in pre.archs]
        if missing:
            raise ParamsError(f"{section}: {missing} not defined in pretrain.archs {sorted(pre.archs)}")
    for section, methods in (("tune.methods", tune.methods), ("combine.methods", comb.methods)):
        for name, m in methods.items():
            if m.needs_recast:
                missing = [a for a in (m.archs or tune.archs) if a not in mim.archs]
                if missing:
                    raise ParamsError(f"{section}.{name}: needs RECAST banks for {missing}; add them to mimic.archs")
            for a in m.archs or []:
                if a not in pre.archs:
                    raise ParamsError(f"{section}.{name}.archs: unknown arch {a!r}; defined: {sorted(pre.archs)}")
    bad = [a for a in ev.forgetting_archs if a not in tune.archs]
    if bad:
        raise ParamsError(f"evaluate.forgetting_archs: {bad} not in tune.archs {tune.archs}")
    for arch, names in tune.continual.methods.items():
        if arch not in tune.archs:
            raise ParamsError(f"tune.continual.methods.{arch}: not one of tune.archs {tune.archs}")
        bad = [m for m in names if m not in METHODS]
        if bad:
            raise ParamsError(f"tune.continual.methods.{arch}: unknown {bad}; valid: {sorted(METHODS)}")
    _check_continual_options(tune.continual.options, {m for ms in tune.continual.methods.values() for m in ms})

    plan: dict[str, Any] = {"suite": prep.suite, "tasks": tasks, "device": rt.device}
    plan["mimic"] = {a: _plan_recast(a, pre, mim) for a in mim.archs}
    n = len(tasks) * len(tune.seeds)
    count = lambda methods: {f"{a}/{k}": n for a in tune.archs for k, m in methods.items() if m.archs is None or a in m.archs}
    plan["tune"] = count(tune.methods)
    plan["tune"].update({f"{a}/{m} (sequential)": len(tune.seeds) for a, ms in tune.continual.methods.items()
                         for m in ms})
    plan["combine"] = count(comb.methods)
    plan["jobs"] = {"pretrain": len(pre.archs), "mimic": len(mim.archs), "tune": sum(plan["tune"].values()),
                    "combine": sum(plan["combine"].values())}
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default=None)
    args = ap.parse_args(argv)
    plan = validate_all(read_params(args.params))
    print(json.dumps(plan, indent=2))
    print("params OK")


def _check_continual_options(options: dict[str, dict[str, Any]], used: set[str]) -> None:
    """Each ``tune.continual.options.<method>`` builds that method's config (keys and values)."""
    for name, values in options.items():
        if name not in used:
            raise ParamsError(f"tune.continual.options.{name}: not a method of tune.continual.methods {sorted(used)}")
        cfg_cls = METHODS[name][1]
        if cfg_cls is None:
            if values:
                raise ParamsError(f"tune.continual.options.{name}: method {name!r} takes no options, got {values}")
            continue
        try:
            config_from_mapping(cfg_cls, values)
        except (TypeError, ValueError) as err:
            raise ParamsError(f"tune.continual.options.{name}: {err}") from None


if __name__ == "__main__":
    main()
