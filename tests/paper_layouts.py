"""Tiny datasets in the official on-disk layouts of the paper's six datasets (see
``recast.data.paper.LAYOUTS``): the writers used by tests/data and the paper-path test."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def colour(label: int) -> tuple[int, int, int]:
    """Solid colour of every fixture image of class ``label`` (so labels can be checked from pixels)."""
    return (30 * label % 256, 255 - 40 * label % 256, 90 + 25 * label % 160)


def write_jpg(path: Path, label: int, size: tuple[int, int] = (40, 30), banner: int = 0) -> None:
    """A solid-colour JPEG (W, H = size); ``banner`` white rows at the bottom."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.empty((size[1], size[0], 3), np.uint8)
    array[:] = colour(label)
    if banner:
        array[-banner:] = 255
    Image.fromarray(array).save(path, quality=95)


def cifar_records(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, num_classes, n).astype(np.int64)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10_bin(root: Path, raw: dict) -> Path:
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name, (data, labels) in raw.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
        records.tofile(d / f"{name}.bin")
    (d / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    return d


def write_cifar100_bin(root: Path, raw: dict) -> Path:
    d = root / "cifar-100-binary"
    d.mkdir(parents=True)
    for name, (data, labels) in raw.items():
        coarse = (labels // 5).astype(np.uint8)[:, None]
        np.concatenate([coarse, labels.astype(np.uint8)[:, None], data], axis=1).tofile(d / f"{name}.bin")
    (d / "fine_label_names.txt").write_text("\n".join(f"fine_{i}" for i in range(100)) + "\n")
    (d / "coarse_label_names.txt").write_text("\n".join(f"coarse_{i}" for i in range(20)) + "\n")
    return d


def _dump(path: Path, obj: dict) -> None:
    # Test-only: the official python version *is* a pickle, so the fixture must be one too.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10_py(root: Path, raw: dict) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, (data, labels) in raw.items():
        _dump(d / name, {"batch_label": name, "labels": labels.tolist(), "data": data, "filenames": []})
    _dump(d / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 8})
    return d


def write_cifar100_py(root: Path, raw: dict) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, (data, labels) in raw.items():
        _dump(d / name, {b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": data})
    _dump(d / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)]})
    return d


def write_flowers(root: Path) -> Path:
    """12 images of classes 1..3 (1-based in the .mat): trn 3, val 3, test 6."""
    d = root / "flowers-102"
    labels = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    for i, lab in enumerate(labels, 1):
        write_jpg(d / "jpg" / f"image_{i:05d}.jpg", int(lab) - 1)
    savemat(d / "imagelabels.mat", {"labels": labels[None, :]})
    setid = {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5, 6]]), "tstid": np.arange(7, 13)[None, :]}
    savemat(d / "setid.mat", setid)
    return d


AIRCRAFT_VARIANTS = ["707-320", "A300B4", "Cessna 172", "F-16A/B"]


def write_aircraft(root: Path) -> Path:
    """16 images (4 per variant) with a 20-pixel white banner: 8 trainval, 8 test."""
    d = root / "fgvc-aircraft-2013b" / "data"
    (d / "variants.txt").parent.mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
    trainval, test = [], []
    for i in range(16):
        label, image_id = i % 4, f"{1000000 + i:07d}"
        write_jpg(d / "images" / f"{image_id}.jpg", label, size=(48, 56), banner=20)
        (trainval if i < 8 else test).append(f"{image_id} {AIRCRAFT_VARIANTS[label]}")
    (d / "images_variant_trainval.txt").write_text("\n".join(trainval) + "\n")
    (d / "images_variant_test.txt").write_text("\n".join(test) + "\n")
    return d


INDOOR_CLASSES = ["airport_inside", "bakery", "kitchen"]


def write_indoor(root: Path) -> Path:
    """3 classes x 4 images: 3 train + 1 test per class."""
    d = root / "indoor67"
    train, test = [], []
    for label, cls in enumerate(INDOOR_CLASSES):
        for j in range(4):
            rel = f"{cls}/{cls}_{j:04d}.jpg"
            write_jpg(d / "Images" / rel, label, size=(30, 40))
            (train if j < 3 else test).append(rel)
    (d / "TrainImages.txt").write_text("\n".join(train) + "\n")
    (d / "TestImages.txt").write_text("\n".join(test) + "\n")
    return d


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def write_cub(root: Path) -> Path:
    """3 classes x 4 images: ids 1..12, every 4th image is test."""
    d = root / "CUB_200_2011"
    images, labels, split = [], [], []
    for i in range(1, 13):
        label = (i - 1) % 3
        rel = f"{CUB_CLASSES[label]}/img_{i:04d}.jpg"
        write_jpg(d / "images" / rel, label)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {label + 1}")
        split.append(f"{i} {0 if i % 4 == 0 else 1}")
    (d / "images.txt").write_text("\n".join(images) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (d / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (d / "classes.txt").write_text("\n".join(f"{i} {c}" for i, c in enumerate(CUB_CLASSES, 1)) + "\n")
    return d


def write_paper_layouts(root: Path, cifar_train: int = 60, cifar_test: int = 20, seed: int = 0) -> Path:
    """All six datasets under ``root`` in their preferred layouts (CIFAR in the binary version)."""
    c10 = {f"data_batch_{i}": cifar_records(cifar_train // 5, 10, seed + i) for i in range(1, 6)}
    c10["test_batch"] = cifar_records(cifar_test, 10, seed + 9)
    write_cifar10_bin(root, c10)
    write_cifar100_bin(root, {"train": cifar_records(cifar_train, 100, seed + 11),
                              "test": cifar_records(cifar_test, 100, seed + 12)})
    for writer in (write_flowers, write_aircraft, write_indoor, write_cub):
        writer(root)
    return root
