"""Learning without Forgetting (Li & Hoiem, 2017) with task heads."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.baselines.common import MultiHeadNet, TaskSpec, prefixed
from recast.baselines.method import ContinualMethod, train_epochs, unique_parameters
from recast.training import TuneConfig
from recast.validation import AtLeast0, NonNegative, Positive, validate_fields


@dataclass(frozen=True)
class LwFConfig:
    """LwF settings.

    Attributes:
        lam: weight of the distillation term (paper: lambda_o = 1; Mammoth's ``alpha``).
        temperature: softmax temperature T (paper: 2).
        warmup_epochs: epochs of the warm-up that trains only the new head on frozen features
            before the joint training of every task after the first (paper, section 3;
            Mammoth: as many epochs as the task's training). None: the task's ``epochs``;
            0: no warm-up.
    """

    lam: NonNegative = 1.0
    temperature: Positive = 2.0
    warmup_epochs: AtLeast0 | None = None

    def __post_init__(self) -> None:
        validate_fields(self, "LwFConfig.")


def distillation(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """LwF's soft cross-entropy ``-sum_c softmax(old / T)_c * log softmax(new / T)_c``, mean
    over the batch (paper eq. 2 and Mammoth's ``lwf``: no ``T^2`` factor).

    Its minimum over ``new_logits`` is the entropy of the teacher's softened outputs, reached
    when the outputs agree.
    """
    log_new = F.log_softmax(new_logits / temperature, dim=1)
    old = F.softmax(old_logits / temperature, dim=1)
    return -(old * log_new).sum(dim=1).mean()


class LwF(ContinualMethod):
    """Shared backbone + task heads. Before each new task the model is frozen as a teacher; the
    loss adds, for every old head, distillation of the teacher's outputs on the new data.

    As in the paper, shared, old and new parameters are all trained: backbone + every head,
    after a warm-up that trains only the new head on frozen features (eval mode, so BatchNorm
    statistics stay as they are). The teacher is training state (a full copy of the network).
    Every old head is distilled through its own softmax (the paper's multi-head loss).
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

    def fit_task(self, task: TaskSpec, cfg: TuneConfig, progress: bool = False) -> None:
        epochs = cfg.epochs if self.cfg.warmup_epochs is None else self.cfg.warmup_epochs
        if self.teacher is not None and epochs > 0:
            head = self.net.head(task.name)
            train_epochs(self, task.train, lambda b: self.warmup_loss(b[0], b[1], task),
                         list(head.parameters()), dataclasses.replace(cfg, epochs=epochs),
                         f"{self.name}:{task.name}:warmup", progress)
        super().fit_task(task, cfg, progress)

    def warmup_loss(self, x: Tensor, y: Tensor, task: TaskSpec) -> Tensor:
        """Cross-entropy of the new head on features of the backbone in eval mode, no grad."""
        was_training = self.net.backbone.training
        self.net.backbone.eval()
        with torch.no_grad():
            feats = self.net.features(x)
        self.net.backbone.train(was_training)
        return F.cross_entropy(self.net.head(task.name)(feats), y)

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec) -> Tensor:
        feats = self.net.features(x)
        ce = F.cross_entropy(self.net.head(task.name)(feats), y)
        return ce + self.cfg.lam * self.distillation_loss(x, feats)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return unique_parameters(self.net.parameters())

    def training_state(self) -> dict[str, Tensor]:
        return prefixed("teacher", self.teacher) if self.teacher is not None else {}
