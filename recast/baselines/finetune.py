"""Independent baselines: every task starts from the same initial backbone (no forgetting)."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from recast.baselines.common import TaskSpec, prefixed
from recast.baselines.method import ContinualMethod


class FinetuneHead(ContinualMethod):
    """'Fine-tuned classifier': frozen backbone (eval mode, BatchNorm statistics fixed), one
    trained linear head per task. Trainable per task: ``num_features * C + C``."""

    name = "finetune_head"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.net.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> FinetuneHead:
        super().train(mode)
        self.net.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.head(self.current_task).parameters())


class FinetuneFull(ContinualMethod):
    """Full fine-tuning: each task trains its own copy of the initial backbone plus a head.

    The initial backbone is kept frozen as the template every task copies; serving a task needs
    its own backbone and head, so nothing is shared (``shared_state`` is empty).
    """

    name = "finetune_full"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.net.backbone.requires_grad_(False)
        self.task_backbones = nn.ModuleDict()

    def before_task(self, task: TaskSpec) -> None:
        super().before_task(task)
        backbone = copy.deepcopy(self.net.backbone)
        self.task_backbones[task.name] = backbone.requires_grad_(True)

    def forward(self, x: Tensor, task: str) -> Tensor:
        if task not in self.task_backbones:
            raise ValueError(f"unknown task {task!r}; known tasks: {list(self.task_backbones)}")
        return self.net.head(task)(self.task_backbones[task](x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        task = self.current_task
        return [*self.task_backbones[task].parameters(), *self.net.head(task).parameters()]

    def shared_state(self) -> dict[str, Tensor]:
        return {}

    def task_state(self, task: str) -> dict[str, Tensor]:
        return {**prefixed(f"backbones.{task}", self.task_backbones[task]),
                **prefixed(f"heads.{task}", self.net.head(task))}
