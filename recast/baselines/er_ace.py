"""ER-ACE (Caccia et al., 2022): experience replay with asymmetric cross-entropy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.baselines.buffer import (
    ReservoirBuffer,
    TensorMemory,
    load_replay_checkpoint_state,
    replay_checkpoint_state,
    replay_cross_entropy,
)
from recast.baselines.common import TaskSpec
from recast.baselines.method import ContinualMethod, train_epochs, unique_parameters
from recast.training import TuneConfig
from recast.validation import AtLeast1, validate_fields

ReplayAugment = Callable[[Tensor, Tensor], Tensor]  # (raw images, task ids) -> augmented images


@dataclass(frozen=True)
class ReplayConfig:
    """Replay-memory settings (ER-ACE).

    Attributes:
        memory_size: samples held in the reservoir memory (M).
        replay_batch_size: buffer samples drawn per training step.
    """

    memory_size: AtLeast1 = 500
    replay_batch_size: AtLeast1 = 32

    def __post_init__(self) -> None:
        validate_fields(self, "ReplayConfig.")


class ReplayMethod(ContinualMethod):
    """Shared backbone + task heads + a reservoir memory filled from the stream.

    As in the references (Mammoth's ``Buffer``, ``not_aug_inputs``), the memory should hold the
    raw (non-augmented) view and replay should augment it again: a training batch may be
    ``(images, labels, raw_images)``, in which case ``raw_images`` is stored, and
    ``replay_augment`` (set by the caller; None: replay as stored) maps a replayed batch and
    its task ids to augmented images. A two-element batch stores its (augmented) images.

    Trainable per task: backbone + every head seen so far (replayed samples train their heads).
    The memory's choices use a generator seeded from torch's RNG at the first task.
    """

    memory_class: ClassVar[type[TensorMemory]] = ReservoirBuffer

    def __init__(self, backbone: nn.Module, memory_size: int) -> None:
        super().__init__(backbone)
        self.memory_size = memory_size
        self.buffer: TensorMemory | None = None
        self.replay_augment: ReplayAugment | None = None

    def before_task(self, task: TaskSpec) -> None:
        super().before_task(task)
        if self.buffer is None:
            seed = int(torch.randint(2**62, (1,)))
            self.buffer = self.memory_class(self.memory_size, torch.Generator().manual_seed(seed))

    def fit_task(self, task: TaskSpec, cfg: TuneConfig, progress: bool = False) -> None:
        train_epochs(self, task.train,
                     lambda b: self.training_loss(b[0], b[1], task, raw=b[2] if len(b) > 2 else None),
                     self.trainable_parameters(), cfg, f"{self.name}:{task.name}", progress)

    def sample_replay(self, batch_size: int) -> dict[str, Tensor]:
        """A random memory batch, re-augmented with ``replay_augment`` if set."""
        assert self.buffer is not None
        batch = self.buffer.sample(batch_size)
        if self.replay_augment is not None:
            batch["images"] = self.replay_augment(batch["images"], batch["task_ids"])
        return batch

    @property
    def task_id(self) -> int:
        """Index of the current task (the buffer's task id)."""
        return len(self.tasks) - 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return unique_parameters(self.net.parameters())

    def training_state(self) -> dict[str, Tensor]:
        return self.buffer.tensors() if self.buffer is not None else {}

    def extra_checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        return replay_checkpoint_state(self.buffer, self.replay_augment)

    def load_extra_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        load_replay_checkpoint_state(self.buffer, self.replay_augment, tensors, meta)


def ace_logits(logits: Tensor, labels: Tensor, seen_max: int) -> Tensor:
    """Mammoth's ACE mask inside the current task's head: a class keeps its logit if it is in
    the batch or its index is at least ``seen_max`` (the largest label of the task seen so
    far, this batch included: classes not seen yet stay); the others get -1e9."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[labels.unique()] = True
    keep[seen_max:] = True
    return logits.masked_fill(~keep, -1e9)


class ERACE(ReplayMethod):
    """ER-ACE in the task-incremental setting (Caccia et al., 2022; Mammoth's ``er_ace``).

    From the second task on, the current batch's cross-entropy is asymmetric: in the current
    task's head, logits of classes seen before but absent from the batch are masked
    (``ace_logits``); replayed samples go through their own task's heads with a plain
    cross-entropy. So ``loss = CE(masked current head, batch) + CE(own heads, replay)``; the
    first task trains with a plain cross-entropy and no replay, as the reference. The batch
    (its raw view when given) is offered to the memory after the loss is computed.
    """

    name = "er_ace"

    def __init__(self, backbone: nn.Module, cfg: ReplayConfig | None = None) -> None:
        self.cfg = cfg or ReplayConfig()
        super().__init__(backbone, self.cfg.memory_size)
        self.seen_max = -1  # largest label of the current task seen so far

    def before_task(self, task: TaskSpec) -> None:
        super().before_task(task)
        self.seen_max = -1

    def extra_checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, meta = super().extra_checkpoint_state()
        return tensors, {**meta, "seen_max": self.seen_max}  # mid-task: the ACE mask so far

    def load_extra_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        super().load_extra_checkpoint_state(tensors, meta)
        self.seen_max = int(meta["seen_max"])

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec, raw: Tensor | None = None) -> Tensor:
        assert self.buffer is not None
        logits = self(x, task.name)
        self.seen_max = max(self.seen_max, int(y.max()))
        if self.task_id > 0:
            logits = ace_logits(logits, y, self.seen_max)
        loss = F.cross_entropy(logits, y)
        if self.task_id > 0 and len(self.buffer) > 0:
            loss = loss + replay_cross_entropy(self.net, self.sample_replay(self.cfg.replay_batch_size),
                                               self.tasks)
        self.buffer.add(x if raw is None else raw, y, self.task_id)
        return loss
