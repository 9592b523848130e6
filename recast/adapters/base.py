"""The wrapper protocol every adapter follows: it holds the wrapped module as ``base``.

A base is any module with the nn.Linear (``weight``, ``bias``, ``in_features``,
``out_features``) or nn.Conv2d protocol: a plain layer, a RecastLinear/RecastConv2d (whose
``weight`` is the active task's generated weight, differentiable w.r.t. its coefficients) or
another weight-space adapter. Adding a delta to ``base.weight`` is paper eq. 6 by construction.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

LINEAR_ATTRS = ("weight", "in_features", "out_features")
CONV_ATTRS = ("weight", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")


def has_protocol(module: nn.Module, attrs: tuple[str, ...]) -> bool:
    """Whether ``module`` exposes every attribute in ``attrs``, looked up without evaluating
    properties (a RecastLinear's weight is not generated) and without ``dir``."""
    stores = (module.__dict__, module._parameters, module._buffers, module._modules)
    return all(hasattr(type(module), a) or any(a in s for s in stores) for a in attrs)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` has the nn.Linear protocol (``LINEAR_ATTRS``)."""
    return has_protocol(module, LINEAR_ATTRS)


def is_conv_like(module: nn.Module) -> bool:
    """Whether ``module`` has the nn.Conv2d protocol (``CONV_ATTRS``)."""
    return has_protocol(module, CONV_ATTRS)


class AdapterWrapper(nn.Module):
    """Base class of all adapters: ``base`` is the wrapped module.

    Attributes:
        mergeable: whether ``merged()`` folds the adapter into a plain layer of the base's class.
    """

    mergeable: ClassVar[bool] = False
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("base.",)

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def merged(self) -> nn.Module:
        """A copy of the (plain) base holding this adapter's effective weight."""
        if not self.mergeable:
            raise TypeError(f"{type(self).__name__} cannot be merged into its base")
        if type(self.base) not in (nn.Linear, nn.Conv2d):
            raise ValueError(
                f"{type(self).__name__} wraps a {type(self.base).__name__}; merging needs a plain "
                "nn.Linear/nn.Conv2d (call RecastModel.materialize(task) first)")
        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            plain.weight.copy_(self.weight)
        return plain

    def own_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This adapter's parameters (not those of ``base`` or of other frozen parts it holds)."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(self.frozen_prefixes)]

    def own_named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """This adapter's parameters and persistent buffers (not those of ``base``)."""
        own: list[tuple[str, torch.Tensor]] = list(self.own_named_parameters())
        own += [(n, b) for n, b in self.named_buffers() if not n.startswith(self.frozen_prefixes)]
        return own


class LinearDelta(AdapterWrapper):
    """A Linear-protocol adapter whose effective weight is ``base.weight + delta_weight()``."""

    mergeable = True

    def __init__(self, base: nn.Module):
        if not has_protocol(base, LINEAR_ATTRS):
            raise TypeError(f"{type(self).__name__} needs a Linear-like base, got {type(base).__name__}")
        super().__init__(base)
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def weight(self) -> torch.Tensor:
        """Effective weight (out, in): the base's weight plus this adapter's delta (eq. 6)."""
        return self.base.weight + self.delta_weight()

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


class ConvGeometry(AdapterWrapper):
    """A Conv2d-protocol adapter: copies the base's geometry (stride, padding, ...)."""

    def __init__(self, base: nn.Module):
        if not has_protocol(base, CONV_ATTRS):
            raise TypeError(f"{type(self).__name__} needs a Conv2d-like base, got {type(base).__name__}")
        if getattr(base, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"{type(self).__name__} supports padding_mode='zeros' only, got {base.padding_mode!r}")
        super().__init__(base)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride, self.padding = base.kernel_size, base.stride, base.padding
        self.dilation, self.groups = base.dilation, base.groups

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


def lowrank_pair(rank: int, in_features: int, out_features: int, like: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA factors as PEFT initialises them: A kaiming-uniform (a=sqrt 5) (r, in), B zeros (out, r)."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    b = torch.zeros(out_features, rank)
    return (nn.Parameter(a.to(device=like.device, dtype=like.dtype)),
            nn.Parameter(b.to(device=like.device, dtype=like.dtype)))
