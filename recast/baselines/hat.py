"""HAT: hard attention to the task (Serra et al., 2018) on timm ViT and ResNet backbones.

Checked against the authors' code, joansj/hat at 6fd0b9d (``src/approaches/hat.py``,
``src/networks/alexnet_hat.py``); see tests/baselines/test_reference_hat.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from recast.baselines.common import TaskSpec
from recast.baselines.method import ContinualMethod, unique_parameters
from recast.training import TuneConfig
from recast.validation import AtLeastOne, NonNegative, Positive, validate_fields


@dataclass(frozen=True)
class HATConfig:
    """HAT settings (defaults from the paper and its code).

    Attributes:
        s_max: gate scale at test time; while training, batch b of an epoch of B batches uses
            ``1/s_max + (s_max - 1/s_max) * b / B`` (the authors' ``i / len(r)`` on the batch's
            first sample, exact when the batches are equal), so the last batch stays below s_max.
        reg_lambda: weight c of the mask-sparsity regulariser.
        clamp_cosh: clamp of ``s * e`` in the embedding-gradient compensation.
        clamp_embedding: task embeddings are clamped to ``[-clamp_embedding, clamp_embedding]``.
        ungated: parameters outside the gated units (attention, norms, stem, downsample): train
            them on the first task only (``"freeze_after_first"``, which also freezes
            BatchNorm statistics from the second task on) or on every task (``"train"``,
            unprotected). The authors' networks gate every layer, so they have no such
            parameter; freezing them is their rule with the ungated sides counted as used.
        grad_clip: global gradient-norm clip of HAT's training (replaces the run's
            ``grad_clip``): the authors' 10000. The embedding-gradient compensation multiplies
            those gradients by up to ``s_max^2``, so a clip of 1.0 would shrink every weight
            gradient with them. None: no clipping.
    """

    s_max: AtLeastOne = 400.0
    reg_lambda: NonNegative = 0.75
    clamp_cosh: Positive = 50.0
    clamp_embedding: Positive = 6.0
    ungated: Literal["freeze_after_first", "train"] = "freeze_after_first"
    grad_clip: Positive | None = 10000.0

    def __post_init__(self) -> None:
        validate_fields(self, "HATConfig.")


@dataclass
class GateSite:
    """A gated set of units: the output of ``module`` is multiplied by the task's gates.

    Attributes:
        module: module whose output is gated.
        units: number of units (channels / hidden features).
        unit_dim: dimension of the output that indexes the units.
    """

    module: nn.Module
    units: int
    unit_dim: int


@dataclass
class GatedParam:
    """A parameter whose entries belong to gated units: ``axes`` lists ``(axis, site)``."""

    param: nn.Parameter
    axes: list[tuple[int, int]] = field(default_factory=list)


def gate_sites(backbone: nn.Module) -> tuple[list[GateSite], list[GatedParam]]:
    """Gate sites and gated parameters of a timm VisionTransformer or ResNet.

    ViT: the hidden units of every block's MLP (output of ``mlp.act``); fc1 rows and bias are
    owned by the unit (axis 0), fc2 columns read it (axis 1). ResNet: the channels of every
    ``bn{k}`` inside the residual blocks; ``conv{k}`` output channels and ``bn{k}`` affine
    parameters are owned (axis 0), ``conv{k}`` input channels read the previous ``bn{k-1}``.
    """
    sites: list[GateSite] = []
    params: list[GatedParam] = []
    if isinstance(backbone, VisionTransformer):
        for i, block in enumerate(backbone.blocks):
            mlp = getattr(block, "mlp", None)
            if not isinstance(mlp, Mlp) or not isinstance(mlp.norm, nn.Identity):
                raise TypeError(f"blocks[{i}].mlp is {type(mlp).__name__}; HAT gates timm Mlp "
                                "(fc1, act, fc2) without a hidden norm")
            s = len(sites)
            sites.append(GateSite(mlp.act, mlp.fc1.out_features, -1))
            params.append(GatedParam(mlp.fc1.weight, [(0, s)]))
            if mlp.fc1.bias is not None:
                params.append(GatedParam(mlp.fc1.bias, [(0, s)]))
            params.append(GatedParam(mlp.fc2.weight, [(1, s)]))
        return sites, params
    if isinstance(backbone, ResNet):
        for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            for block in stage:
                prev, k = None, 1
                while hasattr(block, f"conv{k}") and hasattr(block, f"bn{k}"):
                    conv, bn = getattr(block, f"conv{k}"), getattr(block, f"bn{k}")
                    s = len(sites)
                    sites.append(GateSite(bn, bn.num_features, 1))
                    axes = [(0, s)] + ([(1, prev)] if prev is not None else [])
                    params.append(GatedParam(conv.weight, axes))
                    params.extend(GatedParam(p, [(0, s)]) for p in (conv.bias, bn.weight, bn.bias)
                                  if p is not None)
                    prev, k = s, k + 1
        return sites, params
    raise TypeError(f"HAT supports timm VisionTransformer and ResNet backbones, "
                    f"got {type(backbone).__name__}")


def _along(values: Tensor, axis: int, ndim: int) -> Tensor:
    """View a ``(units,)`` vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return values.view(shape)


class HAT(ContinualMethod):
    """Shared backbone, one task embedding per gated unit; gates ``sigmoid(s * e)`` multiply the
    unit outputs (forward hooks). Updates of units used by earlier tasks are blocked.

    Gradient compensation (paper eq. 5): ``g_ij *= 1 - min(a_i^{<t}, a_j^{<t})`` over the
    units a weight connects; an ungated side (residual stream, block input) counts as used
    (a = 1), so the factor is ``1 - a`` of the gated side. The factor is applied once: to the
    gradient before clipping with SGD without weight decay (the authors' rule), otherwise to the
    update (``theta <- theta_old + factor * (theta_new - theta_old)``): AdamW's per-parameter
    normalisation would undo a constant gradient factor, and weight decay would move protected
    weights. Loss adds ``c * sum a^t (1 - a^{<t}) / sum (1 - a^{<t})``.
    Trainable per task: gated parameters (plus the ungated ones on the first task or with
    ``ungated="train"``) + the task embedding + the task head.
    """

    name = "hat"

    def __init__(self, backbone: nn.Module, cfg: HATConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg or HATConfig()
        self.sites, self.gated = gate_sites(backbone)
        gated_ids = {id(g.param) for g in self.gated}
        self.ungated = [p for p in backbone.parameters() if id(p) not in gated_ids]
        self.embeddings = nn.ModuleDict()  # task -> ParameterList, one (units,) per site
        for i, site in enumerate(self.sites):  # a^{<t} per site, moved by .to() with the model
            self.register_buffer(f"cumulative_{i}", torch.zeros(site.units))
        self._gates: list[Tensor] | None = None
        self._before: list[Tensor] = []
        self._mask_update = False  # set by fit_task: plain SGD masks the gradient, AdamW (or weight decay) the update
        self._hooks = [s.module.register_forward_hook(self._gate_hook(i))
                       for i, s in enumerate(self.sites)]

    @property
    def cumulative(self) -> list[Tensor]:
        """Cumulative gates ``a^{<t}`` of the tasks trained so far, one ``(units,)`` per site."""
        return [getattr(self, f"cumulative_{i}") for i in range(len(self.sites))]

    def _gate_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            if self._gates is None:
                return None
            site = self.sites[index]
            return output * _along(self._gates[index], site.unit_dim % output.ndim, output.ndim)
        return hook

    def gates(self, task: str, s: float) -> list[Tensor]:
        """``sigmoid(s * e_task)`` per site."""
        if task not in self.embeddings:
            raise ValueError(f"unknown task {task!r}; known tasks: {list(self.embeddings)}")
        return [torch.sigmoid(s * e) for e in self.embeddings[task]]

    def gated_forward(self, x: Tensor, task: str, s: float) -> tuple[Tensor, list[Tensor]]:
        """Logits and gates of ``task`` at scale ``s``."""
        self._gates = self.gates(task, s)
        try:
            return self.net(x, task), self._gates
        finally:
            self._gates = None

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.gated_forward(x, task, self.cfg.s_max)[0]

    def current_scale(self) -> float:
        """Annealed s of the current batch: ``1/s_max + (s_max - 1/s_max) * b / B``."""
        if self.num_batches is None:
            raise TypeError("HAT anneals s over an epoch: the training batches need a len()")
        frac = self.batch_index / max(self.num_batches, 1)
        return 1.0 / self.cfg.s_max + (self.cfg.s_max - 1.0 / self.cfg.s_max) * frac

    def fit_task(self, task: TaskSpec, cfg: TuneConfig, progress: bool = False) -> None:
        """The shared loop with HAT's gradient clip; the protection follows the optimiser."""
        self._mask_update = cfg.optimizer != "sgd" or cfg.weight_decay > 0
        super().fit_task(task, dataclasses.replace(cfg, grad_clip=self.cfg.grad_clip), progress)

    def before_task(self, task: TaskSpec) -> None:
        super().before_task(task)
        device = self.device
        self.embeddings[task.name] = nn.ParameterList(
            [nn.Parameter(torch.randn(s.units, device=device)) for s in self.sites])
        if self.freeze_ungated:
            for p in self.ungated:
                p.requires_grad_(False)

    @property
    def freeze_ungated(self) -> bool:
        """Whether ungated parameters and BatchNorm statistics are frozen for this task."""
        return self.cfg.ungated == "freeze_after_first" and len(self.tasks) > 1

    def train(self, mode: bool = True) -> HAT:
        super().train(mode)
        if mode and self.freeze_ungated:
            for m in self.net.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        task = self.current_task
        backbone = [g.param for g in self.gated]
        if not self.freeze_ungated:
            backbone += self.ungated
        return unique_parameters([*backbone, *self.embeddings[task],
                                  *self.net.head(task).parameters()])

    def mask_regulariser(self, gates: list[Tensor]) -> Tensor:
        """``sum a^t (1 - a^{<t}) / sum (1 - a^{<t})`` over all units."""
        used = torch.stack([(g * (1 - c)).sum() for g, c in zip(gates, self.cumulative)]).sum()
        free = sum(float((1 - c).sum()) for c in self.cumulative)
        return used / max(free, 1.0)

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec) -> Tensor:
        logits, gates = self.gated_forward(x, task.name, self.current_scale())
        return F.cross_entropy(logits, y) + self.cfg.reg_lambda * self.mask_regulariser(gates)

    def protection(self, gated: GatedParam) -> Tensor:
        """Update factor ``1 - min over axes of a^{<t}`` broadcastable to the parameter."""
        ndim = gated.param.ndim
        used = None
        for axis, site in gated.axes:
            a = _along(self.cumulative[site], axis, ndim)
            used = a if used is None else torch.minimum(used, a)
        return 1.0 - used

    def before_step(self) -> None:
        s = self.current_scale()
        if len(self.tasks) > 1:
            if self._mask_update:
                self._before = [g.param.detach().clone() for g in self.gated]
            else:
                for g in self.gated:
                    if g.param.grad is not None:
                        g.param.grad.mul_(self.protection(g))
        thres = self.cfg.clamp_cosh
        for e in self.embeddings[self.current_task]:
            if e.grad is not None:
                num = torch.cosh(torch.clamp(s * e.detach(), -thres, thres)) + 1
                den = torch.cosh(e.detach()) + 1
                e.grad.mul_(self.cfg.s_max / s * num / den)

    @torch.no_grad()
    def after_step(self) -> None:
        if self._before:
            for g, old in zip(self.gated, self._before):
                g.param.copy_(old + self.protection(g) * (g.param - old))
            self._before = []
        for e in self.embeddings[self.current_task]:
            e.clamp_(-self.cfg.clamp_embedding, self.cfg.clamp_embedding)

    @torch.no_grad()
    def after_task(self, task: TaskSpec, train: Iterable[Any]) -> None:
        gates = self.gates(task.name, self.cfg.s_max)
        for i, (c, g) in enumerate(zip(self.cumulative, gates)):
            setattr(self, f"cumulative_{i}", torch.maximum(c, g))

    def task_state(self, task: str) -> dict[str, Tensor]:
        state = super().task_state(task)
        for i, e in enumerate(self.embeddings[task]):
            state[f"embeddings.{task}.{i}"] = e.detach()
        return state

    def training_state(self) -> dict[str, Tensor]:
        return {f"cumulative.{i}": c for i, c in enumerate(self.cumulative)}
