"""Packed tasks: many read-only tasks of a RecastModel held in a few contiguous tensors.

A task added with ``add_task``/``load_task_tensors`` is one ``nn.Parameter`` per templated layer
plus a head ``nn.Linear``: a few hundred bytes of tensors carried by kilobytes of Python objects
(a module holds a dozen dicts, a parameter its own object and allocation). A served model of
thousands of tasks (``stages.serving``) instead packs them (``RecastModel.add_packed_tasks``):

- ``coefs``: ONE flat tensor; per templated layer a block (T, K, n), task i's coefficients its
  row i (a contiguous (K, n) view, the very values a ParameterDict entry would hold);
- ``head_weight`` (sum of the head widths, features) and ``head_bias``: the heads' rows one after
  another; ``head_spans`` (T, 2): each task's first row and width (width 0: no head of its own,
  the base task's head answers, as for a task added without ``num_classes``).

A packed task computes exactly what the same task added one by one computes: its layers mix
the same (K, n) values with the same operations, its head is ``F.linear`` (what ``nn.Linear``
runs) on a contiguous slice. Packed tasks are for inference (mixed forwards ``rc(x, tasks=...)``,
``num_classes``, ``task_tensors``): they hold no parameters and own no biases, norms or
BatchNorm statistics; ``set_task`` and training refuse them, named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class PackedTaskError(ValueError):
    """An operation that packed (read-only) tasks do not support, or tensors that cannot be packed."""


class PackedTasks(nn.Module):
    """The packed tasks of one RecastModel (see the module docstring). Buffers: ``coefs``,
    ``head_weight``, ``head_bias`` (empty when the heads have none), ``head_spans``."""

    def __init__(self, names: Sequence[str], layers: Mapping[str, tuple[int, int]], widths: Sequence[int],
                 features: int | None, head_bias: bool, like: torch.Tensor):
        """Room for the tasks ``names`` (filled by ``put``): ``layers``, (K, n) per templated layer
        name in the model's order; ``widths``, per task its head's classes (0: no head of its own);
        ``head_bias``: whether the heads have biases; ``like``: the dtype and device."""
        super().__init__()
        self.names = list(names)
        self.index = {t: i for i, t in enumerate(self.names)}
        if len(self.index) != len(self.names) or len(widths) != len(self.names):
            raise PackedTaskError("packed task names must be distinct, with one head width each")
        count = len(self.names)
        self.blocks: dict[str, tuple[int, int, int]] = {}  # layer -> (offset in coefs, K, n)
        offset = 0
        for name, (k, n) in layers.items():
            self.blocks[name] = (offset, k, n)
            offset += count * k * n
        spans = torch.zeros(count, 2, dtype=torch.long)
        spans[:, 1] = torch.tensor([int(w) for w in widths], dtype=torch.long)
        spans[1:, 0] = torch.cumsum(spans[:-1, 1], 0)
        rows = int(spans[:, 1].sum())
        self.register_buffer("coefs", torch.empty(offset, dtype=like.dtype, device=like.device))
        self.register_buffer("head_weight", torch.empty(rows, features or 0, dtype=like.dtype, device=like.device))
        self.register_buffer("head_bias", torch.empty(rows if head_bias else 0, dtype=like.dtype, device=like.device))
        self.register_buffer("head_spans", spans)
        self.filled = torch.zeros(count, dtype=torch.bool)  # not a buffer: which tasks ``put`` wrote

    @classmethod
    def of(cls, tasks: Mapping[str, Mapping[str, torch.Tensor]], layers: Mapping[str, tuple[int, int]],
           features: int | None, like: torch.Tensor) -> PackedTasks:
        """The packed ``tasks`` (task -> its ``task_tensors``-style dict: ``coefs.<layer>`` and
        optionally ``head.weight``, ``head.bias``; tensors or numpy arrays)."""
        widths = [int(own["head.weight"].shape[0]) if "head.weight" in own else 0 for own in tasks.values()]
        with_bias = {("head.bias" in own) for own in tasks.values() if "head.weight" in own}
        if len(with_bias) > 1:
            raise PackedTaskError("packed heads must all have a bias or all have none")
        packed = cls(list(tasks), layers, widths, features, with_bias == {True}, like)
        for task, own in tasks.items():
            packed.put(task, own)
        return packed

    def put(self, task: str, own: Mapping[str, torch.Tensor]) -> None:
        """Write ``task``'s tensors (``coefs.<layer>`` for every layer; ``head.weight`` and
        ``head.bias`` as its width and the heads' bias say; tensors or numpy arrays, each turned
        into a tensor sharing its memory for the copy) into its rows."""
        i = self.index[task]
        start, width = (int(v) for v in self.head_spans[i])
        expected = {f"coefs.{name}" for name in self.blocks}
        if width:
            expected |= {"head.weight"} | ({"head.bias"} if self.head_bias.numel() else set())
        if set(own) != expected:
            raise PackedTaskError(f"task '{task}' tensors {sorted(own)[:6]} are not those of its packed rows: missing "
                                  f"{sorted(expected - set(own))[:5]}, unexpected {sorted(set(own) - expected)[:5]}")
        with torch.no_grad():
            for name, (off, k, n) in self.blocks.items():
                value = torch.as_tensor(own[f"coefs.{name}"])
                if tuple(value.shape) != (k, n):
                    raise PackedTaskError(f"task '{task}' coefficients of '{name}' have shape "
                                          f"{tuple(value.shape)}, expected {(k, n)}")
                self.coefs[off + i * k * n: off + (i + 1) * k * n].copy_(value.reshape(-1))
            if width:
                w = torch.as_tensor(own["head.weight"])
                if tuple(w.shape) != (width, self.head_weight.shape[1]):
                    raise PackedTaskError(f"task '{task}' head weight has shape {tuple(w.shape)}, expected "
                                          f"{(width, self.head_weight.shape[1])}")
                self.head_weight[start:start + width].copy_(w)
                if self.head_bias.numel():
                    b = torch.as_tensor(own["head.bias"])
                    if tuple(b.shape) != (width,):
                        raise PackedTaskError(f"task '{task}' head bias has shape {tuple(b.shape)}, expected ({width},)")
                    self.head_bias[start:start + width].copy_(b)
        self.filled[i] = True

    def __contains__(self, task: object) -> bool:
        return task in self.index

    def __len__(self) -> int:
        return len(self.names)

    def layer_coefs(self, layer: str, task: str) -> torch.Tensor:
        """``task``'s (K, n) coefficients of ``layer``: a contiguous view into ``coefs``."""
        off, k, n = self.blocks[layer]
        i = self.index[task]
        return self.coefs[off + i * k * n: off + (i + 1) * k * n].view(k, n)

    def head(self, task: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of ``task``'s own head (views), or None when it has none."""
        start, width = (int(v) for v in self.head_spans[self.index[task]])
        if not width:
            return None
        bias = self.head_bias[start:start + width] if self.head_bias.numel() else None
        return self.head_weight[start:start + width], bias

    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s tensors as ``RecastModel.task_tensors`` names them (copies)."""
        out = {f"coefs.{name}": self.layer_coefs(name, task).clone() for name in self.blocks}
        head = self.head(task)
        if head is not None:
            out["head.weight"] = head[0].clone()
            if head[1] is not None:
                out["head.bias"] = head[1].clone()
        return out

    def extra_repr(self) -> str:
        return f"tasks={len(self.names)}, layers={len(self.blocks)}, head_rows={self.head_weight.shape[0]}"
