"""Shared pieces of the baselines: task specs, training config, multi-head network, evaluation.

Setting: task-incremental learning. Every task has its own classifier head and its identity is
known at test time. Batches are ``(images, labels)`` pairs: images float ``(B, 3, H, W)``,
labels int64 ``(B,)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
C = TypeVar("C")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a sequence.

    Attributes:
        name: unique task name (no ``.``; it keys the heads).
        num_classes: number of classes of the task's head.
        train: re-iterable of ``(images, labels)`` batches. If it has ``set_epoch(e)``, the
            training loop calls it at the start of every epoch (reshuffling).
        val: batches used for the reported validation accuracy, or None.
        test: batches of the test split (the accuracy matrix is measured on these).
    """

    name: str
    num_classes: int
    train: Iterable[Batch]
    val: Iterable[Batch] | None
    test: Iterable[Batch]

    def __post_init__(self) -> None:
        check_task_name(self.name)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"TaskSpec.num_classes must be an int >= 1, got {self.num_classes!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every method (batch size comes from the task loaders).

    Attributes:
        epochs: passes over each task's training batches.
        lr: learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        optimizer: ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum (ignored by AdamW).
        grad_clip: max global gradient norm, or None for no clipping.
        lr_step_size: StepLR step in epochs, or None for a constant learning rate.
        lr_gamma: StepLR decay factor.
        seed: seed of the run (heads, buffers, embeddings created during the run, dropout).
        device: torch device string, e.g. ``"cpu"`` or ``"cuda"``.
    """

    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    grad_clip: float | None = 1.0
    lr_step_size: int | None = None
    lr_gamma: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_int("TrainConfig.epochs", self.epochs, minimum=1)
        check_positive("TrainConfig.lr", self.lr)
        check_positive("TrainConfig.weight_decay", self.weight_decay, allow_zero=True)
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if self.grad_clip is not None:
            check_positive("TrainConfig.grad_clip", self.grad_clip)
        if self.lr_step_size is not None:
            check_int("TrainConfig.lr_step_size", self.lr_step_size, minimum=1)
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"TrainConfig.lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        check_int("TrainConfig.seed", self.seed, minimum=0)
        torch.device(self.device)  # raises RuntimeError naming a malformed device string


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is a number > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def check_task_name(name: Any) -> None:
    """Raise ValueError unless ``name`` is a non-empty string without ``.``."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"task name must be a non-empty string without '.', got {name!r}")


def config_from_mapping(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build the frozen config ``cls`` from a mapping; unknown keys are a ValueError naming them."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    return cls(**values)


class TensorBatches:
    """Re-iterable mini-batches over in-memory tensors, reshuffled per epoch from a seed.

    Args:
        images: ``(N, 3, H, W)`` float images.
        labels: ``(N,)`` int64 labels.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: shuffle with ``seed + epoch`` at every epoch.
        seed: base seed of the shuffles.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images has {images.shape[0]} samples but labels {labels.shape[0]}")
        check_int("batch_size", batch_size, minimum=1)
        self.images, self.labels = images, labels.long()
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.labels.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = self.labels.shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.images[idx], self.labels[idx]


class MultiHeadNet(nn.Module):
    """A timm backbone (created with ``num_classes=0``) plus one linear head per task.

    Args:
        backbone: module whose ``forward`` returns pooled features ``(B, num_features)``.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int):
            raise TypeError(f"backbone {type(backbone).__name__} has no int num_features; "
                            "pass a timm model")
        if getattr(backbone, "num_classes", 0) != 0:
            raise ValueError(f"backbone has num_classes={backbone.num_classes}; create it with "
                             "num_classes=0 so forward returns features")
        self.backbone = backbone
        self.num_features = num_features
        self.heads = nn.ModuleDict()

    def add_head(self, task: str, num_classes: int) -> nn.Linear:
        """Create the head of ``task`` (``num_features -> num_classes``) on the backbone's device."""
        check_task_name(task)
        if task in self.heads:
            raise ValueError(f"task {task!r} already has a head; known tasks: {list(self.heads)}")
        check_int("num_classes", num_classes, minimum=1)
        device = next(self.backbone.parameters()).device
        head = nn.Linear(self.num_features, num_classes).to(device)
        self.heads[task] = head
        return head

    def head(self, task: str) -> nn.Module:
        """The head of ``task``; ValueError naming the known tasks otherwise."""
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; known tasks: {list(self.heads)}")
        return self.heads[task]

    def features(self, x: Tensor) -> Tensor:
        """Backbone features ``(B, num_features)``."""
        return self.backbone(x)

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.head(task)(self.backbone(x))


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameter-free module)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: Callable[[Tensor, str], Tensor], task: str, loader: Iterable[Batch],
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``model(x, task)`` over ``loader``, in eval mode (mode restored after).

    Args:
        model: a ContinualMethod, MultiHeadNet or any callable ``(images, task) -> logits``.
        task: task name passed to the model.
        loader: ``(images, labels)`` batches.
        device: where batches go; default: the model's device.
    """
    is_module = isinstance(model, nn.Module)
    if device is None:
        device = module_device(model) if is_module else torch.device("cpu")
    was_training = bool(model.training) if is_module else False
    if is_module:
        model.eval()
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        correct += int((model(images, task).argmax(dim=1) == labels).sum())
        total += labels.numel()
    if is_module:
        model.train(was_training)
    if total == 0:
        raise ValueError(f"loader of task {task!r} yielded no samples")
    return correct / total


def state_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors, counting storage shared between entries once."""
    seen: set[tuple[int, int, int]] = set()
    total = 0
    for tensor in tensors.values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def prefixed(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` (parameters and buffers, detached) with keys ``prefix.name``."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` as set by ``cfg``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
