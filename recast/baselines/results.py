"""Result of a sequential run: accuracy matrix, forgetting, parameters, bytes, wall time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def check_acc_matrix(acc_matrix: list[list[float | None]]) -> None:
    """Raise ValueError unless the matrix is T x T with numbers on and below the diagonal only."""
    size = len(acc_matrix)
    for i, row in enumerate(acc_matrix):
        if len(row) != size:
            raise ValueError(f"acc_matrix row {i} has {len(row)} entries, expected {size}")
        for j, value in enumerate(row):
            if (j <= i) != (value is not None):
                want = "a number" if j <= i else "None"
                raise ValueError(f"acc_matrix[{i}][{j}] must be {want}, got {value!r}")


def final_accuracies(acc_matrix: list[list[float | None]]) -> list[float]:
    """Accuracy of every task after the last task was trained (last row)."""
    check_acc_matrix(acc_matrix)
    return [float(v) for v in acc_matrix[-1]] if acc_matrix else []


def forgetting_per_task(acc_matrix: list[list[float | None]]) -> list[float | None]:
    """Forgetting of each task (Chaudhry et al., 2018).

    For task j < T-1: ``max_{j <= i < T-1} acc[i][j] - acc[T-1][j]``, the drop from the best
    accuracy it had after any earlier training stage to its final accuracy (negative means
    backward transfer). The last task has no earlier stage: None.
    """
    check_acc_matrix(acc_matrix)
    size = len(acc_matrix)
    out: list[float | None] = []
    for j in range(size):
        if j == size - 1:
            out.append(None)
            continue
        best = max(float(acc_matrix[i][j]) for i in range(j, size - 1))  # type: ignore[arg-type]
        out.append(best - float(acc_matrix[-1][j]))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class SequentialResult:
    """Everything measured by ``run_sequential``; ``to_json()`` gives a JSON-ready dict.

    Attributes:
        method: method name (the ``make_method`` key).
        task_names: tasks in training order.
        acc_matrix: ``acc_matrix[i][j]`` = test accuracy of task j after training task i
            (j <= i), None above the diagonal.
        val_acc: validation accuracy of each task right after training it (None without val).
        trainable_params: parameters optimised while training each task (numel of the tensors
            handed to the optimiser; HAT counts whole gated tensors although units used by
            earlier tasks are blocked).
        shared_bytes: bytes stored once and needed by every task at the end of the sequence
            (the shared backbone for sequential methods and head-only; nothing for full FT).
        task_bytes: bytes specific to each task (its head, HAT task embedding, full-FT backbone).
        bytes_per_task: what must be stored to serve each task = shared_bytes + task_bytes.
        training_state_bytes: extra state the method keeps between tasks only to train later
            ones (replay buffer, EWC Fisher + anchor, LwF old model, GDumb initial backbone),
            measured after each task.
        wall_time_s: seconds spent training each task (fit + after-task work, no evaluation).
    """

    method: str
    task_names: list[str]
    acc_matrix: list[list[float | None]]
    val_acc: list[float | None]
    trainable_params: list[int]
    shared_bytes: int
    task_bytes: list[int]
    training_state_bytes: list[int]
    wall_time_s: list[float]

    def __post_init__(self) -> None:
        check_acc_matrix(self.acc_matrix)
        size = len(self.task_names)
        for name in ("acc_matrix", "val_acc", "trainable_params", "task_bytes",
                     "training_state_bytes", "wall_time_s"):
            if len(getattr(self, name)) != size:
                raise ValueError(f"SequentialResult.{name} has {len(getattr(self, name))} entries, "
                                 f"expected one per task ({size})")

    @property
    def bytes_per_task(self) -> list[int]:
        """Bytes needed to serve each task: shared state + the task's own state."""
        return [self.shared_bytes + b for b in self.task_bytes]

    @property
    def final_acc(self) -> list[float]:
        """Accuracy of every task at the end of the sequence."""
        return final_accuracies(self.acc_matrix)

    @property
    def avg_acc(self) -> float:
        """Mean final accuracy over tasks."""
        final = self.final_acc
        return sum(final) / len(final)

    @property
    def forgetting(self) -> list[float | None]:
        """Per-task forgetting (see ``forgetting_per_task``)."""
        return forgetting_per_task(self.acc_matrix)

    @property
    def avg_forgetting(self) -> float:
        """Mean forgetting over the first T-1 tasks (0.0 for a single task)."""
        values = [f for f in self.forgetting if f is not None]
        return sum(values) / len(values) if values else 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain dict of the fields and derived metrics (json.dumps-able)."""
        return {
            "method": self.method, "task_names": list(self.task_names),
            "acc_matrix": [list(r) for r in self.acc_matrix], "final_acc": self.final_acc,
            "avg_acc": self.avg_acc, "forgetting": self.forgetting,
            "avg_forgetting": self.avg_forgetting, "val_acc": list(self.val_acc),
            "trainable_params": list(self.trainable_params), "shared_bytes": self.shared_bytes,
            "task_bytes": list(self.task_bytes), "bytes_per_task": self.bytes_per_task,
            "training_state_bytes": list(self.training_state_bytes),
            "wall_time_s": list(self.wall_time_s),
        }
