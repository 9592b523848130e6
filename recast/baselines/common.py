"""Shared pieces of the baselines: task specs, training config, multi-head network, state sizes.

Setting: task-incremental learning. Every task has its own classifier head and its identity is
known at test time. Batches are ``(images, labels)`` pairs: images float ``(B, 3, H, W)``,
labels int64 ``(B,)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from recast.checks import check_int
from recast.training import TuneConfig
from recast.validation import AtLeast1, NonNegative, Positive

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
class TrainConfig(TuneConfig):
    """``recast.training.TuneConfig`` (the one training recipe) with the baselines' defaults:
    1 epoch, lr 1e-3, no weight decay, a constant learning rate (``step_size=None``) and
    BatchNorm statistics updated while training (``freeze_bn_stats=False``). Batch size comes
    from the task loaders; ``seed`` seeds the run (see ``run_sequential``)."""

    epochs: AtLeast1 = 1
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.0
    step_size: AtLeast1 | None = None
    freeze_bn_stats: bool = False


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
