"""Template banks and the RECAST layers that build their weight from them in forward."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FanMode = Literal["fan_in", "fan_out"]


class TemplateBank(nn.Module):
    """n templates T_1..T_n, each the shape of one module's weight (the bank B_g of eq. 1).

    The bank is owned by the RecastModel (``RecastModel.banks``); layers only hold a reference
    to it that is not registered, so the state_dict stores every template once.

    Args:
        num_templates: n.
        shape: the shape of one template (the module's weight shape).
        generator: for the init (a local generator; no global seeding).
        fan_mode: kaiming-normal init with the fan of one template: ``"fan_in"`` (in * kernel;
            the authors' code for MLP and conv templates) or ``"fan_out"`` (out * kernel; the
            authors' code for the fused qkv). std = sqrt(2 / fan) (ReLU gain) in both cases.
    """

    def __init__(self, num_templates: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
                 fan_mode: FanMode = "fan_in"):
        super().__init__()
        if fan_mode not in ("fan_in", "fan_out"):
            raise ValueError(f"fan_mode must be 'fan_in' or 'fan_out', got {fan_mode!r}")
        self.fan_mode = fan_mode
        self.templates = nn.Parameter(torch.empty(num_templates, *shape))  # (n, *weight_shape)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-normal templates (paper init) with ``fan_mode``'s fan of a single template."""
        shape = self.templates.shape[1:]
        receptive = math.prod(shape[2:])
        if len(shape) == 1:
            fan = shape[0]
        else:
            fan = (shape[1] if self.fan_mode == "fan_in" else shape[0]) * receptive
        std = math.sqrt(2.0 / fan)
        with torch.no_grad():
            self.templates.normal_(0.0, std, generator=generator)

    @property
    def num_templates(self) -> int:
        return self.templates.shape[0]

    def combine(self, coefs: torch.Tensor) -> torch.Tensor:
        """Eqs. 1-2: W = (1/K) sum_k sum_i c^(k)_i T_i for ``coefs`` of shape (K, n)."""
        mean = coefs.mean(dim=0)  # (K, n) -> (n,)
        return torch.tensordot(mean, self.templates, dims=1)  # (n,) x (n, *shape) -> shape


def random_unit_coefficients(coef_sets: int, num_templates: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Paper init: each of the K sets a random unit vector in R^n, shape (K, n)."""
    c = torch.randn(coef_sets, num_templates, generator=generator)
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)


class _RecastMixin:
    """Per-task coefficients + weight generation shared by RecastLinear and RecastConv2d."""

    coefs: nn.ParameterDict
    task: str | None

    def _init_recast(self, bank: TemplateBank, coef_sets: int) -> None:
        self._bank = [bank]  # a list: a reference that nn.Module does not register
        self.coef_sets = coef_sets
        self.coefs = nn.ParameterDict()
        self.task = None

    @property
    def bank(self) -> TemplateBank:
        return self._bank[0]

    def add_task(self, task: str, coefs: torch.Tensor) -> None:
        """Register the (K, n) coefficients of ``task``."""
        expected = (self.coef_sets, self.bank.num_templates)
        if tuple(coefs.shape) != expected:
            raise ValueError(f"coefficients for task '{task}' must have shape {expected}, got {tuple(coefs.shape)}")
        self.coefs[task] = nn.Parameter(coefs.detach().clone().to(self.bank.templates))

    def task_weight(self, task: str) -> torch.Tensor:
        """The generated weight of ``task``."""
        if task not in self.coefs:
            raise KeyError(f"unknown task '{task}'; known: {list(self.coefs)}")
        return self.bank.combine(self.coefs[task])

    @property
    def weight(self) -> torch.Tensor:
        """The active task's generated weight (what adapters add their delta to, eq. 6)."""
        if self.task is None:
            raise RuntimeError("no active task: call RecastModel.set_task(name) first")
        return self.task_weight(self.task)


class RecastLinear(_RecastMixin, nn.Module):
    """A Linear whose weight is generated from a template bank and per-task coefficients."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, bank: TemplateBank, coef_sets: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._init_recast(bank, coef_sets)

    @classmethod
    def from_module(cls, module: nn.Linear, bank: TemplateBank, coef_sets: int) -> "RecastLinear":
        return cls(module.in_features, module.out_features, module.bias, bank, coef_sets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_plain(self, task: str) -> nn.Linear:
        """A plain nn.Linear (the templates' dtype) holding ``task``'s generated weight and the live bias."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.task_weight(task))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.to(device=self.bank.templates.device, dtype=self.bank.templates.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, n={self.bank.num_templates}, K={self.coef_sets}, task={self.task}"


class RecastConv2d(_RecastMixin, nn.Module):
    """A Conv2d (stride, padding, dilation, groups, bias kept) with a generated weight."""

    def __init__(self, conv: nn.Conv2d, bank: TemplateBank, coef_sets: int):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"RecastConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self._init_recast(bank, coef_sets)

    @classmethod
    def from_module(cls, module: nn.Conv2d, bank: TemplateBank, coef_sets: int) -> "RecastConv2d":
        return cls(module, bank, coef_sets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_plain(self, task: str) -> nn.Conv2d:
        """A plain nn.Conv2d (the templates' dtype) holding ``task``'s generated weight and the live bias."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=self.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(self.task_weight(task))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.to(device=self.bank.templates.device, dtype=self.bank.templates.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"n={self.bank.num_templates}, K={self.coef_sets}, task={self.task}")


RECAST_LAYERS = (RecastLinear, RecastConv2d)


def make_recast_layer(module: nn.Module, bank: TemplateBank, coef_sets: int) -> RecastLinear | RecastConv2d:
    """Swap-in for a Linear/Conv2d."""
    if isinstance(module, nn.Linear):
        return RecastLinear.from_module(module, bank, coef_sets)
    if isinstance(module, nn.Conv2d):
        return RecastConv2d.from_module(module, bank, coef_sets)
    raise TypeError(f"cannot template a {type(module).__name__}; only Linear and Conv2d")
