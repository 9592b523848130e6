"""GDumb (Prabhu et al., 2020): greedy class-balanced memory, retrain from scratch on it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from recast.baselines.buffer import ClassBalancedBuffer, replay_cross_entropy
from recast.baselines.common import TaskSpec, TrainConfig, check_int
from recast.baselines.method import ContinualMethod, train_epochs, unique_parameters


@dataclass(frozen=True)
class GDumbConfig:
    """GDumb settings.

    Attributes:
        memory_size: samples held in the class-balanced memory (M).
        batch_size: batch size when training on the memory.
    """

    memory_size: int = 500
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_int("GDumbConfig.memory_size", self.memory_size, minimum=1)
        check_int("GDumbConfig.batch_size", self.batch_size, minimum=1)


class _MemoryBatches:
    """Re-iterable shuffled passes over the memory, as ``(images, labels, task_ids)``."""

    def __init__(self, buffer: ClassBalancedBuffer, batch_size: int) -> None:
        self.buffer, self.batch_size = buffer, batch_size

    def __len__(self) -> int:
        return -(-len(self.buffer) // self.batch_size)

    def __iter__(self):
        for b in self.buffer.batches(self.batch_size):
            yield b["images"], b["labels"], b["task_ids"]


class GDumb(ContinualMethod):
    """The stream only fills the memory (one pass over each task's training batches, no
    training on it). After each task the backbone is reset to its initial weights, all heads
    are re-initialised, and the network is trained for ``cfg.epochs`` on the memory alone,
    every sample through its own task head. Cutmix and SGDR of the paper are not used.

    Trainable per task: backbone + every head seen so far. Training state: the memory and the
    initial backbone.
    """

    name = "gdumb"

    def __init__(self, backbone: nn.Module, cfg: GDumbConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg or GDumbConfig()
        self.initial_backbone = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        self.buffer: ClassBalancedBuffer | None = None

    def before_task(self, task: TaskSpec) -> None:
        super().before_task(task)
        if self.buffer is None:
            seed = int(torch.randint(2**62, (1,)))
            self.buffer = ClassBalancedBuffer(self.cfg.memory_size, torch.Generator().manual_seed(seed))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return unique_parameters(self.net.parameters())

    def fill_memory(self, train: Iterable[Any]) -> None:
        """Offer every training sample of the current task to the memory once."""
        assert self.buffer is not None
        for x, y in train:
            self.buffer.add(x.to(self.device), y.to(self.device), len(self.tasks) - 1)

    def reset(self) -> None:
        """Initial backbone weights and freshly initialised heads."""
        self.net.backbone.load_state_dict(self.initial_backbone)
        for head in self.net.heads.values():
            head.reset_parameters()

    def fit_task(self, task: TaskSpec, cfg: TrainConfig, progress: bool = False) -> None:
        self.fill_memory(task.train)
        self.reset()
        assert self.buffer is not None
        train_epochs(self, _MemoryBatches(self.buffer, self.cfg.batch_size),
                     self.memory_loss, self.trainable_parameters(), cfg,
                     f"{self.name}:{task.name}", progress)

    def memory_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Cross-entropy of a memory batch through each sample's task head."""
        images, labels, task_ids = batch
        return replay_cross_entropy(self.net, {"images": images, "labels": labels,
                                               "task_ids": task_ids}, self.tasks)

    def training_state(self) -> dict[str, Tensor]:
        memory = self.buffer.tensors() if self.buffer is not None else {}
        return {**{f"memory.{k}": v for k, v in memory.items()},
                **{f"initial_backbone.{k}": v for k, v in self.initial_backbone.items()}}
