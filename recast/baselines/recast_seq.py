"""RECAST under the continual-learning protocol: ONE ``RecastModel`` trained task after task.

The banks (and everything else shared) are frozen; each task adds its own coefficients and head
(and whatever else it owns: per-task biases, norms or BatchNorm statistics). The runner
re-evaluates every earlier task on this same model after each new one (all of them in mixed-task
batches: one ``rc(x, tasks=...)`` forward per batch, ``recast.training.evaluate_mixed``), so the accuracy matrix
measures forgetting instead of assuming it: for RECAST every earlier column must stay exactly
unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recast.baselines.common import TaskSpec
from recast.baselines.method import ContinualMethod, unique_parameters
from recast.io import bank_tensors
from recast.model import RecastModel
from recast.training import evaluate_mixed


class RecastSequential(ContinualMethod):
    """RECAST as a continual method.

    Args:
        rc: a RecastModel after mimicry (its base task holds the reconstructed coefficients);
            new tasks start from the base task's coefficients.
    """

    name = "recast"

    def __init__(self, rc: RecastModel) -> None:
        nn.Module.__init__(self)
        if not isinstance(rc, RecastModel):
            raise TypeError(f"RecastSequential needs a RecastModel, got {type(rc).__name__}")
        self.rc = rc
        self.tasks: list[str] = []
        self.batch_index, self.num_batches = 0, None
        self.num_tasks: int | None = None
        self.task_cursor = None  # set by run_sequential (epoch checkpoints inside a task)

    def _activate(self, task: str) -> None:
        if self.rc.active_task != task:
            self.rc.set_task(task, freeze=True)

    def forward(self, x: Tensor, task: str) -> Tensor:
        self._activate(task)
        return self.rc(x)

    def train(self, mode: bool = True) -> RecastSequential:
        self.training = mode
        self.rc.train(mode)  # RecastModel keeps BatchNorm statistics frozen unless they are per task
        return self

    def before_task(self, task: TaskSpec) -> None:
        if task.name in self.tasks:
            raise ValueError(f"task {task.name!r} already trained; tasks so far: {self.tasks}")
        self.rc.add_task(task.name, num_classes=task.num_classes)
        self.rc.set_task(task.name, freeze=True)
        self.tasks.append(task.name)

    def evaluate_tasks(self, tasks: list[TaskSpec], device: str | torch.device) -> list[float]:
        """Every task's test accuracy in mixed-task batches (the rows of all tasks in one
        forward per batch); equal to evaluating them one by one with ``set_task``."""
        acc = evaluate_mixed(self.rc, {t.name: t.test for t in tasks}, device)
        return [acc[t.name] for t in tasks]

    def trainable_parameters(self) -> list[nn.Parameter]:
        self._activate(self.current_task)
        return unique_parameters(p for p in self.rc.parameters() if p.requires_grad)

    def shared_state(self) -> dict[str, Tensor]:
        return {f"banks.{k}": v for k, v in bank_tensors(self.rc).items()}

    def task_state(self, task: str) -> dict[str, Tensor]:
        return self.rc.task_tensors(task)
