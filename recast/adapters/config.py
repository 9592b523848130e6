"""One config dataclass per adapter kind, and the presets of the adapters combined with RECAST
(paper section 5, eq. 6).

Every config shares the matching fields of ``AdapterConfig`` (targets, exclude, regex,
skip_unsupported, seed) and adds only its own kind's fields, so a field of another kind is an
error naming it. ``kind`` is a class attribute: it keys the registry of
``recast.adapters.registry``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from recast.validation import AtLeast0, AtLeast1, Finite, Fraction, Positive, validate_fields


@dataclass(frozen=True)
class AdapterConfig:
    """Which modules get an adapter; the base of every kind's config (not built on its own).

    Attributes:
        targets: module patterns, the syntax of ``recast.targets.match_modules``: exact name,
            ``.suffix``/suffix, or with ``regex=True`` a ``re.fullmatch`` regex. Names are the
            original ones: ``blocks.0.attn.qkv`` matches whether or not the layer is a
            RecastLinear or already wrapped by another adapter.
        exclude: patterns removed from the matches.
        regex: interpret ``targets``/``exclude`` as regular expressions.
        skip_unsupported: skip matched modules this kind cannot wrap (norms and pools of a
            ``downsample`` Sequential) instead of raising.
        seed: seed of the adapters' random init and of RoSA's random support (local generator).
    """

    kind: ClassVar[str]

    targets: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    regex: bool = False
    skip_unsupported: bool = False
    seed: AtLeast0 = 0

    def __post_init__(self) -> None:
        if type(self) is AdapterConfig:
            raise TypeError("AdapterConfig is the shared base; build a kind's config (e.g. LoRAConfig) "
                            "or use adapter_config(kind, ...) / adapter_preset(name)")
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.targets:
            raise ValueError(f"{type(self).__name__}.targets is empty: give at least one module pattern")
        validate_fields(self, prefix=f"{type(self).__name__}.")  # every field of the kind's config, by pydantic


@dataclass(frozen=True)
class LowRankConfig(AdapterConfig):
    """Shared fields of the low-rank kinds.

    Attributes:
        rank: r of the low-rank factors.
        alpha: LoRA alpha; the delta is scaled by alpha / rank. None: alpha = rank (scale 1).
    """

    min_rank: ClassVar[int] = 1

    rank: int = 4  # >= min_rank
    alpha: Positive | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # the types, and alpha > 0
        if self.rank < self.min_rank:
            raise ValueError(f"{type(self).__name__}.rank must be an integer >= {self.min_rank}, got {self.rank!r}")


@dataclass(frozen=True)
class LoRAConfig(LowRankConfig):
    """LoRA: delta = alpha/r B A on each matched Linear-like module."""

    kind: ClassVar[str] = "lora"


@dataclass(frozen=True)
class MeLoConfig(LowRankConfig):
    """MeLo: LoRA on the q and v row blocks of a fused qkv Linear (k untouched)."""

    kind: ClassVar[str] = "melo"


@dataclass(frozen=True)
class DoRAConfig(LowRankConfig):
    """DoRA: a LoRA direction plus one trainable magnitude per output row."""

    kind: ClassVar[str] = "dora"


@dataclass(frozen=True)
class RoSAConfig(LowRankConfig):
    """RoSA: low-rank plus sparse deltas (``rank=0``: sparse only).

    Attributes:
        num_sparse: sparse entries in total over all wrapped modules (split evenly).
        sparsity: fraction of each module's weights that is sparse-trainable (alternative to
            ``num_sparse``; at most one of them is non-zero).
        support: how the sparse support is chosen. ``"random"``: a uniform draw from ``seed``
            at wrap time. ``"gradient"`` (the RoSA paper): the entries of largest |dL/dW| on the
            task's training data, chosen by ``select_rosa_support`` before training;
            ``recast.recipes.build_method`` does this in ``BuiltMethod.prepare``.
    """

    kind: ClassVar[str] = "rosa"
    min_rank: ClassVar[int] = 0

    num_sparse: AtLeast0 = 0
    sparsity: Fraction = 0.0
    support: Literal["random", "gradient"] = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_sparse and self.sparsity:
            raise ValueError(f"RoSAConfig: give num_sparse ({self.num_sparse}) or sparsity ({self.sparsity}), not both")
        if self.rank == 0 and not (self.num_sparse or self.sparsity):
            raise ValueError("RoSAConfig with rank=0 needs num_sparse > 0 or sparsity > 0")


@dataclass(frozen=True)
class AdaptFormerConfig(AdapterConfig):
    """AdaptFormer: a parallel bottleneck around an MLP module.

    Attributes:
        bottleneck: hidden width (configs/paper.yaml: 64, a choice; see the preset).
        scale: output scale s (AdaptFormer paper: 0.1).
        branch_input: ``residual`` (AdaptFormer's code: the block's residual stream before its
            pre-MLP norm; needs a timm-style ``x + mlp(norm2(x))`` block) or ``mlp`` (the MLP's
            own input, after the norm; any MLP module).
    """

    kind: ClassVar[str] = "adaptformer"

    bottleneck: AtLeast1 = 8
    scale: Finite = 0.1
    branch_input: Literal["residual", "mlp"] = "residual"


@dataclass(frozen=True)
class PiggybackConfig(AdapterConfig):
    """Piggyback: a thresholded real-valued mask per weight (straight-through gradient).

    Attributes:
        mask_init: real-valued mask init (Mallya et al. 2018: 1e-2).
        threshold: binarisation threshold (Mallya et al. 2018: 5e-3).
    """

    kind: ClassVar[str] = "piggyback"

    mask_init: float = 1e-2
    threshold: float = 5e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= self.threshold < self.mask_init):
            raise ValueError(
                f"PiggybackConfig needs 0 <= threshold < mask_init so the mask starts all-ones, "
                f"got threshold={self.threshold!r}, mask_init={self.mask_init!r}")


@dataclass(frozen=True)
class CLRConfig(AdapterConfig):
    """CLR: a depthwise 3x3 conv after each matched conv, identity-initialised (no own fields)."""

    kind: ClassVar[str] = "clr"


def config_fields(cls: type[AdapterConfig]) -> tuple[str, ...]:
    """The constructor fields of an adapter config class, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


_RESNET_CONVS = (r"layer\d+\.\d+\.(conv\d+|downsample\.\d+)",)
_MLP = ("mlp.fc1", "mlp.fc2")

AdapterPresetName = Literal["lora", "lora_tiny", "melo", "dora", "adaptformer", "rosa", "rosa_spa_mlp", "piggyback",
                            "clr"]
ADAPTER_PRESET_NAMES: tuple[str, ...] = get_args(AdapterPresetName)

_PRESETS: dict[str, AdapterConfig] = {
    # LoRA on the fused qkv, r=4.
    "lora": LoRAConfig(("attn.qkv",), rank=4),
    # A tiny LoRA for the matched-budget comparison (paper Fig. 3): r=1 on the qkv of block 0
    # only (ViT-S: 1,536 parameters); move the budget with targets=... and rank=....
    "lora_tiny": LoRAConfig(("blocks.0.attn.qkv",), rank=1),
    # MeLo: rank-1 LoRA on the q and v row blocks of the fused qkv.
    "melo": MeLoConfig(("attn.qkv",), rank=1),
    # DoRA on q, k, v = on the fused qkv (one magnitude per output row).
    "dora": DoRAConfig(("attn.qkv",), rank=4),
    # AdaptFormer around every block MLP. The width is a choice: configs/paper.yaml sets 64 with
    # scale 0.1 (the AdaptFormer paper's ViT setting); the RECAST paper says "rank=1" for its
    # LoRA-style methods and the authors' code defaults to width 2 with scale alpha // r = 2.
    # The preset's 8 suits the 64-wide tiny test models.
    "adaptformer": AdaptFormerConfig(("mlp",), bottleneck=8, scale=0.1),
    # The paper's "RoSA (Full-Att.)": rank-1 LoRA + sparse entries (0.5 % of each weight; the
    # paper gives no density for this variant) on the fused qkv, support by gradient (RoSA paper).
    "rosa": RoSAConfig(("attn.qkv",), rank=1, sparsity=0.005, support="gradient"),
    # The paper's RoSA "SpA MLP": sparse deltas only, 144 (< 150) entries over the whole model,
    # support by gradient.
    "rosa_spa_mlp": RoSAConfig(_MLP, rank=0, num_sparse=144, support="gradient"),
    # Piggyback: a mask on every conv of the residual stages (downsample projections included).
    # The stem conv (``conv1``) gets no mask and stays the frozen pretrained conv: a choice, not
    # from the paper (which does not list the masked layers). To mask it too, add ``conv1`` to
    # the targets: targets=(r"conv1|layer\d+\.\d+\.(conv\d+|downsample\.\d+)",).
    "piggyback": PiggybackConfig(_RESNET_CONVS, regex=True, skip_unsupported=True),
    # CLR: a depthwise 3x3 after every conv of the residual stages.
    "clr": CLRConfig(_RESNET_CONVS, regex=True, skip_unsupported=True),
}
assert tuple(_PRESETS) == ADAPTER_PRESET_NAMES, "AdapterPresetName and _PRESETS disagree"


def adapter_preset(name: AdapterPresetName, **overrides: Any) -> AdapterConfig:
    """The config of a paper baseline, with field overrides (e.g. ``bottleneck=64``).

    Raises:
        ValueError: unknown preset (the presets are listed).
        TypeError: an override that is not a field of the preset's kind (the field and the
            kind's fields are named).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown adapter preset {name!r}; choose one of {ADAPTER_PRESET_NAMES}")
    base = _PRESETS[name]
    check_fields(type(base), overrides, f"adapter preset {name!r}")
    return dataclasses.replace(base, **overrides)


def check_fields(cls: type[AdapterConfig], values: dict[str, Any], what: str) -> None:
    """Raise TypeError naming every key of ``values`` that ``cls`` has no field for."""
    fields = config_fields(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise TypeError(f"{what} (kind {cls.kind!r}, {cls.__name__}) has no field(s) {unknown}; "
                        f"its fields: {list(fields)}")
