"""Configuration objects of the library (frozen dataclasses, validated on construction by pydantic:
``recast.validation``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from recast.validation import AtLeast0, AtLeast1, NonNegative, validate_fields

TemplatesSpec = AtLeast1 | Literal["group_size"]
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
    groups: AtLeast1 = 6
    templates: TemplatesSpec = 2
    coef_sets: AtLeast1 = 2
    regex: bool = False
    min_layer: AtLeast0 = 0
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
        validate_fields(self)
        if not self.base_task:
            raise ValueError(f"RecastConfig.base_task must be a non-empty string, got {self.base_task!r}")


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
    default_weight: NonNegative = 2.0
    role_weights: dict[str, float] = field(default_factory=dict)
    noise_std: NonNegative = 1e-4
    lr: NonNegative = 0.1
    step_size: AtLeast1 = 200
    gamma: NonNegative = 0.1
    steps: AtLeast0 = 1000
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: AtLeast1 = 10
    best_state: Literal["clean", "noisy"] = "clean"
    vae_hidden: AtLeast1 = 8
    progress: bool = True

    def __post_init__(self) -> None:
        validate_fields(self)
