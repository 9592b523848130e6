"""Weight-space adapters on Linear-like bases: LoRA (and MeLo), DoRA, RoSA (paper eq. 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recast.adapters.base import LinearDelta, lowrank_pair


class LoRALinear(LinearDelta):
    """LoRA: ``base(x) + (alpha/r) B A x`` with B zero-initialised (starts as the identity).

    With ``row_slices`` the delta touches only those output rows, each slice with its own rank-r
    pair: MeLo is ``row_slices=((0, d), (2d, 3d))`` on a fused qkv (q and v, k untouched).

    Args:
        base: a Linear-like module (nn.Linear, RecastLinear or another weight-space adapter).
        rank: r of every slice.
        alpha: the delta is scaled by alpha / r; None means scale 1.
        row_slices: (start, stop) output-row ranges; default the whole output.
        generator: for the kaiming-uniform init of A.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None,
                 row_slices: Sequence[tuple[int, int]] | None = None, generator: torch.Generator | None = None):
        super().__init__(base)
        out = self.out_features
        slices = tuple((int(a), int(b)) for a, b in (row_slices or ((0, out),)))
        for i, (a, b) in enumerate(slices):
            prev_stop = slices[i - 1][1] if i else 0
            if not (prev_stop <= a < b <= out):
                raise ValueError(f"row_slices must be increasing, non-overlapping ranges inside [0, {out}], got {slices}")
        self.rank, self.row_slices = rank, slices
        self.scale = 1.0 if alpha is None else float(alpha) / rank
        like = base.weight.detach()
        pairs = [lowrank_pair(rank, self.in_features, b - a, like, generator) for a, b in slices]
        self.lora_A = nn.ParameterList([p[0] for p in pairs])  # each (r, in)
        self.lora_B = nn.ParameterList([p[1] for p in pairs])  # each (rows, r)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (S*r, in) and the row-placed B (out, S*r) of all S slices."""
        a = torch.cat(list(self.lora_A), dim=0)  # S x (r, in) -> (S*r, in)
        placed = [F.pad(b, (0, 0, start, self.out_features - stop))  # (rows, r) -> (out, r)
                  for b, (start, stop) in zip(self.lora_B, self.row_slices)]
        return a, torch.cat(placed, dim=1)  # S x (out, r) -> (out, S*r)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._factors()
        return self.scale * (b @ a)  # (out, S*r) @ (S*r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        return self.base(x) + F.linear(F.linear(x, a), b) * self.scale  # the PEFT order of operations

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}, rows={list(self.row_slices)}"


class DoRALinear(LinearDelta):
    """DoRA: ``W' = m * (W + s B A) / ||W + s B A||`` with one magnitude per output row.

    The magnitude starts at the row norms of the base weight at wrap time (for a RecastLinear:
    the active task's generated weight), so the layer starts as the identity. As in PEFT and the
    DoRA paper (section 4.3) the norm is treated as a constant in the backward pass.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(base)
        self.rank = rank
        self.scale = 1.0 if alpha is None else float(alpha) / rank
        weight = base.weight.detach()
        self.lora_A, self.lora_B = lowrank_pair(rank, self.in_features, self.out_features, weight, generator)
        self.magnitude = nn.Parameter(torch.linalg.norm(weight, dim=1))  # (out,)

    def lora_delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in) -> (out, in)

    @property
    def weight(self) -> torch.Tensor:
        direction = self.base.weight + self.lora_delta()  # (out, in)
        norm = torch.linalg.norm(direction, dim=1).detach()  # (out,)
        return (self.magnitude / norm).unsqueeze(1) * direction  # (out, 1) * (out, in)

    def delta_weight(self) -> torch.Tensor:
        return self.weight - self.base.weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


class RoSALinear(LinearDelta):
    """RoSA: ``W + s B A + S`` with S sparse on a fixed support (flat indices), values trainable.

    The support is drawn at random from ``generator`` at init; ``set_support(scores)`` moves it to
    the top-|score| entries (e.g. accumulated gradients, as in the RoSA paper; see
    ``select_rosa_support``). ``rank=0`` gives the sparse-only "SpA" variant.
    """

    def __init__(self, base: nn.Module, rank: int, num_sparse: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(base)
        numel = self.in_features * self.out_features
        if not 0 <= num_sparse <= numel:
            raise ValueError(f"num_sparse must be in [0, {numel}] for a {self.out_features}x{self.in_features} weight, got {num_sparse}")
        self.rank = rank
        self.scale = 1.0 if alpha is None or rank == 0 else float(alpha) / rank
        weight = base.weight.detach()
        if rank > 0:
            self.lora_A, self.lora_B = lowrank_pair(rank, self.in_features, self.out_features, weight, generator)
        else:
            self.lora_A = self.lora_B = None
        index = torch.rand(numel, generator=generator).topk(num_sparse).indices.sort().values  # uniform k-subset
        self.register_buffer("sparse_index", index.to(weight.device))  # (k,) flat indices into (out*in)
        self.sparse_values = nn.Parameter(torch.zeros(num_sparse, device=weight.device, dtype=weight.dtype))
        self._probe: torch.Tensor | None = None  # dense (out, in) zeros used by select_rosa_support

    @property
    def num_sparse(self) -> int:
        return self.sparse_values.numel()

    def delta_weight(self) -> torch.Tensor:
        flat = self.sparse_values.new_zeros(self.out_features * self.in_features)
        delta = flat.scatter(0, self.sparse_index, self.sparse_values).view(self.out_features, self.in_features)
        if self.lora_A is not None:
            delta = delta + self.scale * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in)
        if self._probe is not None:
            delta = delta + self._probe
        return delta

    @torch.no_grad()
    def set_support(self, scores: torch.Tensor) -> None:
        """Move the support to the ``num_sparse`` entries of largest |score|; values reset to 0."""
        if tuple(scores.shape) != (self.out_features, self.in_features):
            raise ValueError(f"scores must have the weight's shape {(self.out_features, self.in_features)}, got {tuple(scores.shape)}")
        top = scores.abs().flatten().topk(self.num_sparse).indices.sort().values
        self.sparse_index.copy_(top.to(self.sparse_index))
        self.sparse_values.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, num_sparse={self.num_sparse}"
