"""Template banks and the RECAST layers that build their weight from them in forward."""

from __future__ import annotations

import math
import sys
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recast.mixed import Routing, pick_strategy

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
        self.routing: Routing | None = None  # set by RecastModel for one mixed-task forward

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

    def _mixed(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Each row with its own task's weight (see ``recast.mixed``)."""
        name = getattr(self, "recast_name", type(self).__name__)
        r.check_rows(x, name)
        biases = r.values.get(name)  # per-task biases, where the batch's tasks differ in them
        strategy = r.strategy
        if strategy == "auto":
            strategy = self._pick(x, r)
        r.picks[name] = strategy
        if strategy == "grouped":
            outs = [self._run(r.select(x, u), self.task_weight(t), biases[u]["bias"] if biases else self.bias)
                    for u, t in enumerate(r.tasks)]
            return r.regroup(outs)
        means = torch.stack([self.coefs[t].mean(dim=0) for t in r.tasks])  # (U, n), eq. 2
        if strategy == "batched":
            weights = torch.tensordot(means, self.bank.templates, dims=1)  # (U, *weight shape)
            y = self._batched(x, weights, r)
        else:
            y = self._shared(x, means.index_select(0, r.index))
        if biases:
            bias = torch.stack([v["bias"] for v in biases]).index_select(0, r.index)  # (B, out)
            return y + self._per_row(bias, y)
        return y if self.bias is None else y + self._per_row(self.bias, y)


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
        if self.routing is not None:
            return self._mixed(x, self.routing)
        return F.linear(x, self.weight, self.bias)

    @staticmethod
    def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _pick(self, x: torch.Tensor, r: Routing) -> str:
        positions = x.numel() // max(1, x.shape[0] * self.in_features)
        macs = self.in_features * self.out_features
        return pick_strategy(x.shape[0], positions, macs, self.bank.num_templates, len(r.tasks), self.out_features,
                             r.widest, weight_bytes=len(r.tasks) * macs * x.element_size())

    def _batched(self, x: torch.Tensor, weights: torch.Tensor, r: Routing) -> torch.Tensor:
        """Rows placed per task in a (U, m, ...) tensor, one batched matmul with the U weights."""
        u = len(r.tasks)
        if r.equal_groups:  # rows sorted by task, same count each: a view, no copy
            y = torch.matmul(x.reshape(u, -1, self.in_features), weights.transpose(1, 2))
            return y.view(*x.shape[:-1], self.out_features)
        grouped = x.new_zeros(u, r.widest, *x.shape[1:]).index_put((r.index, r.slot), x)
        y = torch.matmul(grouped.reshape(u, -1, self.in_features), weights.transpose(1, 2))
        return y.view(u, r.widest, *x.shape[1:-1], self.out_features)[r.index, r.slot]

    def _shared(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """sum_i mix[row, i] * (x T_i^T): one matmul against the n stacked templates."""
        templates = self.bank.templates  # (n, out, in)
        n, out = templates.shape[0], templates.shape[1]
        y = F.linear(x, templates.reshape(n * out, self.in_features))  # (B, ..., n * out)
        y = y.reshape(x.shape[0], -1, n, out)
        y = torch.matmul(mix.view(x.shape[0], 1, 1, n), y)  # (B, L, 1, out)
        return y.reshape(*x.shape[:-1], out)

    @staticmethod
    def _per_row(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``bias`` (out,) or per row (B, out), shaped to add to ``y`` (B, ..., out)."""
        if bias.dim() == 1:
            return bias
        return bias.view(bias.shape[0], *([1] * (y.dim() - 2)), bias.shape[1])

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
        if self.routing is not None:
            return self._mixed(x, self.routing)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _pick(self, x: torch.Tensor, r: Routing) -> str:
        positions = 1
        for size, k, s, p, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation):
            positions *= (size + 2 * p - d * (k - 1) - 1) // s + 1
        macs = self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel_size)
        return pick_strategy(x.shape[0], positions, macs, self.bank.num_templates, len(r.tasks), self.out_channels,
                             r.widest, weight_bytes=len(r.tasks) * macs * x.element_size())

    def _batched(self, x: torch.Tensor, weights: torch.Tensor, r: Routing) -> torch.Tensor:
        """Rows placed per task in (m, U * C_in, H, W), one convolution with groups = U * groups."""
        u, (b, c, h, w) = len(r.tasks), x.shape
        grouped = x.new_zeros(r.widest, u, c, h, w).index_put((r.slot, r.index), x).view(r.widest, u * c, h, w)
        y = F.conv2d(grouped, weights.reshape(u * self.out_channels, *weights.shape[2:]), None,
                     self.stride, self.padding, self.dilation, u * self.groups)
        return y.view(r.widest, u, self.out_channels, *y.shape[-2:])[r.slot, r.index]

    def _shared(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """sum_i mix[row, i] * conv(x, T_i): one convolution with the n templates stacked per
        conv group (so that each group's output channels stay contiguous)."""
        templates = self.bank.templates  # (n, out, in/g, kh, kw)
        n, g, out = templates.shape[0], self.groups, self.out_channels
        stacked = templates.reshape(n, g, out // g, *templates.shape[2:]).transpose(0, 1)
        y = F.conv2d(x, stacked.reshape(g * n * (out // g), *templates.shape[2:]), None,
                     self.stride, self.padding, self.dilation, g)
        b, h, w = y.shape[0], y.shape[-2], y.shape[-1]
        y = y.view(b, g, n, out // g, h, w) * mix.view(b, 1, n, 1, 1, 1)
        return y.sum(dim=2).reshape(b, out, h, w)

    @staticmethod
    def _per_row(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``bias`` (out,) or per row (B, out), shaped to add to ``y`` (B, out, H, W)."""
        return bias.view(-1, bias.shape[-1], 1, 1) if bias.dim() == 2 else bias.view(-1, 1, 1)

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


# ----------------------------------------------------------------- frozen BatchNorm statistics
class FrozenStatistics:
    """Mixin of a BatchNorm layer whose running statistics stay frozen in any mode.

    ``training`` reads False whatever ``train()`` (of this layer or of any parent, e.g. a
    trainer's ``model.train()``) or a direct write sets, so the layer normalises with its
    running statistics and never updates them: the FrozenBatchNorm2d of timm/torchvision,
    except that it keeps the layer's class (as a subclass), its affine parameters trainable
    and its state_dict keys (``num_batches_tracked`` included), so payloads and bank files
    load as before and eval outputs are bit-identical.
    """

    @property
    def training(self) -> bool:
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # frozen: the mode is ignored


_FROZEN_PREFIX = "FrozenStats__"


def _frozen_name(cls: type) -> str:
    return _FROZEN_PREFIX + f"{cls.__module__}.{cls.__qualname__}".replace(".", "__")


def frozen_class(cls: type) -> type:
    """The frozen-statistics subclass of BatchNorm class ``cls`` (one per class, importable
    from this module by name, so a frozen layer pickles like any module)."""
    if issubclass(cls, FrozenStatistics):
        return cls
    name = _frozen_name(cls)
    module = sys.modules[__name__]
    frozen = module.__dict__.get(name)
    if frozen is None:
        frozen = type(name, (FrozenStatistics, cls), {"__module__": __name__, "__qualname__": name,
                                                      "unfrozen_class": cls})
        setattr(module, name, frozen)
    return frozen


def __getattr__(name: str) -> type:
    """Recreate a frozen class by name in a fresh process (for unpickling)."""
    if not name.startswith(_FROZEN_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    parts = name[len(_FROZEN_PREFIX):].split("__")
    for cut in range(len(parts) - 1, 0, -1):  # longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return frozen_class(obj)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def freeze_batch_norm_stats(model: nn.Module) -> int:
    """Make every BatchNorm layer of ``model`` keep frozen statistics (in place); returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, FrozenStatistics):
            m.__class__ = frozen_class(type(m))
            count += 1
    return count


def unfreeze_batch_norm_stats(model: nn.Module) -> None:
    """Give every frozen BatchNorm layer of ``model`` its original class back (in place)."""
    for m in model.modules():
        if isinstance(m, FrozenStatistics):
            m.__class__ = type(m).unfrozen_class
            m.training = False  # it normalised as in eval mode; the copy starts there
