"""Configuration objects of the library (frozen dataclasses, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TemplatesSpec = int | Literal["group_size"]
BatchNormStats = Literal["frozen", "per_task"]


@dataclass(frozen=True)
class RecastConfig:
    """How a model is rewritten into template banks + per-task coefficients.

    Attributes:
        targets: module patterns to template. Each is an exact module name, a ``.suffix``
            (``"mlp.fc1"`` matches ``blocks.3.mlp.fc1``) or, with ``regex=True``, a regular
            expression matched against the full name with ``re.fullmatch``.
        exclude: patterns (same syntax) removed from the matches.
        groups: G, the number of groups of consecutive layers per stack (paper eq. 1). Must
            divide the number of targeted layers of every stack.
        templates: n, templates per bank, or ``"group_size"`` for n = layers per group
            (the paper's ResNet scheme: n = B - 1 per stage).
        coef_sets: K, coefficient sets per module (paper eq. 2). Eq. 2 averages them, so only
            their mean reaches the weight and K > 1 adds no expressiveness. Every set gets the
            same gradient (1/K of the mean's); sets that start equal (closed-form mimicry, the
            ``copy`` init of ``add_task``) stay equal, and under Adam/AdamW/RMSprop (invariant
            to the scale of each parameter's gradient) even sets that start apart move their
            mean as K=1 would, up to the optimiser's epsilon. K therefore changes only the
            initial mean (the paper's init averages K random unit vectors), the mimicry noise
            on the mean (std / sqrt(K)) and the gradient norm that clipping sees (1/sqrt(K)
            of K=1's for the coefficients). Under plain SGD it divides the mean's step by K.
        regex: interpret ``targets``/``exclude`` as regular expressions.
        min_layer: layers with a smaller index inside their stack are left untouched (the
            ResNet scheme keeps block 0 of every stage, with its stride/downsample, ordinary).
        base_task: name of the task that holds the pretrained head and the reconstructed
            coefficients every new task starts from.
        fan_out_roles: module roles (``attn.qkv``, or a suffix of the role) whose templates get
            kaiming-normal init with fan_out; every other bank uses fan_in. The default follows
            the authors' code: fan_out for the fused qkv, fan_in for MLP and conv templates.
        bn_stats: what happens to BatchNorm running statistics (models without BatchNorm are
            not affected). ``"frozen"`` (default): every BatchNorm layer keeps frozen statistics
            whatever mode it is put in (``RecastModel.train()``, ``rc.model.train()`` of an
            outside trainer; ``recast.layers.FrozenStatistics``), so BatchNorm always normalises
            with the pretrained statistics and no task can change them. ``"per_task"``: every
            task owns a copy of the statistics (running mean, running variance and the batch
            counter), switched by ``set_task``, updated in train mode for the active task only,
            stored in the task's payload and counted in its bytes. The authors' code tunes
            ResNet tasks in train mode, so their statistics change per task without being
            stored or counted; neither option here does that.
    """

    targets: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    groups: int = 6
    templates: TemplatesSpec = 2
    coef_sets: int = 2
    regex: bool = False
    min_layer: int = 0
    base_task: str = "pretrained"
    fan_out_roles: tuple[str, ...] = ("attn.qkv",)
    bn_stats: BatchNormStats = "frozen"

    def __post_init__(self) -> None:
        if isinstance(self.fan_out_roles, str):
            object.__setattr__(self, "fan_out_roles", (self.fan_out_roles,))
        object.__setattr__(self, "fan_out_roles", tuple(self.fan_out_roles))
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.targets:
            raise ValueError("RecastConfig.targets is empty: give at least one module pattern")
        _check_int("groups", self.groups, minimum=1)
        if self.templates != "group_size":
            _check_int("templates", self.templates, minimum=1, hint="or 'group_size'")
        _check_int("coef_sets", self.coef_sets, minimum=1)
        _check_int("min_layer", self.min_layer, minimum=0)
        if not self.base_task or not isinstance(self.base_task, str):
            raise ValueError(f"RecastConfig.base_task must be a non-empty string, got {self.base_task!r}")
        _check_choice("bn_stats", self.bn_stats, ("frozen", "per_task"))


@dataclass(frozen=True)
class MimicryConfig:
    """Neural Mimicry: reconstruct pretrained weights as templates x coefficients.

    Attributes:
        method: ``"closed_form"`` (SVD basis per bank: exact when n >= layers per group, best
            rank-n Frobenius fit otherwise), ``"gradient"`` (the paper's procedure from the
            paper's random init), ``"refine"`` (gradient steps starting from the closed form) or
            ``"vae"`` (the paper's reconstructor ablation: an encoder maps each reference weight
            to its coefficients, the bank decodes them; see ``recast.mimicry_vae``).
        loss: ``"smooth_l1"`` (paper, beta 1, mean reduction) or ``"mse"``.
        role_weights: loss weight per module role suffix (e.g. ``{"conv1": 3.5}``); roles not
            listed get ``default_weight`` (paper ViT: 2.0).
        noise_std: std of Gaussian noise added to every coefficient set in each step (paper
            ViT: 1e-4); the mean of K independent sets, which is what eq. 2 uses, gets
            std / sqrt(K).
        lr, step_size, gamma, steps, grad_clip: RMSprop + StepLR schedule (paper ViT: 0.1,
            200, 0.1, 1000, 1.0; ResNet: 0.2, 500, 0.1, 3000, 1.0).
        seed: seed of the random init and the noise (a local generator; no global seeding).
        eval_every: with ``best_state="clean"``, the noise-free loss is evaluated every this
            many steps and after the last one (1: every step, which costs about a sixth more
            time and a copy of the templates per improvement).
        best_state: which state gradient mimicry keeps. ``"clean"`` (default): the lowest
            noise-free loss among the start and the states checked every ``eval_every`` steps.
            ``"noisy"`` (the authors' code): the lowest noisy training loss, compared at every
            step on the state before that step's update; the state after the last update is
            never a candidate, and ``eval_every`` is not used.
        vae_hidden: ``"vae"``: width of the encoder's two hidden layers (authors' code: 8).
            The ``"vae"`` method uses ``loss``, ``lr`` (authors: 2e-3), ``steps`` (authors:
            2500), ``grad_clip`` and ``seed`` with RMSprop and cosine annealing over ``steps``;
            it ignores ``role_weights``, ``default_weight``, ``noise_std``, ``step_size``,
            ``gamma``, ``eval_every`` and ``best_state`` (it keeps the state of highest mean
            weight cosine).
        progress: show a tqdm bar during gradient steps.
    """

    method: Literal["closed_form", "gradient", "refine", "vae"] = "closed_form"
    loss: Literal["smooth_l1", "mse"] = "smooth_l1"
    default_weight: float = 2.0
    role_weights: dict[str, float] = field(default_factory=dict)
    noise_std: float = 1e-4
    lr: float = 0.1
    step_size: int = 200
    gamma: float = 0.1
    steps: int = 1000
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int = 10
    best_state: Literal["clean", "noisy"] = "clean"
    vae_hidden: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("method", self.method, ("closed_form", "gradient", "refine", "vae"))
        _check_int("eval_every", self.eval_every, minimum=1)
        _check_choice("best_state", self.best_state, ("clean", "noisy"))
        _check_int("vae_hidden", self.vae_hidden, minimum=1)
        _check_choice("loss", self.loss, ("smooth_l1", "mse"))
        _check_int("steps", self.steps, minimum=0)
        _check_int("step_size", self.step_size, minimum=1)
        for name in ("lr", "gamma", "noise_std", "default_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"MimicryConfig.{name} must be >= 0, got {getattr(self, name)!r}")


def _check_int(name: str, value: object, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = f" {hint}" if hint else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
