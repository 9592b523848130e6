"""Parameter and byte accounting of a RecastModel (paper Tables 1-2 columns)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from recast.model import RecastModel


@dataclass(frozen=True)
class ParameterCount:
    """Counts for one task of a RecastModel.

    Attributes:
        coefficients: stored per-task coefficients, sum over modules of K*n (paper's count).
        effective_coefficients: after averaging the K sets, sum of n (eq. 2 is linear).
        head: parameters of the task's classifier (dim*C + C).
        trainable: coefficients + head (what RECAST-FT trains per task).
        templates: parameters of all template banks (shared by every task).
        replaced: parameters of the original weights the banks replace.
        original_total: parameters of the whole original model (with its head).
        bytes_per_task: float32 bytes of the per-task payload (coefficients + head).
    """

    coefficients: int
    effective_coefficients: int
    head: int
    trainable: int
    templates: int
    replaced: int
    original_total: int
    bytes_per_task: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_parameters(rc: RecastModel, task: str | None = None, bytes_per_param: int = 4) -> ParameterCount:
    """Parameter accounting of ``task`` (default: the active task)."""
    task = task or rc.active_task or rc.config.base_task
    layers = dict(rc.recast_layers())
    coefficients = sum(layer.coefs[task].numel() for layer in layers.values())
    effective = sum(layer.bank.num_templates for layer in layers.values())
    heads = rc.task_heads
    head = sum(p.numel() for p in heads.heads[task].parameters()) if heads is not None and task in heads.heads else 0
    templates = sum(b.templates.numel() for b in rc.banks.values())
    replaced = sum(math.prod(b.shape) * len(b.modules) for b in rc.plan.banks)
    original_total = rc.original_param_count
    return ParameterCount(
        coefficients=coefficients, effective_coefficients=effective, head=head,
        trainable=coefficients + head, templates=templates, replaced=replaced,
        original_total=original_total, bytes_per_task=(coefficients + head) * bytes_per_param,
    )
