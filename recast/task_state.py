"""Per-task values of tensors that live in ordinary modules of a RecastModel.

Besides its coefficients and head, a task can own three kinds of tensor:

- ``biases``: the biases of the templated layers (``set_task(..., train_biases=True)``);
- ``norms``: the affine parameters of LayerNorm/GroupNorm/BatchNorm layers (``train_norms=True``);
- ``bn_stats``: BatchNorm running statistics (``RecastConfig.bn_stats="per_task"``).

Each such tensor exists once in the network (the "live" tensor) and holds the active task's
values. ``TaskState`` keeps the values of every other task that owns the kind, and the shared
values used by tasks that do not, and copies them in and out when the active task changes.
Copying values (instead of swapping tensor objects) keeps the network's structure, its
state_dict keys, optimisers' references and ``.to()`` working as for any module.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Kind = Literal["biases", "norms", "bn_stats"]
KINDS: tuple[Kind, ...] = ("biases", "norms", "bn_stats")
PREFIX: dict[Kind, str] = {"biases": "bias.", "norms": "norm.", "bn_stats": "bn."}

Live = dict[str, torch.Tensor]  # payload key (``bias.blocks.0.mlp.fc1``) -> live tensor


class TensorStore(nn.Module):
    """Named tensors held as buffers (so ``.to()`` and the state_dict include them).

    Keys are payload keys, which contain dots; buffer names replace each dot by ``__``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.buffer_names: dict[str, str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.buffer_names

    def get(self, key: str) -> torch.Tensor:
        return self.get_buffer(self.buffer_names[key])

    @torch.no_grad()
    def put(self, key: str, value: torch.Tensor) -> None:
        """Store a copy of ``value`` under ``key`` (in place when ``key`` exists)."""
        if key in self.buffer_names:
            self.get(key).copy_(value)
            return
        name = key.replace(".", "__")
        self.register_buffer(name, value.detach().clone())
        self.buffer_names[key] = name


class TaskState(nn.Module):
    """Which task owns which kind of tensor, and the values of the tasks that are not active.

    Invariant: the live tensors of a kind hold the active task's values if it owns the kind,
    otherwise the shared values.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stores = nn.ModuleDict()  # task -> TensorStore of the kinds it owns
        self.shared = TensorStore()  # values of tasks that do not own a kind
        self.owned: dict[str, set[Kind]] = {}
        self.shared_kinds: set[Kind] = set()

    def owns(self, task: str | None, kind: Kind) -> bool:
        return task is not None and kind in self.owned.get(task, ())

    def owned_kinds(self, task: str) -> list[Kind]:
        return [k for k in KINDS if self.owns(task, k)]

    def kinds_in_use(self) -> list[Kind]:
        """Kinds that at least one task owns (only these need copying on a switch)."""
        return [k for k in KINDS if k in self.shared_kinds]

    def _slot(self, task: str, kind: Kind) -> TensorStore:
        return self.stores[task] if self.owns(task, kind) else self.shared

    def values(self, task: str, kind: Kind, live: Live, active: str | None) -> Live:
        """``task``'s values of ``kind``, keyed like ``live`` (the live tensors themselves when
        they hold ``task``'s values)."""
        if task == active or not (self.owns(task, kind) or self.owns(active, kind)):
            return live
        slot = self._slot(task, kind)
        return {key: slot.get(key) for key in live}

    @torch.no_grad()
    def switch(self, old: str, new: str, live_by_kind: dict[Kind, Live]) -> None:
        """Save ``old``'s live values and load ``new``'s (for the kinds either one owns)."""
        for kind, live in live_by_kind.items():
            if not (self.owns(old, kind) or self.owns(new, kind)):
                continue  # both use the shared values, which are live already
            save, load = self._slot(old, kind), self._slot(new, kind)
            for key, tensor in live.items():
                save.put(key, tensor)
                tensor.copy_(load.get(key))

    @torch.no_grad()
    def set_values(self, task: str, kind: Kind, values: Live, live: Live, active: str | None) -> None:
        """Make ``task`` own ``kind`` (if it does not yet) with ``values``.

        ``live``'s keys are the tensors of ``kind``; ``values`` must have exactly these keys.
        """
        missing, extra = sorted(set(live) - set(values)), sorted(set(values) - set(live))
        if missing or extra:
            raise ValueError(f"task '{task}' {kind} do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        if kind not in self.shared_kinds or (task == active and not self.owns(task, kind)):
            # the live tensors hold the shared values (no owner yet, or the active task did not
            # own the kind): keep them before the task's own values replace them
            for key, tensor in live.items():
                self.shared.put(key, tensor)
            self.shared_kinds.add(kind)
        if task not in self.stores:
            self.stores[task] = TensorStore()
        store = self.stores[task]
        for key, tensor in live.items():
            value = values[key]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"task '{task}' tensor '{key}' has shape {tuple(value.shape)}, "
                                 f"the model's is {tuple(tensor.shape)}")
            store.put(key, value.to(tensor))
        self.owned.setdefault(task, set()).add(kind)
        if task == active:
            for key, tensor in live.items():
                tensor.copy_(store.get(key))
