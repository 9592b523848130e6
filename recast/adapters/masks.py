"""Piggyback (Mallya et al., 2018): a real-valued mask per weight, thresholded to {0, 1} in the
forward pass, with a straight-through gradient to the real values (paper eq. 6: the mask
multiplies the RECAST-generated weight of the same module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recast.adapters.base import ConvGeometry, LinearDelta


class _ThresholdSTE(torch.autograd.Function):
    """Forward: 1 where the mask exceeds the threshold, else 0. Backward: identity."""

    @staticmethod
    def forward(ctx, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        return (mask > threshold).to(mask.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _PiggybackMask:
    """The real mask shared by the Linear and Conv2d variants."""

    mask: nn.Parameter
    threshold: float

    def _init_mask(self, weight: torch.Tensor, mask_init: float, threshold: float) -> None:
        if not 0.0 <= threshold < mask_init:
            raise ValueError(f"need 0 <= threshold < mask_init (mask starts all-ones), got {threshold}, {mask_init}")
        self.mask = nn.Parameter(torch.full_like(weight, mask_init))  # real values, shape of the weight
        self.threshold = float(threshold)

    def binary_mask(self) -> torch.Tensor:
        """The thresholded {0, 1} mask; gradients pass straight through to the real values."""
        return _ThresholdSTE.apply(self.mask, self.threshold)

    @property
    def stored_bits(self) -> int:
        """Size of the task's binary mask when stored: one bit per weight."""
        return self.mask.numel()


class PiggybackLinear(_PiggybackMask, LinearDelta):
    """Linear with weight ``base.weight * binarise(mask)``."""

    def __init__(self, base: nn.Module, mask_init: float = 1e-2, threshold: float = 5e-3):
        LinearDelta.__init__(self, base)
        self._init_mask(base.weight.detach(), mask_init, threshold)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight * self.binary_mask()

    def delta_weight(self) -> torch.Tensor:
        return self.weight - self.base.weight


class PiggybackConv2d(_PiggybackMask, ConvGeometry):
    """Conv2d with weight ``base.weight * binarise(mask)`` and the base's geometry."""

    mergeable = True

    def __init__(self, base: nn.Module, mask_init: float = 1e-2, threshold: float = 5e-3):
        ConvGeometry.__init__(self, base)
        self._init_mask(base.weight.detach(), mask_init, threshold)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight * self.binary_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, threshold={self.threshold:g}"
