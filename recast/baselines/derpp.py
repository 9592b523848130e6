"""DER++ (Buzzega et al., 2020): replay of stored logits (MSE) and labels (CE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.baselines.buffer import grouped_logits, replay_cross_entropy
from recast.baselines.common import TaskSpec
from recast.baselines.er_ace import ReplayMethod
from recast.validation import AtLeast1, NonNegative, validate_fields


@dataclass(frozen=True)
class DERPPConfig:
    """DER++ settings.

    Attributes:
        memory_size: samples held in the reservoir memory (M).
        replay_batch_size: buffer samples per draw (two independent draws per step).
        alpha: weight of the logit MSE term.
        beta: weight of the buffer-label cross-entropy term.
    """

    memory_size: AtLeast1 = 500
    replay_batch_size: AtLeast1 = 32
    alpha: NonNegative = 0.3
    beta: NonNegative = 0.5

    def __post_init__(self) -> None:
        validate_fields(self, "DERPPConfig.")


class DERPP(ReplayMethod):
    """DER++ with task heads: the memory stores each sample's logits from its own head at the
    time it was seen; ``loss = CE(current) + alpha * MSE(own-head logits, stored logits)
    + beta * CE(own heads, labels)`` on two independent buffer draws. MSE is the mean over all
    logit entries of the draw.
    """

    name = "derpp"

    def __init__(self, backbone: nn.Module, cfg: DERPPConfig | None = None) -> None:
        self.cfg = cfg or DERPPConfig()
        super().__init__(backbone, self.cfg.memory_size)

    def logit_replay_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean squared error between current and stored logits of buffer samples."""
        squared, entries = torch.zeros((), device=batch["labels"].device), 0
        for idx, logits in grouped_logits(self.net, batch["images"], batch["task_ids"], self.tasks):
            stored = batch["logits"][idx, :logits.shape[1]]
            squared = squared + ((logits - stored) ** 2).sum()
            entries += logits.numel()
        return squared / entries

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec, raw: Tensor | None = None) -> Tensor:
        assert self.buffer is not None
        logits = self(x, task.name)
        loss = F.cross_entropy(logits, y)
        if len(self.buffer) > 0:
            if self.cfg.alpha > 0:
                loss = loss + self.cfg.alpha * self.logit_replay_loss(
                    self.sample_replay(self.cfg.replay_batch_size))
            if self.cfg.beta > 0:
                loss = loss + self.cfg.beta * replay_cross_entropy(
                    self.net, self.sample_replay(self.cfg.replay_batch_size), self.tasks)
        self.buffer.add(x if raw is None else raw, y, self.task_id, logits=logits.detach())
        return loss
