"""Parameter and byte accounting of a RecastModel (paper Tables 1-2 columns)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from recast.model import RecastModel
from recast.task_state import PREFIX


@dataclass(frozen=True)
class ParameterCount:
    """Counts for one task of a RecastModel.

    Attributes:
        coefficients: stored per-task coefficients, sum over modules of K*n (paper's count).
        effective_coefficients: after averaging the K sets, sum of n (eq. 2 is linear; the K
            sets only matter through their mean).
        head: parameters of the task's classifier (dim*C + C).
        biases: the task's own copies of templated-layer biases (``train_biases``; else 0).
        norms: the task's own norm affine parameters (``train_norms``; else 0).
        bn_stats: the task's own BatchNorm statistics (``bn_stats="per_task"``; else 0): running
            means and variances plus one batch counter per BatchNorm layer.
        trainable: coefficients + head + biases + norms (what RECAST-FT trains per task).
        templates: parameters of all template banks (shared by every task).
        replaced: parameters of the original weights the banks replace.
        original_total: parameters of the whole original model (with its head).
        bytes_per_task: bytes of the per-task payload (``task_tensors``): ``bytes_per_param``
            per float value, 8 per integer (the BatchNorm batch counters).
    """

    coefficients: int
    effective_coefficients: int
    head: int
    biases: int
    norms: int
    bn_stats: int
    trainable: int
    templates: int
    replaced: int
    original_total: int
    bytes_per_task: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_parameters(rc: RecastModel, task: str | None = None, bytes_per_param: int = 4) -> ParameterCount:
    """Parameter accounting of ``task`` (default: the active task), from its payload."""
    task = task or rc.active_task or rc.config.base_task
    tensors = rc.task_tensors(task)

    def numel(prefix: str) -> int:
        return sum(t.numel() for k, t in tensors.items() if k.startswith(prefix))

    coefficients, head = numel("coefs."), numel("head.")
    biases, norms, bn_stats = numel(PREFIX["biases"]), numel(PREFIX["norms"]), numel(PREFIX["bn_stats"])
    effective = sum(layer.bank.num_templates for _, layer in rc.recast_layers())
    templates = sum(b.templates.numel() for b in rc.banks.values())
    replaced = sum(math.prod(b.shape) * len(b.modules) for b in rc.plan.banks)
    payload_bytes = sum(t.numel() * (bytes_per_param if t.is_floating_point() else t.element_size())
                        for t in tensors.values())
    return ParameterCount(
        coefficients=coefficients, effective_coefficients=effective, head=head, biases=biases, norms=norms,
        bn_stats=bn_stats, trainable=coefficients + head + biases + norms, templates=templates,
        replaced=replaced, original_total=rc.original_param_count, bytes_per_task=payload_bytes,
    )
