"""CIFAR-10 / CIFAR-100 readers, binary and python versions, without running pickled code.

The binary versions (``cifar-10-batches-bin``, ``cifar-100-binary``) are plain fixed-size
records and are preferred. The python versions (``cifar-10-batches-py``, ``cifar-100-python``,
what torchvision downloads) are pickles written by the dataset authors; ``pickle.load`` on them
could run arbitrary code, so they are read with ``RestrictedUnpickler``, whose ``find_class``
returns only numpy's array-reconstruction helpers (``_reconstruct``, ``ndarray``, ``dtype``)
and ``_codecs.encode`` and refuses every other global. Nothing is ever pickled by this project.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from recast.data.errors import DataError
from recast.data.raw import RawSplit, RawTask

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

PIXELS = 3 * 32 * 32
CIFAR10_BIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_PY = tuple(f"data_batch_{i}" for i in range(1, 6))


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild dicts, lists, strings and numpy arrays, and nothing else."""

    ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def restricted_load(path: Path) -> dict[str, Any]:
    """Load a CIFAR python-version file as a dict with str keys, never running code."""
    try:
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise DataError(path, f"not a readable CIFAR python file ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(path, f"label {int(labels.max())} outside 0..{num_classes - 1}")


def read_binary_records(
    path: Path, label_bytes: int, label_index: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes + 3072 pixel bytes -> images (N, 3, 32, 32), labels."""
    if not path.is_file():
        raise DataError(path, "file not found")
    data = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + PIXELS
    if data.size == 0 or data.size % record:
        raise DataError(path, f"{data.size} bytes is not a whole number of {record}-byte records (truncated?)")
    records = data.reshape(-1, record)
    labels = records[:, label_index].astype(np.int64)
    _check_labels(path, labels, num_classes)
    return records[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _names(path: Path, expected: int) -> tuple[str, ...]:
    if not path.is_file():
        raise DataError(path, "file not found")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(names) != expected:
        raise DataError(path, f"{len(names)} class names, expected {expected}")
    return names


def _split(parts: list[tuple[Path, np.ndarray, np.ndarray]]) -> RawSplit:
    images = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    origins = tuple(f"{path.name}:{i}" for path, _, lab in parts for i in range(len(lab)))
    return RawSplit(labels=labels, origins=origins, images=images)


def read_cifar_binary(directory: Path, num_classes: int) -> RawTask:
    """Read ``cifar-10-batches-bin`` (num_classes=10) or ``cifar-100-binary`` (100, fine labels)."""
    directory = Path(directory)
    if num_classes == 10:
        names = _names(directory / "batches.meta.txt", 10)
        train_files, test_files, label_bytes, label_index = CIFAR10_BIN, ("test_batch.bin",), 1, 0
    else:
        names = _names(directory / "fine_label_names.txt", 100)
        train_files, test_files, label_bytes, label_index = ("train.bin",), ("test.bin",), 2, 1

    def read(files: tuple[str, ...]) -> RawSplit:
        parts = []
        for f in files:
            images, labels = read_binary_records(directory / f, label_bytes, label_index, num_classes)
            parts.append((directory / f, images, labels))
        return _split(parts)

    return RawTask(class_names=names, trainval=read(train_files), test=read(test_files), origin=str(directory))


def _python_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_load(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(path, f"missing keys: has {sorted(batch)}, needs 'data' and {label_key!r}")
    data, labels = batch["data"], np.asarray(batch[label_key], dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        got = f"{getattr(data, 'dtype', type(data).__name__)}{getattr(data, 'shape', '')}"
        raise DataError(path, f"'data' must be uint8 (N, {PIXELS}), got {got}")
    if len(labels) != len(data):
        raise DataError(path, f"{len(labels)} labels for {len(data)} images")
    _check_labels(path, labels, num_classes)
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_python(directory: Path, num_classes: int) -> RawTask:
    """Read ``cifar-10-batches-py`` (num_classes=10) or ``cifar-100-python`` (100, fine labels)."""
    directory = Path(directory)
    if num_classes == 10:
        meta, names_key, label_key = directory / "batches.meta", "label_names", "labels"
        train_files, test_files = CIFAR10_PY, ("test_batch",)
    else:
        meta, names_key, label_key = directory / "meta", "fine_label_names", "fine_labels"
        train_files, test_files = ("train",), ("test",)
    names = restricted_load(meta).get(names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataError(meta, f"{names_key!r} must list {num_classes} class names")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    def read(files: tuple[str, ...]) -> RawSplit:
        return _split([(directory / f, *_python_batch(directory / f, label_key, num_classes)) for f in files])

    return RawTask(class_names=names, trainval=read(train_files), test=read(test_files), origin=str(directory))
