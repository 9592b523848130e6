"""Method recipes: how each row of the paper's Tables 1/2 turns a backbone into a per-task model.

A ``Backbone`` bundles what the pipeline stores once per architecture: the timm model name
and kwargs, the plain pretrained weights, and (after Neural Mimicry) the RECAST config, banks
and reconstructed base coefficients. ``build_method`` returns the model for one task, the
parameters to train and a function giving the per-task payload tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from recast.config import RecastConfig
from recast.model import RecastModel, apply

MethodKind = Literal["head_only", "full", "recast", "adapter"]


@dataclass
class Backbone:
    """One architecture's shared state.

    Attributes:
        model_name: timm model name, exactly as timm spells it; model_kwargs: its kwargs.
        state: the plain pretrained state_dict (with the source head of ``num_classes``).
        recast_config, banks, base: RECAST form after mimicry (None before).
    """

    model_name: str
    model_kwargs: dict[str, Any]
    state: dict[str, torch.Tensor]
    num_classes: int | None = None
    recast_config: RecastConfig | None = None
    banks: dict[str, torch.Tensor] | None = None
    base: dict[str, torch.Tensor] | None = None
    apply_seed: int = 0

    def plain(self) -> nn.Module:
        """A fresh plain model with the pretrained weights."""
        kwargs = dict(self.model_kwargs)
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        model = timm.create_model(self.model_name, pretrained=False, **kwargs)
        model.load_state_dict(self.state)
        return model

    def recast(self) -> RecastModel:
        """A fresh RecastModel with the reconstructed banks and base coefficients."""
        if self.recast_config is None or self.banks is None or self.base is None:
            raise ValueError(f"backbone {self.model_name} has no RECAST form yet: run mimicry first")
        rc = apply(self.plain(), self.recast_config, seed=self.apply_seed, inplace=True)
        with torch.no_grad():
            for key, t in self.banks.items():
                rc.banks[key].templates.copy_(t)
        rc.load_task_tensors(self.recast_config.base_task, self.base)
        rc.drop_reference()
        return rc


@dataclass(frozen=True)
class MethodSpec:
    """One method row: ``kind`` plus, for adapters, the adapter preset and overrides.

    Attributes:
        kind: head_only (fine-tuned classifier), full (full fine-tuning), recast (RECAST-FT),
            adapter (an adapter preset, alone or with ``recast=True`` for eq. 6).
        lr: learning rate override for this method (None: the stage's).
    """

    kind: MethodKind
    adapter: str | None = None
    recast: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    archs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("head_only", "full", "recast", "adapter"):
            raise ValueError(f"method kind must be one of head_only, full, recast, adapter; got {self.kind!r}")
        if self.kind == "adapter" and not self.adapter:
            raise ValueError("method kind 'adapter' needs adapter=<preset name>")


def _no_prepare(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device | None = None) -> None:
    """Nothing to set up from data."""


@dataclass
class BuiltMethod:
    """A per-task model ready to train.

    Attributes:
        prepare: ``prepare(train_batches, device=None)``, data-dependent set-up to call once
            before training: RoSA with ``support="gradient"`` moves its sparse support to the
            entries of largest |dL/dW| of the cross-entropy on the first training batch (model
            in eval mode, so BatchNorm statistics are not touched; on ``device`` if given).
            A no-op for every other method. ``payload()`` raises if a required ``prepare``
            was skipped.
        head: the task's classifier (inside ``model``).
    """

    model: nn.Module
    trainable: list[nn.Parameter]
    payload: Callable[[], dict[str, torch.Tensor]]
    stored_params: Callable[[], int]
    prepare: Callable[..., None] = _no_prepare
    head: nn.Module | None = None

    def head_params(self) -> int:
        """Trainable parameters of the task's classifier."""
        head = {id(p) for p in self.head.parameters()} if self.head is not None else set()
        return sum(p.numel() for p in self.trainable if id(p) in head)


def _head_of(model: nn.Module) -> nn.Module:
    return model.get_classifier()


def build_method(spec: MethodSpec, backbone: Backbone, task: str, num_classes: int) -> BuiltMethod:
    """Build ``spec``'s model for ``task`` from ``backbone``."""
    if spec.kind == "recast" or (spec.kind == "adapter" and spec.recast):
        rc = backbone.recast()
        rc.add_task(task, num_classes=num_classes)
        rc.set_task(task)
        model: nn.Module = rc
        root = rc.model
        head = rc.task_heads.heads[task] if rc.task_heads is not None else None

        def base_payload() -> dict[str, torch.Tensor]:
            return rc.task_tensors(task)
    else:
        model = backbone.plain()
        model.reset_classifier(num_classes)
        root = model
        head = _head_of(model)
        for p in model.parameters():
            p.requires_grad_(spec.kind == "full")
        for p in _head_of(model).parameters():
            p.requires_grad_(True)

        def base_payload() -> dict[str, torch.Tensor]:
            if spec.kind == "full":
                return {k: v.detach() for k, v in model.state_dict().items()}
            return {f"head.{k}": v.detach() for k, v in _head_of(model).state_dict().items()}

    adapter_params: list[nn.Parameter] = []
    prepare: Callable[..., None] = _no_prepare
    if spec.kind == "adapter":
        from recast.adapters import adapter_parameters, adapter_preset, adapter_state, add_adapters

        cfg = adapter_preset(spec.adapter, **spec.overrides)
        add_adapters(root, cfg)
        adapter_params = adapter_parameters(root)
        for p in adapter_params:
            p.requires_grad_(True)
        needs_support = cfg.kind == "rosa" and cfg.support == "gradient"
        prepared = [False]

        def payload() -> dict[str, torch.Tensor]:
            if needs_support and not prepared[0]:
                raise RuntimeError(f"adapter preset {spec.adapter!r} has support='gradient' but prepare() was never "
                                   "called: call BuiltMethod.prepare(train_batches) before training")
            out = base_payload()
            out.update({f"extra.adapter.{k}": v.detach() for k, v in adapter_state(root).items()})
            return out

        if needs_support:
            def prepare(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device | None = None) -> None:
                _select_support(model, root, batches, device)
                prepared[0] = True
    else:
        payload = base_payload

    trainable = [p for p in model.parameters() if p.requires_grad]
    return BuiltMethod(model, trainable, payload, lambda: sum(t.numel() for t in payload().values()), prepare, head)


def _select_support(model: nn.Module, root: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: str | torch.device | None) -> None:
    """RoSA's gradient support: largest |dL/dW| of the cross-entropy on the first batch."""
    from recast.adapters import select_rosa_support

    if device is not None:
        model.to(device)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("prepare: the training batches are empty; RoSA's gradient support needs one batch")
    ref = next(model.parameters())
    x, y = first[0].to(ref.device), first[1].to(ref.device)
    was_training = model.training
    model.eval()
    try:
        select_rosa_support(root, lambda _: F.cross_entropy(model(x), y))
    finally:
        model.train(was_training)
