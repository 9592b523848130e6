"""The built-in adapter kinds, registered by name: lora, melo, dora, rosa, adaptformer,
piggyback, clr. Each says which modules it accepts and how it wraps one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recast.adapters.base import AdapterWrapper, is_conv_like, is_linear_like
from recast.adapters.branches import AdaptFormerMLP, CLRConv2d
from recast.adapters.config import (
    AdaptFormerConfig,
    CLRConfig,
    DoRAConfig,
    LoRAConfig,
    MeLoConfig,
    PiggybackConfig,
    RoSAConfig,
)
from recast.adapters.lowrank import DoRALinear, LoRALinear, RoSALinear
from recast.adapters.masks import PiggybackConv2d, PiggybackLinear
from recast.adapters.registry import ADAPTERS, AdapterKind, Target, register_adapter
from recast.layers import UnsupportedModuleError, computes_like_weight_space


def _weight_space(target: Target) -> nn.Module:
    """``target.module``, refused if a weight-space adapter would not compute what it computes."""
    module = target.module
    if not computes_like_weight_space(module):
        cls = getattr(module, "base_class", type(module))
        raise UnsupportedModuleError(target.name, f"{cls.__module__}.{cls.__qualname__}",
                                     "its forward is not F.linear/F.conv2d of its weight (it transforms the weight "
                                     "or pads in forward), so a weight-space adapter cannot stand in for it")
    return module


class _LinearKind(AdapterKind):
    accepts_description = "Linear-like"

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return is_linear_like(module)


@register_adapter
class LoRA(_LinearKind):
    """LoRA on the whole output of each Linear-like module."""

    config_class = LoRAConfig
    cfg: LoRAConfig

    def wrap(self, target: Target, generator: torch.Generator) -> AdapterWrapper:
        return LoRALinear(_weight_space(target), self.cfg.rank, self.cfg.alpha, generator=generator)


@register_adapter
class MeLo(_LinearKind):
    """LoRA on the q and v row blocks of a fused qkv (out_features = 3d)."""

    config_class = MeLoConfig
    cfg: MeLoConfig

    def wrap(self, target: Target, generator: torch.Generator) -> AdapterWrapper:
        d, rest = divmod(_weight_space(target).out_features, 3)
        if rest:
            raise ValueError(f"MeLo needs a fused qkv Linear (out_features divisible by 3); '{target.name}' has "
                             f"out_features={target.module.out_features}")
        return LoRALinear(target.module, self.cfg.rank, self.cfg.alpha, row_slices=((0, d), (2 * d, 3 * d)),
                          generator=generator)


@register_adapter
class DoRA(_LinearKind):
    """DoRA: magnitude + LoRA direction."""

    config_class = DoRAConfig
    cfg: DoRAConfig

    def wrap(self, target: Target, generator: torch.Generator) -> AdapterWrapper:
        return DoRALinear(_weight_space(target), self.cfg.rank, self.cfg.alpha, generator=generator)


@register_adapter
class RoSA(_LinearKind):
    """RoSA: low-rank + sparse; the sparse budget is split over all matched modules."""

    config_class = RoSAConfig
    cfg: RoSAConfig

    def __init__(self, cfg: RoSAConfig, targets: Sequence[Target]) -> None:
        super().__init__(cfg, targets)
        self.num_sparse = dict(zip((t.name for t in targets), self.sparse_counts([t.module for t in targets])))

    def sparse_counts(self, modules: Sequence[nn.Module]) -> list[int]:
        """Sparse entries per module: ``num_sparse`` split evenly (remainder to the first ones),
        or ``round(sparsity * numel)`` (at least 1) each."""
        if self.cfg.num_sparse:
            q, r = divmod(self.cfg.num_sparse, len(modules))
            return [q + (i < r) for i in range(len(modules))]
        if self.cfg.sparsity:
            return [max(1, round(self.cfg.sparsity * m.in_features * m.out_features)) for m in modules]
        return [0] * len(modules)

    def wrap(self, target: Target, generator: torch.Generator) -> AdapterWrapper:
        return RoSALinear(_weight_space(target), self.cfg.rank, self.num_sparse[target.name], self.cfg.alpha,
                          generator=generator)


@register_adapter
class AdaptFormer(AdapterKind):
    """A parallel bottleneck around an MLP; with ``branch_input='residual'`` the block's pre-MLP
    norm moves into the wrapper (the block's ``norm2`` becomes an Identity)."""

    config_class = AdaptFormerConfig
    accepts_description = "an MLP module holding Linear layers"
    cfg: AdaptFormerConfig

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        # a container holding Linear-like layers, not a single layer
        return not (is_linear_like(module) or is_conv_like(module)) and any(
            is_linear_like(c) for c in module.modules() if c is not module)

    def wrap(self, target: Target, generator: torch.Generator) -> AdapterWrapper:
        norm = _take_pre_norm(target) if self.cfg.branch_input == "residual" else None
        return AdaptFormerMLP(target.module, self.cfg.bottleneck, self.cfg.scale, generator=generator, norm=norm)


def _take_pre_norm(target: Target) -> nn.Module:
    """Detach the norm a pre-norm block applies before its MLP (timm ``Block``:
    ``x + mlp(norm2(x))``), leaving an Identity in its place; returns the norm."""
    norm = getattr(target.parent, "norm2", None)
    if target.child != "mlp" or not isinstance(norm, nn.Module):
        raise ValueError(f"AdaptFormer with branch_input='residual' needs a pre-norm block computing "
                         f"x + mlp(norm2(x)); '{target.name}' is not the 'mlp' of a module with a 'norm2'. "
                         f"Use branch_input='mlp' to feed the branch the MLP's own input")
    target.parent.norm2 = nn.Identity()
    return norm


@register_adapter
class Piggyback(AdapterKind):
    """A thresholded mask on the weight of a Linear- or Conv2d-like module."""

    config_class = PiggybackConfig
    accepts_description = "Linear- or Conv2d-like"
    cfg: PiggybackConfig

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return is_linear_like(module) or is_conv_like(module)

    def wrap(self, target: Target, generator: torch.Generator) -> AdapterWrapper:
        cls = PiggybackConv2d if is_conv_like(target.module) else PiggybackLinear
        return cls(_weight_space(target), self.cfg.mask_init, self.cfg.threshold)


@register_adapter
class CLR(AdapterKind):
    """A depthwise 3x3 after a Conv2d-like module (or after another CLR)."""

    config_class = CLRConfig
    accepts_description = "Conv2d-like"

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return is_conv_like(module) or isinstance(module, CLRConv2d)

    def wrap(self, target: Target, generator: torch.Generator) -> AdapterWrapper:
        return CLRConv2d(target.module)


# the built-in kinds, in registration order (``ADAPTERS`` also holds kinds registered later)
ADAPTER_KINDS: tuple[str, ...] = tuple(ADAPTERS)
