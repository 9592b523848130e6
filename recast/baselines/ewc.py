"""Elastic Weight Consolidation (Kirkpatrick et al., 2017), online variant (Schwarz et al., 2018)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from recast.baselines.common import TaskSpec
from recast.baselines.method import ContinualMethod, move
from recast.validation import AtLeast1, Fraction, NonNegative, validate_fields

FISHER_CHUNK = 16  # samples per vmap chunk of the per-sample Fisher gradients


@dataclass(frozen=True)
class EWCConfig:
    """EWC settings.

    Attributes:
        lam: penalty weight lambda in ``lam * sum_i F_i (theta_i - theta*_i)^2``: Mammoth's
            ``e_lambda`` (its ``ewc_on`` has no 1/2), so a lambda tuned there means the same here.
            Default 10: Mammoth's own default (``models/config/ewc_on.yaml`` at e75a491, its
            seq-cifar10 setting; ``utils/best_args.py`` there has 25 for seq-tinyimg, 90 for
            seq-mnist, 0.7 for perm/rot-mnist). The old 5000 was on the scale of a squared
            batch-mean Fisher with a 1/2, which is 3 to 30 times smaller than this per-sample one.
        gamma: decay of the accumulated Fisher, ``F <- gamma * F + F_task`` (1.0: plain sum
            over tasks, equivalent to one penalty per task with a single anchor).
        fisher_max_batches: batches used to estimate the Fisher (None: the whole train split).
    """

    lam: NonNegative = 10.0
    gamma: Fraction = 1.0
    fisher_max_batches: AtLeast1 | None = None

    def __post_init__(self) -> None:
        validate_fields(self, "EWCConfig.")


class EWC(ContinualMethod):
    """Shared backbone + task heads; a quadratic penalty anchors the backbone to its values
    after the previous tasks, weighted by a diagonal Fisher.

    Fisher of a task, as Mammoth's ``ewc_on``: over its training samples (eval mode), the
    per-sample squared gradient of the cross-entropy of the true label, weighted by the
    model's probability of that label, ``p(y|x) * (d log p(y|x) / d theta)^2``, summed and
    divided by the number of samples. Online: ``F <- gamma * F + F_task``. Only backbone
    parameters are penalised; old heads are not trained. Trainable per task: backbone +
    current head.
    """

    name = "ewc"

    def __init__(self, backbone: nn.Module, cfg: EWCConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg or EWCConfig()
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(self) -> Tensor:
        """``lam * sum F (theta - theta*)^2`` (zero before the first task ends)."""
        total = torch.zeros((), device=self.device)
        for name, param in self.net.backbone.named_parameters():
            if name in self.fisher:
                total = total + (self.fisher[name] * (param - self.anchor[name]) ** 2).sum()
        return self.cfg.lam * total

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec) -> Tensor:
        return F.cross_entropy(self(x, task.name), y) + self.penalty()

    def after_task(self, task: TaskSpec, train: Iterable[Any]) -> None:
        fisher = self.estimate_fisher(task, train)
        for name, value in fisher.items():
            old = self.fisher.get(name)
            self.fisher[name] = value if old is None else self.cfg.gamma * old + value
        self.anchor = {n: p.detach().clone() for n, p in self.net.backbone.named_parameters()}

    def extra_checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"fisher.{k}": v for k, v in self.fisher.items()}
        tensors.update({f"anchor.{k}": v for k, v in self.anchor.items()})
        return tensors, {}

    def load_extra_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        device = self.device
        self.fisher = {k[len("fisher."):]: v.to(device) for k, v in tensors.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor."):]: v.to(device) for k, v in tensors.items() if k.startswith("anchor.")}

    def estimate_fisher(self, task: TaskSpec, train: Iterable[Any]) -> dict[str, Tensor]:
        """Diagonal Fisher of the backbone parameters on ``train`` (see the class docstring).

        Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad``), in chunks of
        ``FISHER_CHUNK`` samples; parameters are detached copies, so no ``.grad`` is touched.
        """
        params = {n: p.detach() for n, p in self.net.backbone.named_parameters() if p.requires_grad}
        head = self.net.head(task.name)
        backbone = self.net.backbone

        def log_likelihood(p: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            logits = head(functional_call(backbone, p, (x[None],)))  # (1, C)
            value = -F.cross_entropy(logits, y[None])
            return value, value.detach()

        per_sample = vmap(grad(log_likelihood, has_aux=True), in_dims=(None, 0, 0),
                          chunk_size=FISHER_CHUNK)
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training, samples = self.training, 0
        self.eval()
        for index, batch in enumerate(train):
            if self.cfg.fisher_max_batches is not None and index >= self.cfg.fisher_max_batches:
                break
            x, y = move(tuple(batch[:2]), self.device)
            with torch.no_grad():  # no outer graph (the heads' parameters require grad)
                grads, log_p = per_sample(params, x, y)  # grads[name]: (B, *shape); log_p: (B,)
            weight = log_p.exp()
            for name, g in grads.items():
                fisher[name] += torch.einsum("b,b...->...", weight, g ** 2)
            samples += y.numel()
        self.train(was_training)
        if samples == 0:
            raise ValueError(f"task {task.name!r}: no training batches to estimate the Fisher")
        return {n: f / samples for n, f in fisher.items()}

    def training_state(self) -> dict[str, Tensor]:
        return {**{f"fisher.{n}": t for n, t in self.fisher.items()},
                **{f"anchor.{n}": t for n, t in self.anchor.items()}}
