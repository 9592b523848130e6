"""Sweep configurations: one pydantic model per sweep, read from a small YAML file.

Every model forbids unknown keys (``stages.config.common.Section``), so a typo fails at once with the
key named (``gn.pairs.0: ...``). The defaults are tiny (a few epochs on a few hundred examples of
one task) so that each sweep runs in a minute or two on two CPU cores; the YAML files under
``pipelines/configs/`` spell them out.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from stages.config.common import ParamsError, Section, read_params, resolve, validate_section
from stages.config.params import (
    CombineParams,
    MethodParams,
    MimicArch,
    PretrainParams,
    RuntimeParams,
    TrainParams,
    TuneParams,
)
from stages.jobs.backbones import pretrained_meta

SweepName = Literal["gn", "k", "targets", "budget", "order", "seeds", "hpo"]
SWEEP_NAMES: tuple[str, ...] = ("gn", "k", "targets", "budget", "order", "seeds", "hpo")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Tiny tuning recipe shared by the default sweep configs: a few epochs on a few hundred images.
TINY_TRAIN = TrainParams(epochs=3, lr=0.01, step_size=10, batch_size=64, limit_train=384, limit_eval=None)


class AdapterSpec(Section):
    """An adapter preset of ``recast.adapters`` with field overrides (``rank``, ``targets``)."""

    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        self.config()
        return self

    def config(self):
        from recast.adapters import adapter_preset

        try:
            return adapter_preset(self.preset, **self.overrides)
        except TypeError as err:  # an unknown override field
            raise ValueError(f"adapter preset {self.preset!r}: {err}") from None


class TrialMethod(Section):
    """One row of the parameter-budget sweep: head only (neither part), RECAST (``recast``),
    an adapter on the plain backbone (``adapter``) or both, i.e. paper eq. 6."""

    recast: MimicArch | None = None
    adapter: AdapterSpec | None = None
    lr: float | None = Field(None, gt=0)

    @property
    def family(self) -> str:
        """``head_only``, ``recast``, the adapter kind (``lora``) or ``recast+<kind>``."""
        if self.adapter is None:
            return "recast" if self.recast is not None else "head_only"
        kind = self.adapter.config().kind
        return f"recast+{kind}" if self.recast is not None else kind


class SweepBase(Section):
    """Settings every sweep shares.

    Attributes:
        arch: a backbone of the pipeline (``outputs/pretrain/<arch>.json``).
        tasks, seeds: every trial runs once per task and seed.
        train: the per-task tuning recipe (``tune.train`` of params.yaml).
        apply_seed: seed of ``recast.apply`` (template/coefficient init before mimicry).
        runtime: overrides of params.yaml's ``runtime`` section (``cache_dir``, ``num_cpus``...).
        out_dir: tables and plots go to ``<out_dir>/<sweep>/``.
    """

    arch: str = "vit"
    tasks: list[str] = Field(default_factory=lambda: ["mnist_lo5"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    train: TrainParams = TINY_TRAIN
    apply_seed: int = 0
    data_dir: str = "data/prepared/offline"
    pretrain_dir: str = "outputs/pretrain"
    out_dir: str = "outputs/sweeps"
    runtime: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tasks", "seeds")
    @classmethod
    def _unique(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"entries must be unique, got {v}")
        return v

    @field_validator("runtime")
    @classmethod
    def _runtime_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        RuntimeParams.model_validate(v)  # unknown or ill-typed keys fail here, named
        return v


def _no_swept_overrides(recast: MimicArch, swept: tuple[str, ...]) -> None:
    clash = sorted(set(recast.overrides) & set(swept))
    if clash:
        raise ValueError(f"recast.overrides sets {clash}, which this sweep varies; remove them")


class GnSweep(SweepBase):
    """G groups x n templates at constant template parameters (paper Fig. 7, left).

    Template parameters are G * n * (weight size) per module role, so pairs with the same
    product G * n cost the same; the table groups them by that product.
    """

    recast: MimicArch = MimicArch(preset="recast_att_mlp")
    pairs: list[tuple[int, int]] = Field(min_length=1)
    coef_sets: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self):
        _no_swept_overrides(self.recast, ("groups", "templates", "coef_sets"))
        for g, n in self.pairs:
            if g < 1 or n < 1:
                raise ValueError(f"pairs: G and n must be >= 1, got ({g}, {n})")
        if len(set(self.pairs)) != len(self.pairs):
            raise ValueError(f"pairs must be unique, got {self.pairs}")
        return self


class KSweep(SweepBase):
    """K coefficient sets at fixed G and n (paper Fig. 7, right)."""

    recast: MimicArch = MimicArch(preset="recast_att_mlp", overrides={"groups": 3, "templates": 2})
    coef_sets: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        _no_swept_overrides(self.recast, ("coef_sets",))
        if any(k < 1 for k in self.coef_sets) or len(set(self.coef_sets)) != len(self.coef_sets):
            raise ValueError(f"coef_sets must be unique integers >= 1, got {self.coef_sets}")
        return self


class TargetsSweep(SweepBase):
    """Attention vs MLP targets: one RECAST preset per trial, with shared overrides."""

    presets: list[str] = Field(min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    mimicry: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        for name in self.presets:
            MimicArch(preset=name, overrides=self.overrides, mimicry=self.mimicry)
        return self

    def variant(self, name: str) -> MimicArch:
        return MimicArch(preset=name, overrides=self.overrides, mimicry=self.mimicry)


class BudgetSweep(SweepBase):
    """Parameters per task vs accuracy for head-only, LoRA, RECAST and RECAST+LoRA (paper Fig. 3)."""

    methods: dict[str, TrialMethod] = Field(min_length=1)


class OrderSweep(SweepBase):
    """Task order: RECAST trained task after task in one model (order invariant by construction)
    and sequential continual-learning baselines (``recast.baselines``) over every order."""

    tasks: list[str] = Field(min_length=2)
    orders: list[list[str]] | None = None
    recast: MimicArch | None = MimicArch(preset="recast_att_mlp", overrides={"groups": 3})
    continual: list[str] = Field(default_factory=list)
    continual_epochs: int = Field(3, ge=1)
    continual_lr: float = Field(1e-3, gt=0)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        from recast.baselines import METHODS

        unknown = [m for m in self.continual if m not in METHODS]
        if unknown:
            raise ValueError(f"continual: unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        for order in self.orders or []:
            if sorted(order) != sorted(self.tasks):
                raise ValueError(f"orders: {order} is not a permutation of tasks {self.tasks}")
        if self.recast is None and not self.continual:
            raise ValueError("nothing to run: set recast and/or continual")
        return self

    def task_orders(self) -> list[list[str]]:
        """The orders to run: ``orders`` or every permutation of ``tasks``."""
        return [list(o) for o in (self.orders or itertools.permutations(self.tasks))]


class SeedsSweep(SweepBase):
    """Seeds: the standard per-task methods of the tune stage (``stages.jobs.train.tune_job``)."""

    seeds: list[int] = Field(default_factory=lambda: [42, 1998, 3142592], min_length=1)
    methods: dict[str, MethodParams] = Field(min_length=1)
    mimic_dir: str = "outputs/mimic"


class HpoSweep(SweepBase):
    """The learning-rate rule of a pipeline configuration: every method of ``params`` (a pipeline
    config: params.yaml or a ``conf/config/`` file) on ``arch``, scored on EVERY task of that
    config at its own recipe (``tune.train``), over one shared lr grid.

    One Tuner per method and seed, ``num_samples`` random lrs from the log-uniform ``lr`` range
    (``search_seed``: the same lrs for every method). A trial runs the pipeline's own job:
    a per-task method (``tune``/``combine`` methods) is trained on each task in turn
    (``stages.jobs.train.tune_job``) and scored by the mean validation accuracy over the tasks;
    a sequential baseline (``tune.continual``) runs the whole task stream
    (``stages.jobs.sequential.continual_job``) and is scored by the mean validation accuracy of
    every task at the end of the stream, so forgetting counts. A trial reports after each task
    (the mean over the tasks so far); with ``asha``, ASHA compares trials at those task rungs and
    stops the ones that trail. Test accuracy is recorded, never used.

    Attributes:
        params: the pipeline configuration whose methods, tasks, recipe and inputs (prepared
            data, pretrained backbone, mimicked banks) are used.
        methods: a subset of the config's method names (default: every method it runs on arch;
            RECAST's sequential run shares the per-task RECAST lr and is not searched).
        lr: the shared log-uniform lr range.
        grace_period, reduction_factor: ASHA's first rung (in tasks) and its halving rate.
        search_seed: seed of the random search (the same lrs with and without ASHA).
    """

    params: str = "params.yaml"
    methods: list[str] | None = None
    lr: tuple[float, float] = (1e-4, 1e-1)
    num_samples: int = Field(6, ge=1)
    asha: bool = True
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    search_seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.lr
        if not 0 < lo <= hi:
            raise ValueError(f"lr: need 0 < low <= high, got [{lo}, {hi}]")
        from_params = sorted({"tasks", "train", "data_dir", "pretrain_dir"} & self.model_fields_set)
        if from_params:
            raise ValueError(f"{', '.join(from_params)}: taken from the pipeline config ({self.params}); remove")
        return self

    def pipeline(self) -> tuple[Any, dict[str, Any]]:
        """(``TuneParams`` of ``params`` for this arch and the sweep's seeds, every per-task
        method of its tune and combine sections on the arch by name)."""
        data = read_params(resolve(self.params))
        tp = validate_section("tune", TuneParams, data)
        if self.arch not in tp.archs:
            raise ParamsError(f"arch: {self.arch!r} is not one of {self.params}'s tune.archs {tp.archs}")
        tp = tp.model_copy(update={"archs": [self.arch], "seeds": list(self.seeds)})
        per_task = dict(tp.methods)
        if "combine" in data:
            per_task.update(validate_section("combine", CombineParams, data).methods)
        per_task = {n: m for n, m in per_task.items() if m.archs is None or self.arch in m.archs}
        continual = [n for n in tp.continual.methods.get(self.arch, []) if n != "recast"]
        known = [*per_task, *continual]
        if self.methods is not None:
            unknown = [n for n in self.methods if n not in known]
            if unknown:
                raise ParamsError(f"methods: {unknown} not run on {self.arch} by {self.params}; it runs {known}")
            per_task = {n: m for n, m in per_task.items() if n in self.methods}
            continual = [n for n in continual if n in self.methods]
        return tp, {"per_task": per_task, "continual": continual}


def check_backbone(cfg: HpoSweep) -> None:
    """The workspace must hold the backbone of ``cfg.params``, not another config's: the
    pretrained epochs recorded in ``<pretrain_dir>/<arch>.json`` must be the config's."""
    data = read_params(resolve(cfg.params))
    if "pretrain" not in data:
        return
    pp = validate_section("pretrain", PretrainParams, data)
    if pp.source != "train" or cfg.arch not in pp.archs:
        return
    want = pp.archs[cfg.arch].epochs or pp.epochs
    pretrain_dir = resolve(validate_section("tune", TuneParams, data).pretrain_dir)
    got = pretrained_meta(pretrain_dir, cfg.arch).get("epochs")
    if got != want:
        raise ParamsError(f"params: {pretrain_dir / cfg.arch}.json was pretrained for {got} epochs, "
                          f"{cfg.params} says {want}: run that config's pipeline up to mimic first "
                          f"(dvc exp run -S config=<name>, or dvc repro mimic with it as params.yaml)")


SWEEPS: dict[str, type[SweepBase]] = {
    "gn": GnSweep, "k": KSweep, "targets": TargetsSweep, "budget": BudgetSweep, "order": OrderSweep,
    "seeds": SeedsSweep, "hpo": HpoSweep,
}


def load_config(sweep: str, path: str | os.PathLike | None = None) -> SweepBase:
    """Read and validate the YAML of ``sweep`` (default ``pipelines/configs/<sweep>.yaml``)."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose one of {SWEEP_NAMES}")
    path = Path(path) if path is not None else CONFIG_DIR / f"{sweep}.yaml"
    if not path.exists():
        raise ParamsError(f"sweep config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return validate_section(sweep, SWEEPS[sweep], {sweep: data})


def runtime_params(cfg: SweepBase, params_path: str | os.PathLike | None = None,
                   num_cpus: int | None = None) -> RuntimeParams:
    """params.yaml's ``runtime`` section, overridden by the sweep's ``runtime`` (and ``num_cpus``)."""
    base = dict(read_params(params_path).get("runtime") or {})
    merged = {**base, **cfg.runtime, **({"num_cpus": num_cpus} if num_cpus is not None else {})}
    return validate_section("runtime", RuntimeParams, {"runtime": merged})
