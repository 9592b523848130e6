"""Result of a sequential run (accuracy matrix, parameters, bytes, wall time) and the metrics of
an accuracy matrix: average accuracy, forgetting, backward and forward transfer."""

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


def average_accuracy(acc_matrix: list[list[float | None]]) -> float:
    """Average accuracy ``ACC = 1/T sum_j R[T-1][j]`` (Lopez-Paz & Ranzato, 2017): the mean
    final accuracy over the T tasks, where ``R[i][j]`` is the accuracy on task j after training
    task i."""
    final = final_accuracies(acc_matrix)
    if not final:
        raise ValueError("average_accuracy of an empty accuracy matrix")
    return sum(final) / len(final)


def average_forgetting(acc_matrix: list[list[float | None]]) -> float:
    """Mean of ``forgetting_per_task`` over the first T-1 tasks (0.0 for a single task)."""
    values = [f for f in forgetting_per_task(acc_matrix) if f is not None]
    return sum(values) / len(values) if values else 0.0


def backward_transfer(acc_matrix: list[list[float | None]]) -> float:
    """Backward transfer ``BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])`` (Lopez-Paz &
    Ranzato, 2017): how much training the later tasks changed each earlier task's accuracy
    from the moment it was learnt (negative: forgetting). 0.0 for a single task."""
    check_acc_matrix(acc_matrix)
    size = len(acc_matrix)
    if size < 2:
        return 0.0
    return sum(float(acc_matrix[-1][j]) - float(acc_matrix[j][j])  # type: ignore[arg-type]
               for j in range(size - 1)) / (size - 1)


def forward_transfer(acc_matrix: list[list[float | None]], reference: list[float]) -> float:
    """Forward transfer ``FWT = 1/(T-1) sum_{j>=1} (R[j][j] - b_j)``.

    Lopez-Paz & Ranzato (2017) define ``FWT = 1/(T-1) sum_{j>=1} (R[j-1][j] - b_j)``, the
    accuracy on task j before it is trained, against ``b_j`` of a randomly initialised model.
    With one head per task (task-incremental) the head of task j does not exist before task j,
    so ``R[j-1][j]`` is the accuracy of an untrained head: chance, whatever was transferred.
    Here the transfer is measured where it shows in this setting, right after task j was
    learnt: ``R[j][j]`` against ``b_j`` = the test accuracy on task j of the **head-only
    method** (the same pretrained backbone, frozen, a fresh head trained on task j alone with
    the same budget), i.e. the diagonal of head-only's accuracy matrix, which the pipeline
    computes for every arch. Positive: the earlier tasks (and the method's own training of
    the backbone) made task j better learnt than the frozen pretrained features do. As in
    Lopez-Paz & Ranzato, the first task is left out (nothing precedes it); 0.0 for one task.

    Args:
        acc_matrix: ``R[i][j]``, None above the diagonal (``check_acc_matrix``).
        reference: ``b_j`` for every task j (T numbers; ``reference[0]`` is not used).
    """
    check_acc_matrix(acc_matrix)
    size = len(acc_matrix)
    if len(reference) != size:
        raise ValueError(f"forward_transfer: reference has {len(reference)} entries, expected "
                         f"one per task ({size})")
    if size < 2:
        return 0.0
    return sum(float(acc_matrix[j][j]) - float(reference[j])  # type: ignore[arg-type]
               for j in range(1, size)) / (size - 1)


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
        resumed_task: tasks taken from a checkpoint (0: the run started at the first task).
        resumed_epoch: epochs of task ``resumed_task`` (0-based) taken from a checkpoint taken
            inside it (0: the run resumed, or started, at that task's start).
        state_sha256: ``recast.io.tensors_sha256`` of the method's state at the end of the run
            (``checkpoint_state``: every weight, head, buffer, memory and generator): equal for
            two runs that ended in the same state, bit for bit.
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
    resumed_task: int = 0
    resumed_epoch: int = 0
    state_sha256: str = ""

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
        return average_accuracy(self.acc_matrix)

    @property
    def forgetting(self) -> list[float | None]:
        """Per-task forgetting (see ``forgetting_per_task``)."""
        return forgetting_per_task(self.acc_matrix)

    @property
    def avg_forgetting(self) -> float:
        """Mean forgetting over the first T-1 tasks (0.0 for a single task)."""
        return average_forgetting(self.acc_matrix)

    @property
    def bwt(self) -> float:
        """Backward transfer (see ``backward_transfer``)."""
        return backward_transfer(self.acc_matrix)

    def to_json(self) -> dict[str, Any]:
        """Plain dict of the fields and derived metrics (json.dumps-able)."""
        return {
            "method": self.method, "task_names": list(self.task_names),
            "acc_matrix": [list(r) for r in self.acc_matrix], "final_acc": self.final_acc,
            "avg_acc": self.avg_acc, "forgetting": self.forgetting,
            "avg_forgetting": self.avg_forgetting, "bwt": self.bwt, "val_acc": list(self.val_acc),
            "trainable_params": list(self.trainable_params), "shared_bytes": self.shared_bytes,
            "task_bytes": list(self.task_bytes), "bytes_per_task": self.bytes_per_task,
            "training_state_bytes": list(self.training_state_bytes),
            "wall_time_s": list(self.wall_time_s), "resumed_task": self.resumed_task,
            "resumed_epoch": self.resumed_epoch, "state_sha256": self.state_sha256,
        }
