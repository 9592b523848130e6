"""Mixed-task batches: each row of a batch belongs to its own task (``rc(x, tasks=[...])``).

A templated layer's output for a row of task t is ``y = x W_t^T`` with
``W_t = sum_i cbar_{t,i} T_i`` (``cbar_t`` the mean of t's K coefficient sets, eq. 2). A mixed
batch can be run three ways, picked per layer and batch by ``pick_strategy``:

- ``"shared"``: every row shares the n template products ``x T_i^T``; each row mixes them
  with its task's scalars, ``y = sum_i cbar_{task(row), i} (x T_i^T)``. Cost: n products of
  the whole batch, whatever the number of distinct tasks.
- ``"grouped"``: rows grouped by task; each distinct task's weight is generated and applied to
  its rows (what PEFT does for mixed adapter batches). Cost: one product of the whole batch
  plus one weight generation (and a fixed overhead) per distinct task.
- ``"batched"``: the grouped strategy in two operations: the U weights generated at once
  (U, out, in), the rows placed in a (U, m, ...) tensor (m: the largest group; smaller groups
  padded with zeros) and one batched matmul (a grouped convolution for Conv2d). Cost: one
  product of U * m rows plus the U weight generations; needs the U weights in memory at once
  (``BATCHED_MAX_BYTES``).

Besides these per-layer strategies, the whole forward can run as ``"loop"``: one ordinary
forward per distinct task on its rows (``RecastModel`` runs each under a single-task routing,
``Routing.single``), the outputs put back in row order; each row is then bit for bit what
``set_task`` + forward gives it on its task's rows. ``"auto"`` picks it per batch, before the
forward, where ``loop_costs`` puts it below the per-layer strategies (many distinct tasks with
few rows each on a model with large layers: the U generated weights of the batched strategy do
not stay in cache, while the loop's per-task forwards reuse one weight at a time).

Everything else that differs between the tasks of a batch (heads, per-task biases, norm
parameters, BatchNorm statistics) is run per group of rows, or gathered per row.

Re-entrancy: a forward's ``Routing`` is never stored on the shared modules. ``routed(routing)``
makes it current in a context-local (``contextvars``: one per thread, and per asyncio task), and
each module of the model looks it up with ``route_of(module)``. Concurrent mixed forwards on one
model, from several threads, therefore each see their own routing and overlap freely.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import torch

Strategy = Literal["auto", "shared", "grouped", "batched", "loop"]
STRATEGIES: tuple[str, ...] = ("auto", "shared", "grouped", "batched", "loop")
BATCHED_MAX_BYTES = 256 * 2**20  # largest (U, out, in) stack of generated weights "batched" builds

# Cost of one task group in a templated layer beyond its multiply-adds (row gather, weight
# generation, a matmul on a small sub-batch, which runs far below the full batch's rate, and the
# concatenation), in multiply-adds of the full-batch matmul. Calibrated on the 2-core CPU of
# benchmarks/README.md ("Mixed-task batches"): per group and layer the grouped strategy cost
# 20-80 ms more than its multiply-adds at ~25 GMAC/s, i.e. 0.5e9-2e9; 1e9 makes the shared
# products win at 8 and 64 tasks per batch on ViT-S and test_vit layers (as measured) and
# leaves the grouped strategy to batches of very few tasks.
GROUP_OVERHEAD_MACS = 1.0e9
# The model-level choice of "loop" (``loop_costs``), calibrated on the same CPU (2 torch threads,
# load 3-6) on 2026-12-07 with ViT-S and test_vit, batch 64, U = 8 and 64 (benchmarks/README.md,
# "The loop strategy", Calibration): at U = 64, one row per task, ViT-S ran the loop in 1.9x and the batched
# strategy in 2.0x the single-task forward's time. The loop's extra, 4.2 s over 64 forwards of 237
# module calls, is ~0.28 ms per call and task, ~1.7e7 multiply-adds at the ~60 GMAC/s of ViT-S's
# templated layers (dispatch, and small operations far below the full batch's rate); the batched
# strategy's extra, 4.8 s for 64 stacked weights of 19.5 M values (its multiply-adds differ from
# the single forward's by 1 %), ~235 multiply-adds per stacked value (the U weights do not stay in
# cache: written once, read back by the batched matmul). Rounded down, these put the loop first
# at U = 8 and 64 on ViT-S and last on test_vit (as measured; the model puts test_vit's loop at
# 9x (U = 8) to 28x (U = 64) the batched strategy's cost).
LOOP_CALL_MACS = 1.5e7
STACKED_WEIGHT_MACS = 200.0


class UnknownTaskError(ValueError):
    """A task name that the model does not know; ``known`` lists the model's tasks."""

    def __init__(self, task: str, known: Sequence[str]):
        self.task, self.known = task, list(known)
        super().__init__(f"unknown task {task!r}; known: {self.known}")

    def __reduce__(self):
        return type(self), (self.task, self.known)


class MixedBatchError(ValueError):
    """A mixed-task batch that cannot be run as asked (the message says why and what to do)."""


class MixedBatchAdapterError(MixedBatchError):
    """Adapters (paper eq. 6) hold one task's tensors, so they cannot serve a mixed batch;
    ``adapters`` names them (``path: class``)."""

    def __init__(self, adapters: Sequence[str]):
        self.adapters = list(adapters)
        super().__init__(f"mixed-task batches do not support adapters; this model has {self.adapters[:4]}"
                         f"{' ...' if len(self.adapters) > 4 else ''}: run one task at a time with set_task")

    def __reduce__(self):
        return type(self), (self.adapters,)


@dataclass(frozen=True)
class LayerShape:
    """What the cost models need of one templated layer on an input of one row: ``positions``
    (L), ``macs`` (P), ``num_templates`` (n), ``out_values`` (see ``layer_costs``) and
    ``shares_products`` (False: only the grouped strategy applies)."""

    positions: int
    macs: int
    num_templates: int
    out_values: int
    shares_products: bool = True
    element_bytes: int = 4


def layer_costs(batch_rows: int, positions: int, template_macs: int, num_templates: int,
                distinct_tasks: int, out_values: int, widest_group: int) -> dict[str, float]:
    """Cost in multiply-adds of each strategy for one templated layer on a mixed batch.

    Args:
        batch_rows: B; positions: L, output positions per row (tokens, or H_out * W_out);
        template_macs: P, multiply-adds of one weight per position (in * out, or
            in/groups * kh * kw * out); num_templates: n; distinct_tasks: U;
        out_values: output values per position (mixing cost of the shared strategy);
        widest_group: m, the rows of the most frequent task (the batched strategy pads to it).
    """
    rows = batch_rows * positions
    generation = distinct_tasks * num_templates * template_macs
    return {
        "shared": float(num_templates * rows * (template_macs + out_values)),
        "grouped": float(generation + distinct_tasks * GROUP_OVERHEAD_MACS + rows * template_macs),
        "batched": float(generation + distinct_tasks * widest_group * positions * template_macs),
    }


def pick_strategy(*args, weight_bytes: int = 0, **kwargs) -> str:
    """The cheapest strategy by ``layer_costs`` (``"batched"`` only if the U generated weights,
    ``weight_bytes``, fit in ``BATCHED_MAX_BYTES``)."""
    costs = layer_costs(*args, **kwargs)
    if weight_bytes > BATCHED_MAX_BYTES:
        costs.pop("batched")
    return min(costs, key=costs.get)


def loop_costs(shapes: Sequence[LayerShape], batch_rows: int, distinct_tasks: int, widest_group: int,
               calls: int) -> dict[str, float]:
    """Cost of one mixed forward, in multiply-adds of its templated layers: ``"layers"``, each
    layer with its ``pick_strategy`` choice, and ``"loop"``, one ordinary forward per task.

    Args:
        shapes: the templated layers of one forward (``LayerShape``, per row of input).
        batch_rows: B; distinct_tasks: U; widest_group: m (see ``layer_costs``).
        calls: module calls of one forward (the loop pays them once per task).

    The parts of the network that are not templated cost the same either way and are left out.
    The loop generates each task's weight once per layer and applies it to the task's rows (the
    grouped strategy's multiply-adds) and pays ``LOOP_CALL_MACS`` per module call and task; the
    per-layer strategies pay what ``layer_costs`` says, and the batched strategy in addition
    ``STACKED_WEIGHT_MACS`` per value of the U weights it holds at once.
    """
    layers = 0.0
    loop = float(distinct_tasks * calls * LOOP_CALL_MACS)
    for s in shapes:
        costs = layer_costs(batch_rows, s.positions, s.macs, s.num_templates, distinct_tasks, s.out_values,
                            widest_group)
        if not s.shares_products:
            layers += costs["grouped"]
        else:
            if distinct_tasks * s.macs * s.element_bytes > BATCHED_MAX_BYTES:
                costs.pop("batched")
            pick = min(costs, key=costs.get)
            layers += costs[pick] + (distinct_tasks * s.macs * STACKED_WEIGHT_MACS if pick == "batched" else 0.0)
        loop += distinct_tasks * s.num_templates * s.macs + batch_rows * s.positions * s.macs
    return {"layers": layers, "loop": loop}


def pick_model_strategy(*args, **kwargs) -> str:
    """``"loop"`` where ``loop_costs`` puts it below the per-layer strategies, else ``"layers"``."""
    costs = loop_costs(*args, **kwargs)
    return "loop" if costs["loop"] < costs["layers"] else "layers"


@dataclass
class Routing:
    """Which task each row of a mixed batch belongs to, set on the model's layers for one forward.

    Attributes:
        tasks: the distinct tasks of the batch, in order of first appearance.
        index: (B,) long, the position in ``tasks`` of each row's task.
        rows: per distinct task, the (long) indices of its rows.
        inverse: (B,) where each row lands in ``torch.cat`` of the per-task groups.
        slot: (B,) each row's position within its task's group (``"batched"``).
        strategy: ``"auto"`` (cost models) or a forced ``"shared"``/``"grouped"``/``"batched"``/
            ``"loop"``.
        values: per module name, per distinct task, the tensors that differ between the tasks
            (``{"bias": ...}`` of templated layers, affine/statistics of norm layers).
        picks: the strategy used per templated layer (filled in by the forward; ``"loop"`` for
            every layer when the forward ran task by task).
        members: ``id(module) -> name`` of the modules this routing applies to (the model's
            templated layers, task heads and norm layers); another model's modules called
            inside the same forward are not routed by it.
        shapes: when not None, each templated layer call appends its ``LayerShape`` here (the
            profile forward of the ``"loop"`` cost model).
    """

    tasks: list[str]
    index: torch.Tensor
    rows: list[torch.Tensor]
    inverse: torch.Tensor
    slot: torch.Tensor
    strategy: str = "auto"
    values: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    picks: dict[str, str] = field(default_factory=dict)
    members: dict[int, str] = field(default_factory=dict)
    shapes: list[LayerShape] | None = None

    @classmethod
    def build(cls, tasks: Sequence[str], device: torch.device, strategy: str = "auto") -> "Routing":
        """``tasks``: one per row. RecastModel sorts the rows by task first (``sort_order``), so
        that each task's rows are contiguous: groups are then slices, not gathers."""
        distinct = list(dict.fromkeys(tasks))
        pos = {t: i for i, t in enumerate(distinct)}
        index = torch.tensor([pos[t] for t in tasks], dtype=torch.long)
        rows = [torch.nonzero(index == u).squeeze(1) for u in range(len(distinct))]
        inverse = torch.argsort(torch.cat(rows))
        slot = torch.empty_like(index)
        for r in rows:
            slot[r] = torch.arange(len(r))
        return cls(distinct, index.to(device), [r.to(device) for r in rows], inverse.to(device), slot.to(device),
                   strategy)

    @classmethod
    def single(cls, task: str, rows: int, device: torch.device, values: dict[str, list[dict[str, torch.Tensor]]],
               members: dict[int, str], shapes: list[LayerShape] | None = None) -> "Routing":
        """A batch of ``rows`` rows of one task, run as that task's ordinary forward (each
        templated layer with the task's generated weight, each norm layer and head with the
        task's tensors): one step of the ``"loop"`` strategy. ``values``: per module, the
        task's own tensors (one slot); ``members`` as for the mixed batch."""
        index = torch.zeros(rows, dtype=torch.long, device=device)
        order = torch.arange(rows, device=device)
        r = cls([task], index, [order], order, order, "grouped", values, {}, members, shapes)
        r.__dict__["_contiguous"] = True
        return r

    @property
    def widest(self) -> int:
        """Rows of the most frequent task."""
        return max(len(r) for r in self.rows)

    @property
    def batch(self) -> int:
        return int(self.index.shape[0])

    @property
    def contiguous(self) -> bool:
        """Whether each task's rows form one block, in ``tasks`` order."""
        if "_contiguous" not in self.__dict__:
            self.__dict__["_contiguous"] = bool((self.inverse == torch.arange(self.batch, device=self.inverse.device)).all())
        return self.__dict__["_contiguous"]

    @property
    def equal_groups(self) -> bool:
        """Contiguous groups of the same size (the batched strategy then needs no copy)."""
        return self.contiguous and all(len(r) == len(self.rows[0]) for r in self.rows)

    def select(self, x: torch.Tensor, u: int) -> torch.Tensor:
        """The rows of the u-th task (``x`` itself when the batch has one task)."""
        if len(self.tasks) == 1:
            return x
        if self.contiguous:
            return x.narrow(0, int(self.rows[u][0]), len(self.rows[u]))
        return x.index_select(0, self.rows[u])

    def regroup(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """Per-task group outputs (in ``tasks`` order) back in row order."""
        if len(outs) == 1:
            return outs[0]
        cat = torch.cat(outs)
        return cat if self.contiguous else cat.index_select(0, self.inverse)

    def check_rows(self, x: torch.Tensor, where: str) -> None:
        if x.shape[0] != self.batch:
            raise MixedBatchError(f"'{where}' got an input with leading dimension {x.shape[0]}, but the mixed "
                                  f"batch has {self.batch} rows: this model reshapes its batch dimension, "
                                  "which mixed-task batches do not support")


def sort_order(tasks: Sequence[str]) -> list[int]:
    """A stable order of the rows that makes each task's rows contiguous (tasks in order of first
    appearance)."""
    pos: dict[str, int] = {}
    for t in tasks:
        pos.setdefault(t, len(pos))
    return sorted(range(len(tasks)), key=lambda i: pos[tasks[i]])


_ROUTES: ContextVar[tuple[Routing, ...]] = ContextVar("recast_routes", default=())


@contextlib.contextmanager
def routed(routing: Routing) -> Iterator[Routing]:
    """Make ``routing`` current for the calls inside the block (in this thread / task only)."""
    token = _ROUTES.set(_ROUTES.get() + (routing,))
    try:
        yield routing
    finally:
        _ROUTES.reset(token)


def route_of(module: object) -> Routing | None:
    """The current routing that ``module`` is a member of (None outside a mixed forward)."""
    for r in _ROUTES.get():
        if id(module) in r.members:
            return r
    return None
