"""Tiny fixtures in the real on-disk formats of each dataset, written fresh per test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from paper_layouts import (
    AIRCRAFT_VARIANTS, CIFAR10_NAMES, CUB_CLASSES, INDOOR_CLASSES, cifar_records, colour, write_aircraft,
    write_cifar10_bin, write_cifar10_py, write_cifar100_bin, write_cifar100_py, write_cub, write_flowers,
    write_indoor, write_jpg,
)


@pytest.fixture
def cifar_raw():
    """Records of a tiny CIFAR-10 (5 train batches of 8, test of 6) and CIFAR-100 (20 / 6)."""
    c10 = {f"data_batch_{i}": cifar_records(8, 10, i) for i in range(1, 6)} | {"test_batch": cifar_records(6, 10, 9)}
    c100 = {"train": cifar_records(20, 100, 11), "test": cifar_records(6, 100, 12)}
    return {"cifar10": c10, "cifar100": c100}


@pytest.fixture
def fx():
    """The fixture writers and constants of tests/paper_layouts.py."""
    return SimpleNamespace(
        colour=colour, write_jpg=write_jpg, cifar10_names=CIFAR10_NAMES,
        write_cifar10_bin=write_cifar10_bin, write_cifar100_bin=write_cifar100_bin,
        write_cifar10_py=write_cifar10_py, write_cifar100_py=write_cifar100_py,
        images={"flowers102": write_flowers, "aircraft": write_aircraft, "indoor67": write_indoor, "cub200": write_cub},
        aircraft_variants=AIRCRAFT_VARIANTS, indoor_classes=INDOOR_CLASSES, cub_classes=CUB_CLASSES,
    )


@pytest.fixture
def tiny_task(tmp_path):
    """A prepared 3-class task of 8x8 images (train 10, val 4, test 6) written with TaskWriter.

    Returns (task_dir, {split: (uint8 images (N, 3, 8, 8), labels)}).
    """
    from recast.data.manifest import AugmentPolicy
    from recast.data.storage import TaskWriter, write_task_arrays

    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 10), ("val", 4), ("test", 6)):
        images = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
        labels = np.arange(n) % 3
        splits[split] = (images, labels, [f"{split}:{i}" for i in range(n)])
    writer = TaskWriter(
        tmp_path, "tiny", ["a", "b", "c"], 8, description="tiny", augment=AugmentPolicy("pad", 2),
        origin="test", seed=0, val_fraction=0.25,
    )
    with writer:
        write_task_arrays(writer, splits)
    return tmp_path / "tiny", {k: (v[0], v[1]) for k, v in splits.items()}
