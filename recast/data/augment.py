"""Batched, vectorised image transforms on tensors (no per-image PIL work).

Every random transform takes an optional ``torch.Generator`` (on the CPU) so a loader seeded
per epoch produces the same batches every time; the images may be on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from recast.data.manifest import AugmentPolicy


def random_crop_padded(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the input size from ``x`` zero-padded by ``padding`` on each side.

    Args:
        x: images (B, C, H, W), any dtype.
        padding: pixels of zero padding per side.
        generator: source of the crop offsets.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W), a view
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    return windows[torch.arange(b, device=x.device), :, oy, ox]  # (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box of each image and resize it to ``size`` x ``size`` (bilinear).

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); a box wider or taller than the
    image is clamped to it (instead of torchvision's rejection sampling). Optionally flips.

    Args:
        x: float images (B, C, H, W).
        size: output side.
        scale: range of the crop's area fraction.
        ratio: range of the crop's aspect ratio (width / height).
        hflip: also flip each crop left-right with probability 1/2.
        generator: source of randomness.
    """
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    # Fractions of the image width / height covered by the crop.
    fw = torch.sqrt(area * aspect).clamp(max=1.0)
    fh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * (1 - fw) + fw / 2) * 2 - 1  # centre in [-1, 1]
    cy = (torch.rand(b, generator=generator) * (1 - fh) + fh / 2) * 2 - 1
    sign = torch.ones(b)
    if hflip:
        sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = fw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = fh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float images (B, C, H, W) to ``size`` x ``size`` (bilinear, antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < x.shape[-2] or size < x.shape[-1]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: float = 1.0) -> torch.Tensor:
    """(x * scale - mean) / std per channel, computed in place on a float ``x``."""
    s = torch.tensor(std, dtype=torch.float64)
    mul = (scale / s).to(x.device, x.dtype).view(1, -1, 1, 1)
    sub = (torch.tensor(mean, dtype=torch.float64) / s).to(x.device, x.dtype).view(1, -1, 1, 1)
    return x.mul_(mul).sub_(sub)


def transform_batch(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    policy: AugmentPolicy | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32 (B, C, size, size), augmented if ``policy``."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if policy is not None and policy.crop == "pad":
        images = random_crop_padded(images, policy.padding, generator)
    if policy is not None and policy.crop == "resized":
        x = random_resized_crop(
            images.float() / 255.0, size, (policy.scale_min, 1.0), hflip=policy.hflip, generator=generator
        )
    else:
        if policy is not None and policy.hflip:
            images = random_hflip(images, generator)
        if images.shape[-2:] == (size, size):
            return normalize(images.float(), mean, std, scale=1.0 / 255.0)
        x = resize(images.float() / 255.0, size)
    return normalize(x, mean, std)


def augment_normalised(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    policy: AugmentPolicy,
    stored_side: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment again images that ``transform_batch`` normalised without augmentation (a replay
    memory's raw view): back to [0, 1], ``policy`` applied as ``transform_batch`` applies it
    (zero padding is black in both), normalised again. The images are already at their final
    side S: a pad crop's ``padding`` (in stored pixels) is scaled by S / ``stored_side``, and a
    random resized crop resamples from S instead of the stored side. Returns a new tensor."""
    if x.dtype != torch.float32 or x.ndim != 4:
        raise ValueError(f"images must be float32 (B, C, S, S), got {x.dtype} {tuple(x.shape)}")
    size = x.shape[-1]
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    unit = x * s + m
    if policy.crop == "pad":
        padding = max(1, round(policy.padding * size / (stored_side or size)))
        unit = random_crop_padded(unit, padding, generator)
    if policy.crop == "resized":
        unit = random_resized_crop(unit, size, (policy.scale_min, 1.0), hflip=policy.hflip, generator=generator)
    elif policy.hflip:
        unit = random_hflip(unit, generator)
    return normalize(unit, mean, std)


class TaskAugment:
    """``(normalised raw images, task ids) -> augmented images``, each image with its own
    task's policy, mean and std (``tasks[task id]``: ``(mean, std, policy, stored side)``): the
    ``replay_augment`` of the replay baselines (``recast.baselines`` ER-ACE, DER++, GDumb)."""

    def __init__(self, tasks: dict[int, tuple[Sequence[float], Sequence[float], AugmentPolicy | None, int]],
                 seed: int = 0) -> None:
        self.tasks = dict(tasks)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        ids = task_ids.to("cpu")
        for t in sorted(set(ids.tolist())):
            if t not in self.tasks:
                raise KeyError(f"TaskAugment: no augmentation for task id {t}; known {sorted(self.tasks)}")
            mean, std, policy, side = self.tasks[t]
            if policy is None:
                continue
            rows = (ids == t).nonzero().flatten().to(images.device)
            out[rows] = augment_normalised(images[rows], mean, std, policy, side, self.generator)
        return out
