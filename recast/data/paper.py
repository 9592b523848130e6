"""The paper's six tasks: find them under a data root (or download them), store them prepared.

Expected locations under ``data_root`` (the first layout found wins; ``download=True`` fetches the
official archives into them, see ``recast.data.download``):

- cifar10: ``cifar-10-batches-bin/`` (preferred) or ``cifar-10-batches-py/`` (torchvision's).
- cifar100: ``cifar-100-binary/`` (preferred) or ``cifar-100-python/`` (torchvision's).
- flowers102: ``flowers-102/`` with ``jpg/``, ``imagelabels.mat``, ``setid.mat``.
- aircraft: ``fgvc-aircraft-2013b/data/`` with ``images/``, ``variants.txt``, ``images_variant_*.txt``.
- indoor67: ``indoor67/`` (or ``indoorCVPR_09/``) with ``Images/``, ``TrainImages.txt``, ``TestImages.txt``.
- cub200: ``CUB_200_2011/`` with ``images/``, ``images.txt``, ``image_class_labels.txt``,
  ``train_test_split.txt``, ``classes.txt``.

Stored form: CIFAR stays raw at its native 32x32 (loaders resize on the fly); every other task is
decoded once, its shorter side resized to ``image_size`` (bilinear), centre-cropped to a square
and stored as JPEG (quality 95; the loader decodes and resizes, see ``recast.data.jpeg``). Test is the official test split; val is carved, stratified and seeded, from the
official train (+ val) split. Augmentation recorded in the manifest: CIFAR random crop
(padding 4) + flip; the others random resized crop (area 25-100%) + flip.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from recast.data.cifar import CIFAR10_BIN, CIFAR10_PY, read_cifar_binary, read_cifar_python
from recast.data.download import FetchPolicy, fetch
from recast.data.errors import DataError
from recast.data.jpeg import JPEG_QUALITY
from recast.data.manifest import AugmentPolicy
from recast.data.raw import RawTask, iter_chunks
from recast.data.readers import read_aircraft, read_cub200, read_flowers102, read_indoor67
from recast.data.storage import TaskWriter, stratified_split

PaperTask = Literal["cifar10", "cifar100", "flowers102", "aircraft", "indoor67", "cub200"]
PAPER_TASKS: tuple[str, ...] = ("cifar10", "cifar100", "flowers102", "aircraft", "indoor67", "cub200")


@dataclass(frozen=True)
class Layout:
    """One accepted on-disk layout: a directory under the data root and what it must hold."""

    subdir: str
    required: tuple[str, ...]
    reader: Callable[[Path], RawTask]


LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "cifar10": (
        Layout(
            "cifar-10-batches-bin",
            (*CIFAR10_BIN, "test_batch.bin", "batches.meta.txt"),
            lambda d: read_cifar_binary(d, 10),
        ),
        Layout("cifar-10-batches-py", (*CIFAR10_PY, "test_batch", "batches.meta"), lambda d: read_cifar_python(d, 10)),
    ),
    "cifar100": (
        Layout(
            "cifar-100-binary", ("train.bin", "test.bin", "fine_label_names.txt"), lambda d: read_cifar_binary(d, 100)
        ),
        Layout("cifar-100-python", ("train", "test", "meta"), lambda d: read_cifar_python(d, 100)),
    ),
    "flowers102": (Layout("flowers-102", ("jpg", "imagelabels.mat", "setid.mat"), read_flowers102),),
    "aircraft": (
        Layout("fgvc-aircraft-2013b/data", ("images", "variants.txt", "images_variant_test.txt"), read_aircraft),
    ),
    "indoor67": tuple(
        Layout(d, ("Images", "TrainImages.txt", "TestImages.txt"), read_indoor67) for d in ("indoor67", "indoorCVPR_09")
    ),
    "cub200": (
        Layout(
            "CUB_200_2011",
            ("images", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"),
            read_cub200,
        ),
    ),
}
DESCRIPTIONS = {
    "cifar10": "CIFAR-10: 10 classes of 32x32 natural images (official 50k train / 10k test).",
    "cifar100": "CIFAR-100: 100 fine classes of 32x32 natural images (official 50k train / 10k test).",
    "flowers102": "Oxford Flowers-102: 102 flower species (official train+val / test).",
    "aircraft": "FGVC Aircraft: 100 aircraft variants, copyright banner removed (official trainval / test).",
    "indoor67": "MIT Indoor Scenes-67: 67 indoor scene classes (official TrainImages / TestImages).",
    "cub200": "CUB-200-2011: 200 bird species (official train / test).",
}


def _expected(name: str, root: Path) -> str:
    lines = []
    for layout in LAYOUTS[name]:
        where = root / layout.subdir
        missing = [r for r in layout.required if not (where / r).exists()]
        state = "" if not where.exists() else f"  [exists, lacks {', '.join(missing)}]"
        lines.append(f"  {where}/ with {', '.join(layout.required)}{state}")
    return "\n".join(lines)


def locate(
    name: str, data_root: str | os.PathLike, download: bool = False, policy: FetchPolicy = FetchPolicy(),
    progress: bool = False,
) -> tuple[Path, Layout]:
    """Find ``name`` under ``data_root`` (fetching its official archives first if allowed and absent)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown paper task {name!r}; choose from {PAPER_TASKS}")
    root = Path(data_root)
    for attempt in range(2):
        for layout in LAYOUTS[name]:
            where = root / layout.subdir
            if all((where / r).exists() for r in layout.required):
                return where, layout
        if attempt == 0 and download:
            fetch(name, root, policy, progress)  # ChecksumError / DownloadError name the URL and the file
        else:
            break
    hint = "" if download else "\n(or set download: true to fetch its official archives when online)"
    raise DataError(root, f"no {name} data found. Expected one of:\n{_expected(name, root)}{hint}")


def prepare_paper_task(
    name: PaperTask,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int,
    val_fraction: float = 0.1,
    image_size: int = 224,
    download: bool = False,
    progress: bool = False,
    workers: int | None = None,
    policy: FetchPolicy = FetchPolicy(),
) -> Path:
    """Read one paper task from its official layout and write ``out_dir/<name>/``.

    Args:
        name: one of ``PAPER_TASKS``.
        data_root: directory holding the raw datasets (see the module docstring).
        out_dir: suite directory.
        seed: seed of the val split and the stored row order.
        val_fraction: fraction of each class of the official training data carved out as val.
        image_size: stored side for non-CIFAR tasks (CIFAR stays 32).
        download: fetch the official archives if absent (``recast.data.download``: checksum, resume,
            atomic extraction).
        progress: show tqdm progress bars.
        workers: image-decoding threads (default min(4, cpus)).
        policy: download attempts, back-off and timeout.

    Returns:
        The task directory.
    """
    if name not in PAPER_TASKS:
        raise ValueError(f"unknown paper task {name!r}; choose from {PAPER_TASKS}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction={val_fraction}; must be in (0, 0.5)")
    if image_size < 8:
        raise ValueError(f"image_size={image_size}; must be >= 8")
    directory, layout = locate(name, data_root, download, policy, progress)
    raw = layout.reader(directory)
    is_cifar = name.startswith("cifar")
    size = 32 if is_cifar else image_size
    keep, val = stratified_split(raw.trainval.labels, val_fraction, seed)
    test_order = np.random.default_rng([seed, 1]).permutation(len(raw.test.labels))
    splits = {"train": raw.trainval.take(keep), "val": raw.trainval.take(val), "test": raw.test.take(test_order)}
    augment = AugmentPolicy("pad", 4, True) if is_cifar else AugmentPolicy("resized", 0, True, scale_min=0.25)
    preprocessing = ("native 32x32" if is_cifar else
                     f"shorter side resized to {size}, centre crop {size}x{size}, JPEG quality {JPEG_QUALITY}")
    writer = TaskWriter(
        out_dir, name, raw.class_names, size,
        description=f"{DESCRIPTIONS[name]} Stored RGB uint8, {preprocessing}; val carved from train.",
        augment=augment, origin=str(directory), seed=seed, val_fraction=val_fraction,
        encoding="raw" if is_cifar else "jpeg",
    )
    with writer:
        for split, data in splits.items():
            label = f"{name}/{split}" if progress else ""
            writer.write_split(split, iter_chunks(data, size, raw.crop_bottom, workers=workers, progress=label))
        writer.finish()
    return Path(out_dir) / name
