"""Template banks and the RECAST layers that build their weight from them in forward."""

from __future__ import annotations

import copy
import math
import sys
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from recast.mixed import LayerShape, MixedBatchError, Routing, pick_strategy, route_of

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


class UnsupportedModuleError(TypeError):
    """A targeted module whose class cannot be templated exactly; ``module`` names it,
    ``cls`` is its class and ``reason`` says why. Raised before any compute."""

    def __init__(self, module: str, cls: str, reason: str):
        self.module, self.cls, self.reason = module, cls, reason
        super().__init__(f"cannot template '{module}' ({cls}): {reason}. Exclude it from the targets "
                         "(RecastConfig.exclude) or target other modules")

    def __reduce__(self):
        return type(self), (self.module, self.cls, self.reason)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_view(module: nn.Module, tensors: dict[str, torch.Tensor | None]) -> nn.Module:
    """A shallow view of ``module``, of its own class, whose parameters/buffers named in
    ``tensors`` are replaced (the rest shared): its class's ``forward`` run on the view
    computes what the module computes with those tensors.

    Unlike ``torch.func.functional_call`` nothing of ``module`` is modified, even for the
    duration of the call, so concurrent callers may use views of one module at once.
    """
    state = dict(module.__dict__)
    params, buffers = dict(module._parameters), dict(module._buffers)
    for name, value in tensors.items():
        if name in buffers:
            buffers[name] = value
        else:
            params[name] = value
    state["_parameters"], state["_buffers"] = params, buffers
    view = object.__new__(type(module))
    object.__setattr__(view, "__dict__", state)
    return view


_CONTAINERS = (dict, set, list)
_RECAST_ATTRS = ("_bank", "_packed", "coef_sets", "task", "recast_name", "base_class", "_param_order")


class _RecastLayer(nn.Module):
    """A targeted module whose weight is generated from a template bank and per-task coefficients.

    The layer takes over the original module's state (its other parameters, buffers, attributes
    and hooks; its ``weight`` parameter is dropped) and runs the original class's own
    ``forward`` with the generated weight (``module_view``): a subclass that transforms its
    weight (timm's StdConv2d) or pads in ``forward`` (Conv2dSame) computes what it computed.
    ``materialize`` gives back a module of the original class. The state_dict keys are the
    original ones minus ``weight``, plus ``coefs.<task>``.

    Plain ``nn.Linear``/``nn.Conv2d`` (classes that keep their base class's forward) run
    F.linear/F.conv2d directly; only they may use the shared-products and batched strategies
    of a mixed batch (their output is linear in the weight). Other classes run every mixed
    batch task by task (``"grouped"``).
    """

    kind: type[nn.Module]  # nn.Linear or nn.Conv2d

    def __init__(self, module: nn.Module, bank: TemplateBank, coef_sets: int):
        super().__init__()
        if not isinstance(module, self.kind):
            raise TypeError(f"{type(self).__name__} templates a {self.kind.__name__}, got {type(module).__name__}")
        state = {k: (copy.copy(v) if isinstance(v, _CONTAINERS) else v) for k, v in module.__dict__.items()}
        self.__dict__.update(state)
        self.base_class = type(module)
        self._param_order = tuple(self._parameters)
        del self._parameters["weight"]
        bias = self._parameters.get("bias")
        if bias is not None:  # the layer's own copy (a task that trains biases copies it again)
            self._parameters["bias"] = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self._bank = [bank]  # a list: a reference that nn.Module does not register
        self._packed: list = [None]  # the model's PackedTasks (recast.packed), an unregistered reference
        self.coef_sets = coef_sets
        self.coefs = nn.ParameterDict()
        self.task: str | None = None

    @classmethod
    def from_module(cls, module: nn.Module, bank: TemplateBank, coef_sets: int) -> "_RecastLayer":
        return cls(module, bank, coef_sets)

    @property
    def bank(self) -> TemplateBank:
        return self._bank[0]

    @property
    def plain(self) -> bool:
        """Whether the original class computes its base class's forward (F.linear/F.conv2d)."""
        return _computes_like_base(self.base_class, self.kind)

    def add_task(self, task: str, coefs: torch.Tensor) -> None:
        """Register the (K, n) coefficients of ``task``."""
        expected = (self.coef_sets, self.bank.num_templates)
        if tuple(coefs.shape) != expected:
            raise ValueError(f"coefficients for task '{task}' must have shape {expected}, got {tuple(coefs.shape)}")
        self.coefs[task] = nn.Parameter(coefs.detach().clone().to(self.bank.templates))

    def task_coefs(self, task: str) -> torch.Tensor:
        """The (K, n) coefficients of ``task``: its parameter, or a view into the model's packed
        tasks (``recast.packed``)."""
        if task in self.coefs:
            return self.coefs[task]
        packed = self._packed[0]
        if packed is not None and task in packed:
            return packed.layer_coefs(self.recast_name, task)
        raise KeyError(f"unknown task '{task}'; known: {list(self.coefs)}"
                       f"{f' and {len(packed)} packed tasks' if packed is not None else ''}")

    def task_weight(self, task: str) -> torch.Tensor:
        """The generated weight of ``task``."""
        return self.bank.combine(self.task_coefs(task))

    @property
    def weight(self) -> torch.Tensor:
        """The active task's generated weight (what adapters add their delta to, eq. 6)."""
        if route_of(self) is not None:
            raise MixedBatchError(
                f"'{self.recast_name}' ({_qualname(self.base_class)}) has its weight read directly by the code "
                "around it (e.g. nn.MultiheadAttention reads out_proj.weight) instead of being called, so a "
                "mixed-task batch cannot give each row its task's weight: run one task at a time with set_task")
        if self.task is None:
            raise RuntimeError("no active task: call RecastModel.set_task(name) first")
        return self.task_weight(self.task)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        r = route_of(self)
        if r is not None:
            if len(args) != 1 or kwargs:
                raise MixedBatchError(f"'{self.recast_name}' was called with more than its input; mixed-task "
                                      "batches route one input tensor per templated module")
            return self._mixed(args[0], r)
        return self._run(self.weight, self._parameters.get("bias"), *args, **kwargs)

    def _run(self, weight: torch.Tensor, bias: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        """The original class's forward with ``weight`` and ``bias``."""
        if self.plain and not kwargs and len(args) == 1:
            return self._plain_forward(args[0], weight, bias)
        return self.base_class.forward(self._as_original(weight, bias), *args, **kwargs)

    def _as_original(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """A view of this layer as a module of the original class holding ``weight`` and ``bias``
        (the other tensors shared, nothing of this layer modified)."""
        state = {k: v for k, v in self.__dict__.items() if k not in _RECAST_ATTRS}
        state["_modules"] = {k: v for k, v in self._modules.items() if k != "coefs"}
        params = self._parameters
        state["_parameters"] = {k: weight if k == "weight" else bias if k == "bias" else params[k]
                                for k in self._param_order}
        view = object.__new__(self.base_class)
        object.__setattr__(view, "__dict__", state)
        return view

    def _plain_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _mixed(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Each row with its own task's weight (see ``recast.mixed``)."""
        name = self.recast_name
        r.check_rows(x, name)
        biases = r.values.get(name)  # per-task biases, where the batch's tasks differ in them
        bias = self._parameters.get("bias")
        strategy = r.strategy
        if r.shapes is not None:
            r.shapes.append(self.shape_of(x))
        if not self.shares_products:
            strategy = "grouped"  # the output may not be linear in the weight: task by task
        elif strategy == "auto":
            strategy = self._pick(x, r)
        r.picks[name] = strategy
        if strategy == "grouped":
            outs = [self._run(self.task_weight(t), biases[u]["bias"] if biases else bias, r.select(x, u))
                    for u, t in enumerate(r.tasks)]
            return r.regroup(outs)
        means = torch.stack([self.task_coefs(t).mean(dim=0) for t in r.tasks])  # (U, n), eq. 2
        if strategy == "batched":
            weights = torch.tensordot(means, self.bank.templates, dims=1)  # (U, *weight shape)
            y = self._batched(x, weights, r)
        else:
            y = self._shared(x, means.index_select(0, r.index))
        if biases:
            per_row = torch.stack([v["bias"] for v in biases]).index_select(0, r.index)  # (B, out)
            return y + self._per_row(per_row, y)
        return y if bias is None else y + self._per_row(bias, y)

    @property
    def shares_products(self) -> bool:
        """Whether a mixed batch may mix template products (output linear in the weight)."""
        return self.plain

    def shape_of(self, x: torch.Tensor) -> LayerShape:
        raise NotImplementedError

    def _pick(self, x: torch.Tensor, r: Routing) -> str:
        shape = self.shape_of(x)
        return pick_strategy(x.shape[0], shape.positions, shape.macs, shape.num_templates, len(r.tasks),
                             shape.out_values, r.widest, weight_bytes=len(r.tasks) * shape.macs * x.element_size())

    def to_plain(self, task: str) -> nn.Module:
        """A module of the original class (the templates' dtype) holding ``task``'s generated weight
        and copies of the live bias and other tensors."""
        weight = nn.Parameter(self.task_weight(task).detach().clone())
        plain = copy.deepcopy(self._as_original(weight, self._parameters.get("bias")))
        for p in plain.parameters():
            p.requires_grad_(True)
        return plain.to(device=self.bank.templates.device, dtype=self.bank.templates.dtype)

    def extra_repr(self) -> str:
        return (f"{_qualname(self.base_class)}: {self.base_class.extra_repr(self)}, "
                f"n={self.bank.num_templates}, K={self.coef_sets}, task={self.task}")


def _computes_like_base(cls: type, base: type) -> bool:
    """Whether ``cls`` (a subclass of ``base``) keeps ``base``'s forward code."""
    if cls.forward is not base.forward:
        return False
    return base is not nn.Conv2d or cls._conv_forward is nn.Conv2d._conv_forward


class RecastLinear(_RecastLayer):
    """An nn.Linear (or subclass) whose weight is generated from a template bank and per-task
    coefficients."""

    kind = nn.Linear

    def _plain_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def shape_of(self, x: torch.Tensor) -> LayerShape:
        """This layer's ``LayerShape`` on input ``x`` (B, ..., in)."""
        positions = x.numel() // max(1, x.shape[0] * self.in_features)
        return LayerShape(positions, self.in_features * self.out_features, self.bank.num_templates, self.out_features,
                          self.shares_products, x.element_size())

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


class RecastConv2d(_RecastLayer):
    """An nn.Conv2d (or subclass) with a generated weight; stride, padding (mode), dilation,
    groups and bias kept."""

    kind = nn.Conv2d

    def _plain_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return nn.Conv2d._conv_forward(self, x, weight, bias)

    @property
    def shares_products(self) -> bool:
        return self.plain and self.padding_mode == "zeros"

    def shape_of(self, x: torch.Tensor) -> LayerShape:
        """This layer's ``LayerShape`` on input ``x`` (B, C, H, W)."""
        positions = 1
        for size, k, s, p, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation):
            positions *= (size + 2 * p - d * (k - 1) - 1) // s + 1
        macs = self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel_size)
        return LayerShape(positions, macs, self.bank.num_templates, self.out_channels, self.shares_products,
                          x.element_size())

    def _batched(self, x: torch.Tensor, weights: torch.Tensor, r: Routing) -> torch.Tensor:
        """Rows placed per task in (m, U * C_in, H, W), one convolution with groups = U * groups."""
        u, (_, c, h, w) = len(r.tasks), x.shape
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


RECAST_LAYERS = (RecastLinear, RecastConv2d)


def _probe_input(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if isinstance(module, nn.Linear):
        return torch.randn(2, module.in_features, generator=gen).to(weight)
    size = max(d * (k - 1) + 1 + s for k, s, d in zip(module.kernel_size, module.stride, module.dilation))
    return torch.randn(2, module.in_channels, size, size, generator=gen).to(weight)


def check_templatable(name: str, module: nn.Module) -> None:
    """Refuse (``UnsupportedModuleError``) a targeted module that a templated layer could not
    compute exactly.

    nn.Linear, nn.Conv2d and subclasses that keep their forward are accepted as they are. A
    subclass that overrides its forward is probed once on a small random input: its forward
    run on a view with its own weight must give its output bit for bit, and with another
    weight a different output (i.e. the forward reads the weight as ``self.weight``).
    """
    cls = type(module)
    qual = _qualname(cls)
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise UnsupportedModuleError(name, qual, "only nn.Linear, nn.Conv2d and their subclasses can be templated")
    if nn.utils.parametrize.is_parametrized(module):
        raise UnsupportedModuleError(name, qual, "its weight is parametrized (torch.nn.utils.parametrize)")
    weight = module._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
        raise UnsupportedModuleError(name, qual, "its weight is not an initialised parameter (lazy module, "
                                     "weight_norm or spectral_norm)")
    if module._forward_pre_hooks or module._forward_pre_hooks_with_kwargs:
        raise UnsupportedModuleError(name, qual, "it has forward pre-hooks, which may rewrite its weight "
                                     "(weight_norm, spectral_norm)")
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if _computes_like_base(cls, base):
        return
    try:
        x = _probe_input(module, weight)
        other = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(weight)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            expected = cls.forward(module, x)
            torch.manual_seed(0)
            same = cls.forward(module_view(module, {"weight": weight.detach()}), x)
            torch.manual_seed(0)
            changed = cls.forward(module_view(module, {"weight": other}), x)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: not supported
        raise UnsupportedModuleError(name, qual, f"its forward failed on a probe input ({type(e).__name__}: {e})") from e
    if not (isinstance(expected, torch.Tensor) and isinstance(same, torch.Tensor) and torch.equal(expected, same)):
        raise UnsupportedModuleError(name, qual, "its forward does not compute from its parameters alone "
                                     "(a view with the same weight gave another output)")
    if torch.equal(expected, changed):
        raise UnsupportedModuleError(name, qual, "its forward does not read its weight as self.weight "
                                     "(another weight gave the same output)")


def computes_like_weight_space(module: nn.Module) -> bool:
    """Whether ``module``'s output is F.linear/F.conv2d (zero padding) of its ``weight`` and
    ``bias``: what a weight-space adapter (LoRA, DoRA, Piggyback, ...) computes in its place.
    False for subclasses that transform the weight or pad in forward (StdConv2d, Conv2dSame)."""
    if isinstance(module, RECAST_LAYERS):
        return module.shares_products
    for base in (nn.Linear, nn.Conv2d):
        if isinstance(module, base):
            return _computes_like_base(type(module), base) and getattr(module, "padding_mode", "zeros") == "zeros"
    return True  # another adapter, or a module of the protocol alone


def make_recast_layer(module: nn.Module, bank: TemplateBank, coef_sets: int) -> RecastLinear | RecastConv2d:
    """The templated layer of an nn.Linear/nn.Conv2d (or subclass); see ``check_templatable``."""
    if isinstance(module, nn.Linear):
        return RecastLinear(module, bank, coef_sets)
    if isinstance(module, nn.Conv2d):
        return RecastConv2d(module, bank, coef_sets)
    raise TypeError(f"cannot template a {type(module).__name__}; only Linear and Conv2d (and subclasses)")


class NormRoute:
    """A norm layer's ``forward`` inside a RecastModel: its class's forward, and in a mixed-task
    batch whose tasks differ in this layer's tensors, that forward run per group of rows on a
    ``module_view`` with each task's tensors. Installed once per norm layer (an instance
    attribute), it keeps no per-call state."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        m = self.module
        forward = type(m).forward
        r = route_of(m)
        values = r.values.get(r.members[id(m)]) if r is not None else None
        if values is None:
            return forward(m, *args, **kwargs)
        x = args[0]
        r.check_rows(x, r.members[id(m)])
        return r.regroup([forward(module_view(m, v), r.select(x, u), *args[1:], **kwargs)
                          for u, v in enumerate(values)])


def route_norms(model: nn.Module, norms: tuple[type, ...], skip: str | None = None) -> None:
    """Install ``NormRoute`` on every layer of ``model`` of the classes ``norms`` (idempotent),
    except inside the module path ``skip`` (the task heads)."""
    for path, m in model.named_modules():
        if skip is not None and (path == skip or path.startswith(skip + ".")):
            continue
        if isinstance(m, norms) and not isinstance(m.__dict__.get("forward"), NormRoute):
            m.forward = NormRoute(m)


def unroute_norms(model: nn.Module) -> None:
    """Remove ``NormRoute`` from ``model`` (a plain copy gets its classes' own forward back)."""
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), NormRoute):
            del m.__dict__["forward"]


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
