"""What a job returns (``JobResult``): its metrics, its tensors and what the driver records beside them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from recast.machine import machine_tags


@dataclass
class JobResult:
    """A finished job.

    Attributes:
        metrics: what the job measured, JSON-serialisable: the row of ``results.parquet``, the
            child run's metrics (its numbers) and a stage summary's source.
        tensors: what it trained (a payload, a backbone, banks); empty when nothing.
        history: ``recast.training.fit``'s per-epoch entries (the run's curves, ``curves.png``).
        nondeterministic: the ops torch warned about (``record_nondeterminism``).
        machine: the ``recast.machine`` record of where it ran (set by the fan-out).
    """

    metrics: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    nondeterministic: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def determinism_tags(self) -> dict[str, str]:
        """Run tags saying how deterministic the job was: torch's mode (``seed_everything``), the
        ops it warned about and what its float results depend on (CPU model, torch's CPU
        capability and thread count where it ran; none of these without a machine record)."""
        return {"torch.deterministic": "warn_only", "nondeterministic_ops": "; ".join(self.nondeterministic) or "none",
                **(machine_tags(self.machine) if self.machine else {})}

    def record(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON (the job cache's entry)."""
        return {"metrics": self.metrics, "history": self.history, "nondeterministic": self.nondeterministic,
                "machine": self.machine}

    @classmethod
    def from_record(cls, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> JobResult:
        """The inverse of ``record``."""
        return cls(record["metrics"], tensors, record["history"], record["nondeterministic"], record["machine"])
