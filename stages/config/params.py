"""Every section of params.yaml as a pydantic model, in one place.

``SECTIONS`` maps each section name onto its model. Unknown keys, wrong types, booleans where a
number is expected and non-finite floats (``.inf``, ``.nan``) are errors that name the key
(``stages.config.common.validate_section``). Cross-section checks and the stage plan live in
``stages.config.validate``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator

from recast.adapters import adapter_preset
from recast.config import MimicryConfig
from recast.data import OFFLINE_TASKS, PAPER_TASKS
from recast.presets import PRESET_NAMES, preset
from recast.training import Precision, PrecisionError, TuneConfig
from stages.config.common import ParamsError, Section

PosInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
STORAGE_SCHEMES = ("s3://", "gs://", "file://")


def _unique(v: list | None) -> list | None:
    if v is not None and len(set(v)) != len(v):
        dup = sorted({x for x in v if v.count(x) > 1})
        raise ValueError(f"lists {dup} more than once")
    return v


# ----------------------------------------------------------------------------- runtime
class RuntimeParams(Section):
    """``runtime``: Ray resources, retries, device, precision, MLflow experiment, job cache.

    Ray is local unless RAY_ADDRESS is set (then ``num_cpus`` is ignored: the cluster's count);
    MLflow uses an sqlite store under the repo unless MLFLOW_TRACKING_URI is set. Jobs get their
    inputs through Ray's object store, or from ``storage`` (``s3://``, ``gs://``, ``file://``)
    when set (``stages.jobs.inputs``); the sweeps also keep their Ray Tune experiments there (None:
    ``<cache_dir>/tune`` on the driver's disk). ``gpus_per_task`` is a fraction of one GPU (several jobs
    share it) or a whole number; ``device: auto`` gives jobs cuda exactly when it is > 0.
    A stage with at most ``inline_jobs`` jobs left to compute runs them in its own process,
    without starting a local Ray (never with RAY_ADDRESS set; 0: always Ray).
    Every job runs with ``torch_threads`` torch threads, in-process and on Ray alike (and
    ``stages.registry reproduce`` with the job's recorded count): float sums depend on it.
    ``precision`` (``fp32``, ``bf16``, ``fp16``: CUDA only) is the autocast dtype of tune, combine,
    the sequential baselines and evaluate's reload check (``recast.training.autocast``); banks,
    coefficients, heads and payloads stay fp32 and mimicry always runs in fp32/fp64.
    """

    num_cpus: PosInt = 2
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(0.0, ge=0)
    max_retries: NonNegInt = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    experiment: str = "recast"
    cache_dir: str = "outputs/.jobcache"
    progress: bool = True
    storage: str | None = None
    inline_jobs: NonNegInt = 1
    torch_threads: PosInt = 1
    precision: Precision = "fp32"

    @field_validator("gpus_per_task")
    @classmethod
    def _gpu_share(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"{v}: Ray takes a fraction of one GPU (0 < x <= 1) or a whole number of GPUs")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(STORAGE_SCHEMES):
            raise ValueError(f"{v!r}: a URI every node can read, starting with one of {list(STORAGE_SCHEMES)}")
        return v

    @model_validator(mode="after")
    def _threads_fit_the_job(self):
        if self.torch_threads > max(1, math.ceil(self.cpus_per_task)):
            raise ValueError(f"torch_threads {self.torch_threads} > cpus_per_task {self.cpus_per_task}: a job would run "
                             f"more threads than the CPUs Ray reserves for it")
        return self

    @model_validator(mode="after")
    def _device_has_gpu(self):
        if self.device == "cuda" and self.gpus_per_task == 0:
            raise ValueError("device 'cuda' needs gpus_per_task > 0 (Ray gives a job a GPU only when it asks)")
        return self

    @model_validator(mode="after")
    def _fp16_needs_cuda(self):
        if self.precision == "fp16" and (self.device == "cpu" or self.gpus_per_task == 0):
            raise ValueError(f"precision: {PrecisionError('fp16', 'cpu')} (runtime.device {self.device!r}, "
                             f"gpus_per_task {self.gpus_per_task})")
        return self


# ----------------------------------------------------------------------------- prepare
class PrepareParams(Section):
    """``prepare``: which suite to build, from where, at what size."""

    suite: Literal["offline", "paper"] = "offline"
    out_dir: str = "data/prepared"
    data_root: str | None = None
    tasks: list[str] | None = None
    seed: StrictInt = 0
    val_fraction: float = 0.1
    image_size: Annotated[StrictInt, Field(ge=8)] = 32
    download: bool = False

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, v: float) -> float:
        if not 0.0 < v < 0.5:
            raise ValueError(f"must be in (0, 0.5), got {v}")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks_unique(cls, v: list[str] | None) -> list[str] | None:
        return _unique(v)


def suite_tasks(params: PrepareParams) -> list[str]:
    """The tasks to build, in the configured order; unknown names raise ParamsError naming ``prepare.tasks``."""
    available = OFFLINE_TASKS if params.suite == "offline" else PAPER_TASKS
    if params.tasks is None:
        return list(available)
    if not params.tasks:
        raise ParamsError("prepare.tasks: empty list; use null for every task of the suite")
    unknown = [t for t in params.tasks if t not in available]
    if unknown:
        raise ParamsError(
            f"prepare.tasks: unknown task(s) {unknown} for suite {params.suite!r}; choose from {list(available)}"
        )
    return list(params.tasks)


# ----------------------------------------------------------------------------- pretrain
class ArchParams(Section):
    """A backbone: timm model name (as timm spells it) and its create_model kwargs."""

    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint_file: str | None = None
    epochs: PosInt | None = None
    lr: float | None = Field(None, gt=0)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        import timm  # noqa: PLC0415 - timm's model registry costs ~1 s; only a pretrain section needs it

        if not timm.is_model(v):
            raise ValueError(f"unknown timm model {v!r}")
        return v


class PretrainParams(Section):
    """``pretrain``: train the tiny backbones on the source set, or take timm's weights."""

    source: Literal["train", "timm"] = "train"
    archs: dict[str, ArchParams]
    data_dir: str = "data/prepared/offline"
    out_dir: str = "outputs/pretrain"
    epochs: PosInt = 6
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: PosInt = 128
    image_size: Annotated[StrictInt, Field(ge=8)] = 32
    limit: PosInt | None = None
    seed: StrictInt = 0


# ----------------------------------------------------------------------------- mimic
class MimicArch(Section):
    """RECAST variant of one backbone: a preset name plus RecastConfig overrides."""

    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    mimicry: dict[str, Any] = Field(default_factory=dict)
    ablations: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESET_NAMES:
            raise ValueError(f"unknown RECAST preset {v!r}; choose from {list(PRESET_NAMES)}")
        return v

    def recast_config(self):
        return preset(self.preset, **self.overrides)

    @model_validator(mode="after")
    def _check(self):
        try:
            self.recast_config()
            MimicryConfig(**self.mimicry)
        except (ValueError, TypeError) as err:
            raise ValueError(str(err)) from None
        for name, m in self.ablations.items():
            try:
                MimicryConfig(**{**self.mimicry, **m})
            except (ValueError, TypeError) as err:
                raise ValueError(f"ablations.{name}: {err}") from None
        return self


class MimicParams(Section):
    """``mimic``: Neural Mimicry per architecture."""

    archs: dict[str, MimicArch]
    pretrain_dir: str = "outputs/pretrain"
    data_dir: str = "data/prepared/offline"
    out_dir: str = "outputs/mimic"
    feature_batch: PosInt = 32
    image_size: Annotated[StrictInt, Field(ge=8)] = 32
    eval_limit: PosInt | None = None
    seed: StrictInt = 0


# ----------------------------------------------------------------------------- tune / combine
class MethodParams(Section):
    """One method row (see ``recast.recipes.MethodSpec``)."""

    kind: Literal["head_only", "full", "recast", "adapter"]
    adapter: str | None = None
    recast: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict)
    lr: float | None = Field(None, gt=0)
    archs: list[str] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind != "adapter":
            given = [k for k in ("adapter", "recast", "overrides") if getattr(self, k)]
            if given:
                raise ValueError(f"{given} only apply to kind 'adapter', not {self.kind!r}")
            return self
        if not self.adapter:
            raise ValueError("kind 'adapter' needs 'adapter: <preset>'")
        try:
            adapter_preset(self.adapter, **self.overrides)
        except (ValueError, TypeError) as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def needs_recast(self) -> bool:
        """Whether the method runs on the RECAST form of the backbone (needs the mimic outputs)."""
        return self.kind == "recast" or self.recast


class TrainParams(Section):
    """Per-task training recipe (paper: 100 epochs, AdamW 2e-3, wd 1e-6, StepLR 33/0.1, clip 1)."""

    epochs: PosInt = 100
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    step_size: PosInt = 33
    gamma: float = Field(0.1, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: PosInt = 128
    image_size: Annotated[StrictInt, Field(ge=8)] = 32
    limit_train: PosInt | None = None
    limit_eval: PosInt | None = None

    def recipe(self, device: str, lr: float | None = None) -> TuneConfig:
        """The ``recast.training.TuneConfig`` of this recipe (``lr`` overrides the recipe's)."""
        return TuneConfig(epochs=self.epochs, lr=lr or self.lr, weight_decay=self.weight_decay,
                          step_size=self.step_size, gamma=self.gamma, grad_clip=self.grad_clip,
                          device=device, progress=False)


BUDGET_KEYS = ("epochs", "lr", "step_size", "gamma", "weight_decay")


class ContinualParams(Section):
    """Sequential continual-learning baselines (recast.baselines): methods per architecture.

    Equal budget: they train with ``tune.train`` (``train_for(arch)``: epochs, schedule, weight
    decay, clipping), as the per-task methods do, at the learning rate of ``tune.lr_by_method``
    (else ``tune.train.lr``). A budget key of their own (``epochs``, ``lr``...) is an error."""

    methods: dict[str, list[str]] = Field(default_factory=dict)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_own_budget(cls, data: Any) -> Any:
        if isinstance(data, dict):
            own = [k for k in BUDGET_KEYS if k in data]
            if own:
                raise ValueError(f"{own[0]}: the sequential baselines train with tune.train (equal budget for "
                                 f"every method); remove tune.continual.{own[0]} (learning rates: tune.lr_by_method)")
        return data


class LrByMethod(Section):
    """``tune.lr_by_method``: the learning rate of every method, per arch, chosen by one rule (the
    ``hpo`` sweep, ``python -m pipelines.sweep --sweep hpo``: the best mean validation accuracy over
    every task of the config, one shared lr grid, the pipeline's own jobs), one sweep per arch.
    ``source.<arch>`` names where that arch's values come from (``hpo:<sweep key>``; the ``lr.source`` tag of each job's MLflow run)."""

    source: dict[str, Annotated[str, Field(min_length=1)]]
    archs: dict[str, dict[str, Annotated[float, Field(gt=0)]]] = Field(min_length=1)

    @model_validator(mode="after")
    def _sources(self):
        missing = sorted(set(self.archs) - set(self.source))
        if missing:
            raise ValueError(f"source.{missing[0]}: missing; name the sweep its lrs come from (hpo:<sweep key>)")
        return self


class TuneParams(Section):
    """``tune``: every method on every task and seed, plus the sequential baselines."""

    archs: list[str] = Field(min_length=1)
    tasks: list[str] | None = Field(None, min_length=1)
    seeds: list[StrictInt] = Field(default_factory=lambda: [42], min_length=1)
    methods: dict[str, MethodParams]
    train: TrainParams = TrainParams()
    train_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    continual: ContinualParams = ContinualParams()
    lr_by_method: LrByMethod | None = None
    data_dir: str = "data/prepared/offline"
    pretrain_dir: str = "outputs/pretrain"
    mimic_dir: str = "outputs/mimic"
    out_dir: str = "outputs/tune"

    @field_validator("archs", "tasks", "seeds")
    @classmethod
    def _unique_lists(cls, v: list | None) -> list | None:
        return _unique(v)

    @model_validator(mode="after")
    def _check_overrides(self):
        for arch in self.train_overrides:
            if arch not in self.archs:
                raise ValueError(f"train_overrides.{arch}: not one of archs {self.archs}")
            self.train_for(arch)
        if self.lr_by_method is not None:
            for arch in self.lr_by_method.archs:
                if arch not in self.archs:
                    raise ValueError(f"lr_by_method.archs.{arch}: not one of archs {self.archs}")
            for name, m in self.methods.items():
                if m.lr is not None:
                    raise ValueError(f"methods.{name}.lr: set with lr_by_method; one lr rule for every method, "
                                     f"put it in lr_by_method.archs.<arch>.{name}")
        return self

    def lr_for(self, arch: str, method: str) -> tuple[float, str]:
        """(learning rate, its source) of ``method`` on ``arch``: ``lr_by_method`` when set (a
        missing entry is an error, see ``check_lr_coverage``), else ``tune.train``'s."""
        if self.lr_by_method is None:
            return self.train_for(arch).lr, "params:tune.train.lr"
        table = self.lr_by_method.archs.get(arch, {})
        if method not in table:
            raise ParamsError(f"tune.lr_by_method.archs.{arch}.{method}: missing; every method that runs needs "
                              f"its lr from the hpo sweep")
        return table[method], self.lr_by_method.source[arch]

    def train_for(self, arch: str) -> TrainParams:
        """The training recipe of ``arch``: ``train`` with ``train_overrides.<arch>`` applied
        (e.g. the paper's ResNet batch size 64)."""
        values = self.train_overrides.get(arch)
        if not values:
            return self.train
        try:
            return TrainParams.model_validate({**self.train.model_dump(), **values})
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"train_overrides.{arch}.{key}: {first['msg']} (got {first.get('input')!r})") from None


class CombineParams(Section):
    """``combine``: adapters alone and with RECAST (eq. 6); recipe, tasks and seeds from ``tune``."""

    methods: dict[str, MethodParams]
    out_dir: str = "outputs/combine"


# ----------------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    """``evaluate``: the report and the continual-learning forgetting check."""

    report_dir: str = "reports"
    forgetting_archs: list[str] = Field(default_factory=list)
    forgetting_method: Literal["recast"] = "recast"


SECTIONS: dict[str, type[Section]] = {
    "runtime": RuntimeParams,
    "prepare": PrepareParams,
    "pretrain": PretrainParams,
    "mimic": MimicParams,
    "tune": TuneParams,
    "combine": CombineParams,
    "evaluate": EvaluateParams,
}
