"""Piggyback (Mallya et al., 2018): a real-valued mask per weight, thresholded to {0, 1} in the
forward pass, with a straight-through gradient to the real values (paper eq. 6: the mask
multiplies the RECAST-generated weight of the same module). A task stores only the binary mask,
bit-packed (``mask_bits``: one bit per weight, uint8); loading it back sets the real mask to
``mask_init`` where the bit is 1 and 0 elsewhere, which thresholds to the same binary mask."""

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


BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # bit i of a byte, most significant first


def pack_bits(binary: torch.Tensor) -> torch.Tensor:
    """{0, 1} tensor of any shape -> uint8 (ceil(numel / 8),), row-major, MSB first, zero-padded."""
    bits = binary.detach().flatten().to(torch.uint8)
    bits = F.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)  # (bytes, 8)
    weights = torch.tensor(BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)  # (bytes,) no overflow: at most 255


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 (ceil(numel / 8),) -> bool (numel,)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask must be uint8 of {(numel + 7) // 8} bytes for {numel} weights, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    weights = torch.tensor(BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] & weights) != 0).flatten()[:numel]  # (bytes, 8) -> (numel,)


class _PiggybackMask:
    """The real mask shared by the Linear and Conv2d variants."""

    mask: nn.Parameter
    threshold: float

    def _init_mask(self, weight: torch.Tensor, mask_init: float, threshold: float) -> None:
        if not 0.0 <= threshold < mask_init:
            raise ValueError(f"need 0 <= threshold < mask_init (mask starts all-ones), got {threshold}, {mask_init}")
        self.mask = nn.Parameter(torch.full_like(weight, mask_init))  # real values, shape of the weight
        self.threshold, self.mask_init = float(threshold), float(mask_init)

    def binary_mask(self) -> torch.Tensor:
        """The thresholded {0, 1} mask; gradients pass straight through to the real values."""
        return _ThresholdSTE.apply(self.mask, self.threshold)

    @property
    def stored_bits(self) -> int:
        """Size of the task's binary mask when stored: one bit per weight."""
        return self.mask.numel()

    def mask_bits(self) -> torch.Tensor:
        """The binary mask as stored: uint8 (ceil(numel / 8),), one bit per weight."""
        return pack_bits(self.mask.detach() > self.threshold)

    @torch.no_grad()
    def load_mask_bits(self, packed: torch.Tensor) -> None:
        """Set the real mask from ``mask_bits``: ``mask_init`` where the bit is 1, else 0."""
        bits = unpack_bits(packed.to(self.mask.device), self.mask.numel()).view_as(self.mask)
        self.mask.copy_(bits.to(self.mask.dtype) * self.mask_init)


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
