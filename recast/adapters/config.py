"""AdapterConfig and the presets of the adapters combined with RECAST (paper section 5, eq. 6)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

AdapterKind = Literal["lora", "melo", "dora", "adaptformer", "rosa", "piggyback", "clr"]
ADAPTER_KINDS: tuple[str, ...] = ("lora", "melo", "dora", "adaptformer", "rosa", "piggyback", "clr")
PresetName = Literal["lora", "lora_tiny", "melo", "dora", "adaptformer", "rosa", "rosa_spa_mlp", "piggyback", "clr"]


@dataclass(frozen=True)
class AdapterConfig:
    """Which modules get which adapter.

    Attributes:
        kind: ``lora`` (delta = alpha/r B A), ``melo`` (LoRA on the q and v row blocks of a fused
            qkv), ``dora`` (magnitude + direction), ``adaptformer`` (parallel bottleneck around
            an MLP), ``rosa`` (sparse + low-rank), ``piggyback`` (thresholded real mask with a
            straight-through gradient) or ``clr`` (depthwise 3x3 after a conv, identity init).
        targets: module patterns, the syntax of ``recast.targets.match_modules``: exact name,
            ``.suffix``/suffix, or with ``regex=True`` a ``re.fullmatch`` regex. Names are the
            original ones: ``blocks.0.attn.qkv`` matches whether or not the layer is a
            RecastLinear or already wrapped by another adapter.
        exclude: patterns removed from the matches.
        regex: interpret ``targets``/``exclude`` as regular expressions.
        skip_unsupported: skip matched modules this kind cannot wrap (norms and pools of a
            ``downsample`` Sequential) instead of raising.
        rank: r of the low-rank kinds (``rosa`` allows 0: sparse only).
        alpha: LoRA alpha; the delta is scaled by alpha / rank. None: alpha = rank (scale 1).
        bottleneck: AdaptFormer hidden width (configs/paper.yaml: 64, a choice; see the preset).
        scale: AdaptFormer output scale s (AdaptFormer paper: 0.1).
        branch_input: AdaptFormer branch input: ``residual`` (AdaptFormer's code: the block's
            residual stream before its pre-MLP norm; needs a timm-style ``x + mlp(norm2(x))``
            block) or ``mlp`` (the MLP's own input, after the norm; any MLP module).
        num_sparse: ``rosa``: sparse entries in total over all wrapped modules (split evenly).
        sparsity: ``rosa``: fraction of each module's weights that is sparse-trainable
            (alternative to ``num_sparse``; at most one of them is non-zero).
        mask_init: ``piggyback`` real-valued mask init (Mallya et al. 2018: 1e-2).
        threshold: ``piggyback`` binarisation threshold (Mallya et al. 2018: 5e-3).
        support: ``rosa``: how the sparse support is chosen. ``"random"``: a uniform draw from
            ``seed`` at wrap time. ``"gradient"`` (the RoSA paper): the entries of largest
            |dL/dW| on the task's training data, chosen by ``select_rosa_support`` before
            training; ``recast.recipes.build_method`` does this in ``BuiltMethod.prepare``.
        seed: seed of the adapters' random init and of RoSA's random support (local generator).
    """

    kind: AdapterKind
    targets: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    regex: bool = False
    skip_unsupported: bool = False
    rank: int = 4
    alpha: float | None = None
    bottleneck: int = 8
    scale: float = 0.1
    branch_input: Literal["residual", "mlp"] = "residual"
    num_sparse: int = 0
    sparsity: float = 0.0
    mask_init: float = 1e-2
    threshold: float = 5e-3
    support: Literal["random", "gradient"] = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"AdapterConfig.kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        if not self.targets:
            raise ValueError("AdapterConfig.targets is empty: give at least one module pattern")
        min_rank = 0 if self.kind == "rosa" else 1
        _check_int("rank", self.rank, min_rank)
        _check_int("bottleneck", self.bottleneck, 1)
        _check_int("num_sparse", self.num_sparse, 0)
        _check_int("seed", self.seed, 0)
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"AdapterConfig.alpha must be a positive number or None, got {self.alpha!r}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity <= 1.0):
            raise ValueError(f"AdapterConfig.sparsity must be in [0, 1], got {self.sparsity!r}")
        if self.num_sparse and self.sparsity:
            raise ValueError(
                f"AdapterConfig: give num_sparse ({self.num_sparse}) or sparsity ({self.sparsity}), not both")
        if self.kind == "rosa" and self.rank == 0 and not (self.num_sparse or self.sparsity):
            raise ValueError("AdapterConfig(kind='rosa') with rank=0 needs num_sparse > 0 or sparsity > 0")
        if self.support not in ("random", "gradient"):
            raise ValueError(f"AdapterConfig.support must be 'random' or 'gradient', got {self.support!r}")
        if self.branch_input not in ("residual", "mlp"):
            raise ValueError(f"AdapterConfig.branch_input must be 'residual' or 'mlp', got {self.branch_input!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"AdapterConfig.scale must be finite, got {self.scale!r}")
        if not (0.0 <= self.threshold < self.mask_init):
            raise ValueError(
                f"AdapterConfig: piggyback needs 0 <= threshold < mask_init so the mask starts all-ones, "
                f"got threshold={self.threshold!r}, mask_init={self.mask_init!r}")

    @property
    def lora_scale(self) -> float:
        """alpha / rank (1 when alpha is None or rank is 0)."""
        if self.alpha is None or self.rank == 0:
            return 1.0
        return float(self.alpha) / self.rank


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"AdapterConfig.{name} must be an integer >= {minimum}, got {value!r}")


_RESNET_CONVS = (r"layer\d+\.\d+\.(conv\d+|downsample\.\d+)",)
_MLP = ("mlp.fc1", "mlp.fc2")

_PRESETS: dict[str, AdapterConfig] = {
    # LoRA on the fused qkv, r=4.
    "lora": AdapterConfig("lora", ("attn.qkv",), rank=4),
    # A tiny LoRA for the matched-budget comparison (paper Fig. 3): r=1 on the qkv of block 0
    # only (ViT-S: 1,536 parameters); move the budget with targets=... and rank=....
    "lora_tiny": AdapterConfig("lora", ("blocks.0.attn.qkv",), rank=1),
    # MeLo: rank-1 LoRA on the q and v row blocks of the fused qkv.
    "melo": AdapterConfig("melo", ("attn.qkv",), rank=1),
    # DoRA on q, k, v = on the fused qkv (one magnitude per output row).
    "dora": AdapterConfig("dora", ("attn.qkv",), rank=4),
    # AdaptFormer around every block MLP. The width is a choice: configs/paper.yaml sets 64 with
    # scale 0.1 (the AdaptFormer paper's ViT setting); the RECAST paper says "rank=1" for its
    # LoRA-style methods and the authors' code defaults to width 2 with scale alpha // r = 2.
    # The preset's 8 suits the 64-wide tiny test models.
    "adaptformer": AdapterConfig("adaptformer", ("mlp",), bottleneck=8, scale=0.1),
    # The paper's "RoSA (Full-Att.)": rank-1 LoRA + sparse entries (0.5 % of each weight; the
    # paper gives no density for this variant) on the fused qkv, support by gradient (RoSA paper).
    "rosa": AdapterConfig("rosa", ("attn.qkv",), rank=1, sparsity=0.005, support="gradient"),
    # The paper's RoSA "SpA MLP": sparse deltas only, 144 (< 150) entries over the whole model,
    # support by gradient.
    "rosa_spa_mlp": AdapterConfig("rosa", _MLP, rank=0, num_sparse=144, support="gradient"),
    # Piggyback: a mask on every conv of the residual stages (downsample projections included).
    # The stem conv (``conv1``) gets no mask and stays the frozen pretrained conv: a choice, not
    # from the paper (which does not list the masked layers). To mask it too, add ``conv1`` to
    # the targets: targets=(r"conv1|layer\d+\.\d+\.(conv\d+|downsample\.\d+)",).
    "piggyback": AdapterConfig("piggyback", _RESNET_CONVS, regex=True, skip_unsupported=True),
    # CLR: a depthwise 3x3 after every conv of the residual stages.
    "clr": AdapterConfig("clr", _RESNET_CONVS, regex=True, skip_unsupported=True),
}

ADAPTER_PRESETS: tuple[str, ...] = tuple(_PRESETS)


def adapter_preset(name: PresetName, **overrides) -> AdapterConfig:
    """The AdapterConfig of a paper baseline, with field overrides (e.g. ``bottleneck=64``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown adapter preset {name!r}; choose one of {ADAPTER_PRESETS}")
    return replace(_PRESETS[name], **overrides)
