"""Adapters that add modules rather than deltas: CLR (a depthwise 3x3 after a conv) and
AdaptFormer (a parallel bottleneck around an MLP). Neither is merged; their inner bases are."""

from __future__ import annotations

import math

import torch
from torch import nn

from recast.adapters.base import CONV_ATTRS, AdapterWrapper, has_protocol


class CLRConv2d(AdapterWrapper):
    """CLR (Ge et al., 2023): ``reprogram(base(x))`` with ``reprogram`` a depthwise 3x3 conv
    (padding 1, no bias) initialised as the identity (dirac), so the layer starts unchanged.
    Parameters: 9 per output channel."""

    def __init__(self, base: nn.Module):
        if not has_protocol(base, CONV_ATTRS[1:3]):
            raise TypeError(f"CLRConv2d needs a Conv2d-like base, got {type(base).__name__}")
        super().__init__(base)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        c = base.out_channels
        ref = next(iter(base.parameters()), None)
        self.reprogram = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.reprogram.weight, groups=c)  # (c, 1, 3, 3): 1 at the centre
        if ref is not None:
            self.reprogram.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reprogram(self.base(x))


def _io_features(module: nn.Module) -> tuple[int, int]:
    """(in of the first, out of the last) Linear-like submodule of an MLP."""
    dims = [(m.in_features, m.out_features) for m in module.modules()
            if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)]
    if not dims:
        raise TypeError(f"AdaptFormerMLP needs an MLP with Linear layers, got {type(module).__name__}")
    return dims[0][0], dims[-1][1]


class AdaptFormerMLP(AdapterWrapper):
    """AdaptFormer (Chen et al., 2022): a parallel bottleneck ``s * up(relu(down(.)))`` added to
    the MLP's output, ``up`` zero-initialised so the model starts unchanged.

    As in AdaptFormer's code, the branch reads the block's residual stream, before the norm that
    precedes the MLP: with ``norm`` given (taken out of the block, whose ``norm2`` becomes an
    Identity) this module computes ``mlp(norm(x)) + s * up(relu(down(x)))`` on the residual
    ``x``. Without ``norm`` the branch reads the MLP's own input. In both cases the branch's
    output passes through the block's LayerScale / DropPath with the MLP's (identities for the
    paper's ViTs when fine-tuning).

    Args:
        base: the MLP module (timm Mlp: fc1 -> act -> fc2).
        bottleneck: hidden width r (configs/paper.yaml: 64, the AdaptFormer paper's ViT
            setting; a choice, the RECAST paper does not give it).
        scale: s (AdaptFormer: 0.1).
        generator: for the kaiming-uniform init of ``down``.
        norm: the block's pre-MLP norm (frozen with the backbone, not part of the payload).
    """

    frozen_prefixes = ("base.", "norm.")

    def __init__(self, base: nn.Module, bottleneck: int, scale: float = 0.1, generator: torch.Generator | None = None,
                 norm: nn.Module | None = None):
        super().__init__(base)
        self.in_dim, self.out_dim = _io_features(base)
        self.bottleneck, self.scale = bottleneck, float(scale)
        self.norm = norm
        ref = next(iter(base.parameters()))
        self.down = nn.Linear(self.in_dim, bottleneck)
        self.up = nn.Linear(bottleneck, self.out_dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.down.to(device=ref.device, dtype=ref.dtype)
        self.up.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(x) if self.norm is not None else x
        return self.base(hidden) + self.scale * self.up(torch.relu(self.down(x)))

    def extra_repr(self) -> str:
        branch = "residual" if self.norm is not None else "mlp input"
        return f"dim={self.in_dim}->{self.out_dim}, bottleneck={self.bottleneck}, scale={self.scale:g}, branch input={branch}"
