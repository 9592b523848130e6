"""GDumb (Prabhu et al., 2020): greedy class-balanced memory, retrain from scratch on it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.baselines.buffer import (
    ClassBalancedBuffer,
    grouped_logits,
    load_replay_checkpoint_state,
    replay_checkpoint_state,
)
from recast.baselines.common import TaskSpec
from recast.baselines.method import ContinualMethod, train_epochs, unique_parameters
from recast.training import TuneConfig
from recast.validation import AtLeast1, Fraction, Positive, validate_fields


@dataclass(frozen=True)
class GDumbConfig:
    """GDumb settings.

    Attributes:
        memory_size: samples held in the class-balanced memory (M).
        batch_size: batch size when training on the memory.
        cutmix_prob: probability that a memory batch is cutmixed (GDumb: 0.5; 0 turns it off).
        cutmix_alpha: Beta(alpha, alpha) of the pasted area fraction (GDumb: 1.0).
    """

    memory_size: AtLeast1 = 500
    batch_size: AtLeast1 = 32
    cutmix_prob: Fraction = 0.5
    cutmix_alpha: Positive = 1.0

    def __post_init__(self) -> None:
        validate_fields(self, "GDumbConfig.")


def cutmix_within_tasks(images: Tensor, task_ids: Tensor, alpha: float,
                        gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """CutMix (Yun et al., 2019) as GDumb trains with it, with partners drawn inside each task.

    One box per batch, the kept fraction drawn from Beta(alpha, alpha), the box clipped to the
    image; every sample gets the box cut from a partner of the SAME task (a permutation within
    each task), so both labels live in one task head.

    Returns:
        (mixed images, partner index per sample, lam = the fraction of each image kept).
    """
    partner = torch.arange(len(images), device=images.device)
    for task_id in torch.unique(task_ids).tolist():
        idx = (task_ids == task_id).nonzero(as_tuple=True)[0]
        partner[idx] = idx[torch.randperm(len(idx), generator=gen).to(idx.device)]
    keep = float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen))).beta(alpha, alpha))
    h, w = images.shape[-2:]
    ch, cw = int(h * (1 - keep) ** 0.5), int(w * (1 - keep) ** 0.5)  # box area about 1 - keep
    cy, cx = (int(torch.randint(n, (1,), generator=gen)) for n in (h, w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = images[partner][..., y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, partner, lam


class _MemoryBatches:
    """Re-iterable shuffled passes over the memory, as ``(images, labels, task_ids)``."""

    def __init__(self, buffer: ClassBalancedBuffer, batch_size: int) -> None:
        self.buffer, self.batch_size = buffer, batch_size

    def __len__(self) -> int:
        return -(-len(self.buffer) // self.batch_size)

    def __iter__(self):
        for b in self.buffer.batches(self.batch_size):
            yield b["images"], b["labels"], b["task_ids"]


def _raw_view(batch: Any) -> tuple[Tensor, Tensor]:
    """``(raw images, labels)`` of a ``(images, labels[, raw_images])`` training batch."""
    return (batch[2] if len(batch) > 2 else batch[0]), batch[1]


class GDumb(ContinualMethod):
    """The stream only fills the memory (one pass over each task's training batches, no
    training on it). After each task the backbone is reset to its initial weights, all heads
    are re-initialised, and the network is trained for ``cfg.epochs`` on the memory alone,
    every sample through its own task head, with GDumb's cutmix (partners inside each task).
    GDumb's SGDR schedule is not used: the runner's optimiser and StepLR schedule are.

    The memory is the class-balanced greedy sampler of the GDumb paper (Algorithm 1), not the
    reservoir Mammoth's ``gdumb`` uses. As in the references it holds the raw view of a
    ``(images, labels, raw_images)`` batch, and ``replay_augment`` (None: train on the stored
    images) augments every memory batch again, before cutmix.

    Trainable per task: backbone + every head seen so far. Training state: the memory and the
    initial backbone.
    """

    name = "gdumb"

    def __init__(self, backbone: nn.Module, cfg: GDumbConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg or GDumbConfig()
        self.initial_backbone = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        self.buffer: ClassBalancedBuffer | None = None
        self.replay_augment: Callable[[Tensor, Tensor], Tensor] | None = None  # (images, task ids)
        self.gen = torch.Generator().manual_seed(0)  # reseeded from the global RNG at the first task

    def before_task(self, task: TaskSpec) -> None:
        super().before_task(task)
        if self.buffer is None:
            seed = int(torch.randint(2**62, (1,)))
            self.buffer = ClassBalancedBuffer(self.cfg.memory_size, torch.Generator().manual_seed(seed))
            self.gen = torch.Generator().manual_seed(seed + 1)  # cutmix draws

    def trainable_parameters(self) -> list[nn.Parameter]:
        return unique_parameters(self.net.parameters())

    def extra_checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        return replay_checkpoint_state(self.buffer, self.replay_augment, {"cutmix": self.gen})

    def load_extra_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        load_replay_checkpoint_state(self.buffer, self.replay_augment, tensors, meta, {"cutmix": self.gen})

    def fill_memory(self, train: Iterable[Any]) -> None:
        """Offer every training sample of the current task to the memory once."""
        assert self.buffer is not None
        for batch in train:
            x, y = _raw_view(batch)
            self.buffer.add(x.to(self.device), y.to(self.device), len(self.tasks) - 1)

    def reset(self) -> None:
        """Initial backbone weights and freshly initialised heads."""
        self.net.backbone.load_state_dict(self.initial_backbone)
        for head in self.net.heads.values():
            head.reset_parameters()

    def fit_task(self, task: TaskSpec, cfg: TuneConfig, progress: bool = False) -> None:
        if not self.resuming_task:  # resumed inside the training: memory and reset are in the checkpoint
            self.fill_memory(task.train)
            self.reset()
        assert self.buffer is not None
        train_epochs(self, _MemoryBatches(self.buffer, self.cfg.batch_size),
                     self.memory_loss, self.trainable_parameters(), cfg,
                     f"{self.name}:{task.name}", progress)

    def memory_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Cross-entropy of a memory batch through each sample's task head; with probability
        ``cutmix_prob`` the batch is cutmixed within tasks and the loss mixes both labels."""
        images, labels, task_ids = batch
        if self.training and self.replay_augment is not None:
            images = self.replay_augment(images, task_ids)
        partner, lam = None, 1.0
        if self.training and self.cfg.cutmix_prob > 0 and float(torch.rand((), generator=self.gen)) < self.cfg.cutmix_prob:
            images, partner, lam = cutmix_within_tasks(images, task_ids, self.cfg.cutmix_alpha, self.gen)
        total = images.new_zeros(())
        for idx, logits in grouped_logits(self.net, images, task_ids, self.tasks):
            total = total + lam * F.cross_entropy(logits, labels[idx], reduction="sum")
            if partner is not None:
                total = total + (1.0 - lam) * F.cross_entropy(logits, labels[partner[idx]], reduction="sum")
        return total / labels.numel()

    def training_state(self) -> dict[str, Tensor]:
        memory = self.buffer.tensors() if self.buffer is not None else {}
        return {**{f"memory.{k}": v for k, v in memory.items()},
                **{f"initial_backbone.{k}": v for k, v in self.initial_backbone.items()}}
