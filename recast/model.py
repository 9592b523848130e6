"""RecastModel: a network whose targeted layers read shared template banks, with per-task
coefficient sets and heads (``apply``, ``add_task``, ``set_task``, ``materialize``)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import torch
from torch import nn

from recast.config import RecastConfig
from recast.layers import RECAST_LAYERS, TemplateBank, make_recast_layer, random_unit_coefficients
from recast.targets import LayerKeyFn, Plan, build_plan, template_fan_mode

_TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class TaskHeads(nn.Module):
    """One classifier per task; forwards through the active task's head."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict()
        self.task: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task is None:
            raise RuntimeError("no active task: call RecastModel.set_task(name) first")
        return self.heads[self.task](x)


def _get_parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def _find_head_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(name, str):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            pass
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for n, m in model.named_modules():
            if m is head and n:
                return n
    return None


class RecastModel(nn.Module):
    """A model rewritten into template banks + per-task coefficients (paper eqs. 1-2).

    Attributes:
        model: the wrapped network, its targeted layers replaced by RecastLinear/RecastConv2d
            and its classifier (if any) by TaskHeads.
        banks: the template banks, stored once (layers reference them without registering).
        plan: the grouping plan; config: the RecastConfig.
        reference_weights: the original weights of the targeted modules (not in the
            state_dict), the target of Neural Mimicry; dropped by ``drop_reference()``.
    """

    def __init__(self, model: nn.Module, config: RecastConfig, layer_key: LayerKeyFn | None = None,
                 head_name: str | None = None, seed: int = 0):
        super().__init__()
        self.config = config
        self.plan: Plan = build_plan(model, config, layer_key)
        gen = torch.Generator().manual_seed(seed)
        modules = dict(model.named_modules())
        first = next(iter(model.parameters()))
        self.banks = nn.ModuleDict({
            b.key: TemplateBank(b.templates, b.shape, generator=gen, fan_mode=template_fan_mode(config, b.role))
            .to(first.device, first.dtype)
            for b in self.plan.banks
        })
        self.reference_weights: dict[str, torch.Tensor] = {}
        self.original_param_count = sum(p.numel() for p in model.parameters())
        base = config.base_task
        for mp in self.plan.modules:
            original = modules[mp.name]
            self.reference_weights[mp.name] = original.weight.detach().clone()
            layer = make_recast_layer(original, self.banks[mp.bank], config.coef_sets)
            layer.add_task(base, random_unit_coefficients(config.coef_sets, self.banks[mp.bank].num_templates, gen))
            layer.recast_name = mp.name  # stable name even when an adapter later wraps the layer
            parent, child = _get_parent(model, mp.name)
            setattr(parent, child, layer)
        self.head_name = head_name if head_name is not None else _find_head_name(model)
        self.num_features = getattr(model, "num_features", None)
        if self.head_name is not None:
            head = model.get_submodule(self.head_name)
            if isinstance(head, nn.Linear):
                self.num_features = head.in_features
            heads = TaskHeads()
            heads.heads[base] = head
            parent, child = _get_parent(model, self.head_name)
            setattr(parent, child, heads)
        self.model = model
        self.tasks: list[str] = [base]
        self.active_task: str | None = None
        self.set_task(base, freeze=False)

    # ----------------------------------------------------------------- structure
    def recast_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, layer) of every RecastLinear/RecastConv2d, named as in the original model
        (also when an adapter wraps the layer, so task payloads do not depend on adapters)."""
        for module in self.model.modules():
            if isinstance(module, RECAST_LAYERS):
                yield module.recast_name, module

    @property
    def task_heads(self) -> TaskHeads | None:
        return self.model.get_submodule(self.head_name) if self.head_name is not None else None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ----------------------------------------------------------------- tasks
    def add_task(self, task: str, num_classes: int | None = None, init_from: str | None = None,
                 init: str = "copy", generator: torch.Generator | None = None) -> None:
        """Add a task: its coefficient sets and (if ``num_classes``) a new head.

        Args:
            task: name ([A-Za-z0-9_-]+).
            num_classes: size of the new head; None keeps no head of its own.
            init_from: task whose coefficients are copied (default: the base task, i.e. the
                reconstructed backbone every task starts from).
            init: ``"copy"`` or ``"random"`` (paper init: random unit vectors).
        """
        if not isinstance(task, str) or not _TASK_NAME.match(task):
            raise ValueError(f"task name must match [A-Za-z0-9_-]+, got {task!r}")
        if task in self.tasks:
            raise ValueError(f"task '{task}' exists already; known: {self.tasks}")
        src = init_from or self.config.base_task
        if src not in self.tasks:
            raise ValueError(f"init_from='{src}' is not a known task; known: {self.tasks}")
        if init not in ("copy", "random"):
            raise ValueError(f"init must be 'copy' or 'random', got {init!r}")
        for _, layer in self.recast_layers():
            if init == "copy":
                layer.add_task(task, layer.coefs[src].detach())
            else:
                layer.add_task(task, random_unit_coefficients(layer.coef_sets, layer.bank.num_templates, generator))
        if num_classes is not None:
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
            if self.task_heads is None or self.num_features is None:
                raise ValueError("this model has no classifier to replace; pass head_name= to recast.apply")
            device = self.banks[next(iter(self.banks))].templates.device
            self.task_heads.heads[task] = nn.Linear(self.num_features, num_classes).to(device)
        self.tasks.append(task)

    def set_task(self, task: str, freeze: bool = True, train_biases: bool = False, train_norms: bool = False) -> None:
        """Activate ``task``; with ``freeze`` only its coefficients and head stay trainable.

        Args:
            train_biases: also train the biases of templated layers (shared, reported separately).
            train_norms: also train LayerNorm/BatchNorm affine parameters (shared).
        """
        if task not in self.tasks:
            raise ValueError(f"unknown task '{task}'; known: {self.tasks}")
        for _, layer in self.recast_layers():
            layer.task = task
        heads = self.task_heads
        if heads is not None:
            heads.task = task if task in heads.heads else self.config.base_task
        self.active_task = task
        if not freeze:
            return
        for p in self.parameters():
            p.requires_grad_(False)
        for _, layer in self.recast_layers():
            layer.coefs[task].requires_grad_(True)
            if train_biases and layer.bias is not None:
                layer.bias.requires_grad_(True)
        if heads is not None and task in heads.heads:
            for p in heads.heads[task].parameters():
                p.requires_grad_(True)
        if train_norms:
            for m in self.model.modules():
                if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
                    for p in m.parameters():
                        p.requires_grad_(True)

    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """The tensors that define ``task``: ``coefs.<module>`` (K, n) and ``head.<param>``."""
        if task not in self.tasks:
            raise ValueError(f"unknown task '{task}'; known: {self.tasks}")
        out = {f"coefs.{name}": layer.coefs[task].detach() for name, layer in self.recast_layers()}
        heads = self.task_heads
        if heads is not None and task in heads.heads:
            out.update({f"head.{k}": v.detach() for k, v in heads.heads[task].state_dict().items()})
        return out

    def load_task_tensors(self, task: str, tensors: dict[str, torch.Tensor], num_classes: int | None = None) -> None:
        """Create or overwrite ``task`` from ``task_tensors``-style tensors."""
        layers = dict(self.recast_layers())
        coef_keys = {k[len("coefs."):] for k in tensors if k.startswith("coefs.")}
        if coef_keys != set(layers):
            missing, extra = sorted(set(layers) - coef_keys), sorted(coef_keys - set(layers))
            raise ValueError(f"task '{task}' tensors do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        if task not in self.tasks:
            self.add_task(task, num_classes=num_classes)
        for name, layer in layers.items():
            layer.add_task(task, tensors[f"coefs.{name}"])
        head_sd = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        if head_sd:
            heads = self.task_heads
            if heads is None:
                raise ValueError("payload has a head but this model has no classifier")
            w = head_sd["weight"]
            heads.heads[task] = nn.Linear(w.shape[1], w.shape[0], bias="bias" in head_sd).to(w.dtype)
            heads.heads[task].load_state_dict(head_sd)
            heads.heads[task].to(next(iter(self.banks.values())).templates.device)

    # ----------------------------------------------------------------- export
    def materialize(self, task: str) -> nn.Module:
        """A plain model of the original classes with ``task``'s generated weights and head.

        The result holds no reference to the banks; its outputs match this model's for
        ``task`` (to float rounding).
        """
        if task not in self.tasks:
            raise ValueError(f"unknown task '{task}'; known: {self.tasks}")
        return self._plain_copy(lambda name, layer: layer.to_plain(task), task)

    def reference_model(self) -> nn.Module:
        """A plain copy holding the original (pre-RECAST) weights and the base head."""
        if not self.reference_weights:
            raise RuntimeError("reference weights were dropped (drop_reference was called)")

        def plain(name: str, layer: nn.Module) -> nn.Module:
            out = layer.to_plain(self.config.base_task)
            with torch.no_grad():
                out.weight.copy_(self.reference_weights[name])
            return out

        return self._plain_copy(plain, self.config.base_task)

    def drop_reference(self) -> None:
        """Free the copy of the original weights (after mimicry)."""
        self.reference_weights = {}

    def _plain_copy(self, make_plain, task: str) -> nn.Module:
        memo = {id(b): b for b in self.banks.values()}  # do not deep-copy the banks
        for b in self.banks.values():
            memo[id(b.templates)] = b.templates
        model = copy.deepcopy(self.model, memo)
        for path, layer in [(n, m) for n, m in self.model.named_modules() if isinstance(m, RECAST_LAYERS)]:
            parent, child = _get_parent(model, path)
            setattr(parent, child, make_plain(layer.recast_name, layer))
        if self.head_name is not None:
            heads = self.task_heads
            head = heads.heads[task] if task in heads.heads else heads.heads[self.config.base_task]
            parent, child = _get_parent(model, self.head_name)
            setattr(parent, child, copy.deepcopy(head))
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def apply(model: nn.Module, config: RecastConfig, layer_key: LayerKeyFn | None = None,
          head_name: str | None = None, seed: int = 0, inplace: bool = False) -> RecastModel:
    """Rewrite ``model``'s targeted Linear/Conv2d layers into template banks + coefficients.

    Args:
        model: any torch model (timm or not).
        config: targets, G, n, K.
        layer_key: ``name -> (stack, index) | None``; default parses the last numeric path part.
        head_name: the classifier module to make per-task (timm: found automatically).
        seed: seed of the template/coefficient init (local generator).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The RecastModel; the base task holds the original head and random coefficients until
        ``recast.mimic`` reconstructs the original weights.
    """
    if not inplace:
        model = copy.deepcopy(model)
    return RecastModel(model, config, layer_key=layer_key, head_name=head_name, seed=seed)
