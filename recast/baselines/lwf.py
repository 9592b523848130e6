"""Learning without Forgetting (Li & Hoiem, 2017) with task heads."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.baselines.common import MultiHeadNet, TaskSpec, prefixed
from recast.baselines.method import ContinualMethod, unique_parameters
from recast.checks import check_positive


@dataclass(frozen=True)
class LwFConfig:
    """LwF settings.

    Attributes:
        lam: weight of the distillation term (paper: 1).
        temperature: softmax temperature T (paper: 2).
    """

    lam: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        check_positive("LwFConfig.lam", self.lam, allow_zero=True)
        check_positive("LwFConfig.temperature", self.temperature)


def distillation(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(old / T) || softmax(new / T))``, mean over the batch.

    KL has the gradient of LwF's soft cross-entropy and is exactly zero when the outputs agree.
    """
    log_new = F.log_softmax(new_logits / temperature, dim=1)
    log_old = F.log_softmax(old_logits / temperature, dim=1)
    return F.kl_div(log_new, log_old, reduction="batchmean", log_target=True) * temperature ** 2


class LwF(ContinualMethod):
    """Shared backbone + task heads. Before each new task the model is frozen as a teacher; the
    loss adds, for every old head, distillation of the teacher's outputs on the new data.

    As in the paper, shared, old and new parameters are all trained: backbone + every head.
    The teacher is training state (a full copy of the network).
    """

    name = "lwf"

    def __init__(self, backbone: nn.Module, cfg: LwFConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg or LwFConfig()
        self.teacher: MultiHeadNet | None = None

    def before_task(self, task: TaskSpec) -> None:
        if self.tasks:
            teacher = copy.deepcopy(self.net).eval()
            self.teacher = teacher.requires_grad_(False)
        super().before_task(task)

    def train(self, mode: bool = True) -> LwF:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def distillation_loss(self, x: Tensor, feats: Tensor | None = None) -> Tensor:
        """Sum over old tasks of the distillation between current and teacher heads on ``x``."""
        total = torch.zeros((), device=x.device)
        if self.teacher is None:
            return total
        feats = self.net.features(x) if feats is None else feats
        with torch.no_grad():
            old_feats = self.teacher.features(x)
        for task in self.tasks[:-1]:
            with torch.no_grad():
                old_logits = self.teacher.head(task)(old_feats)
            new_logits = self.net.head(task)(feats)
            total = total + distillation(new_logits, old_logits, self.cfg.temperature)
        return total

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec) -> Tensor:
        feats = self.net.features(x)
        ce = F.cross_entropy(self.net.head(task.name)(feats), y)
        return ce + self.cfg.lam * self.distillation_loss(x, feats)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return unique_parameters(self.net.parameters())

    def training_state(self) -> dict[str, Tensor]:
        return prefixed("teacher", self.teacher) if self.teacher is not None else {}
