"""ER-ACE (Caccia et al., 2022): experience replay with asymmetric cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.baselines.buffer import ClassBalancedBuffer, replay_cross_entropy
from recast.baselines.common import TaskSpec
from recast.baselines.method import ContinualMethod, unique_parameters
from recast.checks import check_int


@dataclass(frozen=True)
class ReplayConfig:
    """Replay-memory settings (ER-ACE).

    Attributes:
        memory_size: samples held in the class-balanced memory (M).
        replay_batch_size: buffer samples drawn per training step.
    """

    memory_size: int = 500
    replay_batch_size: int = 32

    def __post_init__(self) -> None:
        check_int("memory_size", self.memory_size, minimum=1)
        check_int("replay_batch_size", self.replay_batch_size, minimum=1)


class ReplayMethod(ContinualMethod):
    """Shared backbone + task heads + a class-balanced memory filled from the stream.

    Trainable per task: backbone + every head seen so far (replayed samples train their heads).
    The memory's eviction choices use a generator seeded from torch's RNG at the first task.
    """

    def __init__(self, backbone: nn.Module, memory_size: int) -> None:
        super().__init__(backbone)
        self.memory_size = memory_size
        self.buffer: ClassBalancedBuffer | None = None

    def before_task(self, task: TaskSpec) -> None:
        super().before_task(task)
        if self.buffer is None:
            seed = int(torch.randint(2**62, (1,)))
            self.buffer = ClassBalancedBuffer(self.memory_size, torch.Generator().manual_seed(seed))

    @property
    def task_id(self) -> int:
        """Index of the current task (the buffer's task id)."""
        return len(self.tasks) - 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return unique_parameters(self.net.parameters())

    def training_state(self) -> dict[str, Tensor]:
        return self.buffer.tensors() if self.buffer is not None else {}


class ERACE(ReplayMethod):
    """ER-ACE in the task-incremental setting.

    ACE masks the current batch's logits to the current task's classes and replays buffer
    samples over all classes. With one head per task the current head already holds only the
    current classes and each replayed sample goes through its own task's head, so the loss is
    ``CE(current head, current batch) + CE(own heads, replay batch)``. The batch is offered to
    the memory after the loss is computed.
    """

    name = "er_ace"

    def __init__(self, backbone: nn.Module, cfg: ReplayConfig | None = None) -> None:
        self.cfg = cfg or ReplayConfig()
        super().__init__(backbone, self.cfg.memory_size)

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec) -> Tensor:
        assert self.buffer is not None
        loss = F.cross_entropy(self(x, task.name), y)
        if len(self.buffer) > 0:
            replay = self.buffer.sample(self.cfg.replay_batch_size)
            loss = loss + replay_cross_entropy(self.net, replay, self.tasks)
        self.buffer.add(x, y, self.task_id)
        return loss
