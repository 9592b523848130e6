"""Validate every params.yaml section before any compute, and print the stage plan.

``python -m stages.config.validate [--params FILE]`` is the dry run of a configuration (for example
``configs/paper.yaml``): it checks types and unknown keys of every section, that timm knows
every model, that tasks exist in the chosen suite, that each RECAST variant fits its model
(G divides the targeted depth, targets match), lists the jobs each stage would run and
estimates the GPU-hours of the tune and combine jobs (``gpu_estimate``). It downloads
nothing: models are built on the meta device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import timm
import torch

from recast.baselines import METHODS
from recast.baselines.common import config_from_mapping
from recast.data.offline import SPECS as OFFLINE_SPECS
from recast.data.offline import TEST_FRACTION
from recast.targets import build_plan
from stages.config.common import ParamsError, params_error, read_params, section_errors, validate_section
from stages.config.params import SECTIONS, CombineParams, TuneParams, suite_tasks


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


CONFIG_KEY = "config"  # top-level: the name of the conf/config/ file params.yaml was composed from


def validate_all(data: dict[str, Any]) -> dict[str, Any]:
    """Validate all sections; returns the stage plan. Raises one ParamsError naming every
    invalid key of every section (then every failed cross-section check)."""
    errors: list[str] = []
    unknown = sorted(set(data) - set(SECTIONS) - {CONFIG_KEY})
    if unknown:
        errors.append(f"params: unknown section(s) {unknown}; valid: {sorted(SECTIONS)} and '{CONFIG_KEY}'")
    if not isinstance(data.get(CONFIG_KEY, ""), str):
        errors.append(f"{CONFIG_KEY}: the name of a conf/config/ file (got {data[CONFIG_KEY]!r})")
    v = {}
    for name, model in SECTIONS.items():
        section, lines = section_errors(name, model, data)
        v[name] = section
        errors += lines
    if errors:
        raise params_error(errors)
    rt, prep, pre, mim, tune, comb = (v[k] for k in ("runtime", "prepare", "pretrain", "mimic", "tune", "combine"))
    errors = _cross_section_errors(prep, pre, mim, tune, comb, v["evaluate"])
    plan_mimic = {}
    for a in (a for a in mim.archs if a in pre.archs):
        try:
            plan_mimic[a] = _plan_recast(a, pre, mim)
        except ParamsError as err:
            errors.append(str(err))
    if errors:
        raise params_error(errors)
    tasks = list(tune.tasks) if tune.tasks is not None else suite_tasks(prep)

    plan: dict[str, Any] = {"suite": prep.suite, "tasks": tasks, "device": rt.device}
    plan["mimic"] = plan_mimic
    n = len(tasks) * len(tune.seeds)
    def count(methods):
        return {f"{a}/{k}": n for a in tune.archs for k, m in methods.items() if m.archs is None or a in m.archs}
    plan["tune"] = count(tune.methods)
    plan["tune"].update({f"{a}/{m} (sequential)": len(tune.seeds) for a, ms in tune.continual.methods.items()
                         for m in ms})
    plan["combine"] = count(comb.methods)
    plan["jobs"] = {"pretrain": len(pre.archs), "mimic": len(mim.archs), "tune": sum(plan["tune"].values()),
                    "combine": sum(plan["combine"].values())}
    return plan


def _cross_section_errors(prep, pre, mim, tune: TuneParams, comb: CombineParams, ev) -> list[str]:
    """Every failed check between sections, one line each."""
    errors: list[str] = []
    tasks = suite_tasks(prep)
    if tune.tasks is not None:
        bad = [t for t in tune.tasks if t not in tasks]
        if bad:
            errors.append(f"tune.tasks: {bad} are not prepared by the '{prep.suite}' suite; choose from {tasks}")
    for section, archs in (("mimic.archs", mim.archs), ("tune.archs", tune.archs)):
        missing = [a for a in archs if a not in pre.archs]
        if missing:
            errors.append(f"{section}: {missing} not defined in pretrain.archs {sorted(pre.archs)}")
    for section, methods in (("tune.methods", tune.methods), ("combine.methods", comb.methods)):
        for name, m in methods.items():
            if m.needs_recast:
                missing = [a for a in (m.archs or tune.archs) if a not in mim.archs]
                if missing:
                    errors.append(f"{section}.{name}: needs RECAST banks for {missing}; add them to mimic.archs")
            for a in m.archs or []:
                if a not in pre.archs:
                    errors.append(f"{section}.{name}.archs: unknown arch {a!r}; defined: {sorted(pre.archs)}")
    bad = [a for a in ev.forgetting_archs if a not in tune.archs]
    if bad:
        errors.append(f"evaluate.forgetting_archs: {bad} not in tune.archs {tune.archs}")
    for arch, names in tune.continual.methods.items():
        if arch not in tune.archs:
            errors.append(f"tune.continual.methods.{arch}: not one of tune.archs {tune.archs}")
        if "recast" in names and arch not in mim.archs:
            errors.append(f"tune.continual.methods.{arch}: 'recast' needs RECAST banks; add {arch!r} to mimic.archs")
        bad = [m for m in names if m not in METHODS]
        if bad:
            errors.append(f"tune.continual.methods.{arch}: unknown {bad}; valid: {sorted(METHODS)}")
    for check in (lambda: _check_continual_options(tune.continual.options,
                                                   {m for ms in tune.continual.methods.values() for m in ms}),
                  lambda: check_lr_coverage(tune, comb)):
        try:
            check()
        except ParamsError as err:
            errors.append(str(err))
    return errors


# Official train(+val) images of the paper's tasks (public dataset sizes); val is carved from them.
PAPER_TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "flowers102": 2040, "aircraft": 6667, "indoor67": 5360,
                      "cub200": 5994}
SECONDS_PER_STEP = 0.1  # assumed: one training step (batch 128, 224 px, ViT-S / ResNet-34) on one GPU


def gpu_estimate(data: dict[str, Any], plan: dict[str, Any], seconds_per_step: float = SECONDS_PER_STEP) -> dict:
    """GPU-hours the tune and combine jobs reserve: per job ``epochs x ceil(train images /
    batch_size) x seconds_per_step`` (train images: ``limit_train``, else the task's train split
    after val is carved), times ``runtime.gpus_per_task``; sequential baselines train on every
    task for ``train.epochs`` (the same budget). Evaluation passes are not counted."""
    rt, prep, tune = (validate_section(k, SECTIONS[k], data) for k in ("runtime", "prepare", "tune"))
    tr = tune.train

    def train_images(task: str) -> int:
        if tr.limit_train is not None:
            return tr.limit_train
        if prep.suite == "paper":
            return int(PAPER_TRAIN_IMAGES[task] * (1 - prep.val_fraction))
        return int(OFFLINE_SPECS[task].size * (1 - TEST_FRACTION) * (1 - prep.val_fraction))

    steps = {t: math.ceil(train_images(t) / tr.batch_size) for t in plan["tasks"]}
    per_task_job = sum(tr.epochs * n for n in steps.values()) / len(steps) * seconds_per_step
    seq_job = sum(tr.epochs * n for n in steps.values()) * seconds_per_step  # equal budget
    n_task_jobs = plan["jobs"]["tune"] + plan["jobs"]["combine"]
    n_seq = sum(v for k, v in plan["tune"].items() if k.endswith("(sequential)"))
    job_seconds = (n_task_jobs - n_seq) * per_task_job + n_seq * seq_job
    return {"jobs": n_task_jobs, "steps_per_epoch": steps, "assumed_seconds_per_step": seconds_per_step,
            "mean_job_hours": round(per_task_job / 3600, 3), "gpus_per_task": rt.gpus_per_task,
            "gpu_hours": round(job_seconds * rt.gpus_per_task / 3600, 1), "job_hours": round(job_seconds / 3600, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default=None)
    ap.add_argument("--seconds-per-step", type=float, default=SECONDS_PER_STEP,
                    help=f"assumed time of one training step on one GPU (default {SECONDS_PER_STEP})")
    args = ap.parse_args(argv)
    try:
        data = read_params(args.params)
        plan = validate_all(data)
    except ParamsError as err:  # the message names every bad key: a traceback would only bury it
        print(err, file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2))
    est = gpu_estimate(data, plan, args.seconds_per_step)
    print(f"GPU estimate (tune + combine): {est['jobs']} jobs x {est['mean_job_hours']:.3f} h per per-task job "
          f"(epochs x steps/epoch {est['steps_per_epoch']} x an assumed {est['assumed_seconds_per_step']} s/step; "
          f"sequential baselines over every task) = {est['job_hours']} job-hours; x gpus_per_task "
          f"{est['gpus_per_task']} = {est['gpu_hours']} GPU-hours reserved")
    print("params OK")
    return 0


def check_lr_coverage(tune: TuneParams, comb: CombineParams) -> None:
    """With ``tune.lr_by_method``, every method that runs (tune and combine per arch, the
    sequential baselines) has its learning rate there: a missing one names its key."""
    if tune.lr_by_method is None:
        return
    for arch in tune.archs:
        names = [n for methods in (tune.methods, comb.methods) for n, m in methods.items()
                 if m.archs is None or arch in m.archs]
        for name in names + list(tune.continual.methods.get(arch, [])):
            tune.lr_for(arch, name)


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
    sys.exit(main())
