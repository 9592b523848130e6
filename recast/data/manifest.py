"""Per-task manifest (``manifest.json``): what a prepared task holds and how to read it.

The manifest is written last, after every Parquet file of the task, and records each file's
sha256 so a reader can prove it reads exactly the bytes the pipeline produced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from recast.atomic import write_atomic
from recast.data.errors import DataError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added ``encoding``; a version-1 manifest is raw
MANIFEST_NAME = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
CropMode = Literal["none", "pad", "resized"]
CROP_MODES: tuple[str, ...] = ("none", "pad", "resized")
Encoding = Literal["raw", "jpeg"]
ENCODINGS: tuple[str, ...] = ("raw", "jpeg")


@dataclass(frozen=True)
class AugmentPolicy:
    """Training-time augmentation of a task (never applied at evaluation).

    Attributes:
        crop: ``"pad"``: random crop of the stored size from the image zero-padded by
            ``padding`` pixels; ``"resized"``: random resized crop (area fraction in
            ``[scale_min, 1]``, aspect ratio in [3/4, 4/3]); ``"none"``: no crop.
        padding: padding in stored pixels for ``crop="pad"``.
        hflip: random horizontal flip with probability 1/2 (off for digits and text).
        scale_min: smallest area fraction of a random resized crop.
    """

    crop: CropMode = "none"
    padding: int = 0
    hflip: bool = False
    scale_min: float = 0.08

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"AugmentPolicy.crop={self.crop!r}; choose one of {CROP_MODES}")
        if self.padding < 0 or (self.crop == "pad" and self.padding == 0):
            raise ValueError(f"AugmentPolicy.padding={self.padding}; crop='pad' needs padding >= 1")
        if not 0.0 < self.scale_min <= 1.0:
            raise ValueError(f"AugmentPolicy.scale_min={self.scale_min}; must be in (0, 1]")


@dataclass(frozen=True)
class TaskManifest:
    """Everything known about one prepared task.

    Attributes:
        name: task name (the directory name).
        description: one paragraph on the data, its source and its preprocessing.
        num_classes: number of classes; labels are ``0..num_classes-1``.
        class_names: one name per class.
        counts: examples per split (``train``, ``val``, ``test``).
        image_size: stored (H, W).
        channels: stored channels (3).
        mean: per-channel mean of the train split, pixels scaled to [0, 1].
        std: per-channel standard deviation of the train split, same scale.
        files: Parquet file name -> sha256 hex digest.
        augment: training augmentation policy.
        origin: where the raw data came from.
        seed: seed of the random choices (val split, row order, synthetic transforms).
        val_fraction: fraction of the official train split carved out as val.
        encoding: how the ``image`` column stores a row: ``raw`` (C*H*W uint8 pixels, CHW) or
            ``jpeg`` (a JPEG file of the stored (H, W), decoded by the loader).
    """

    name: str
    description: str
    num_classes: int
    class_names: tuple[str, ...]
    counts: dict[str, int]
    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    files: dict[str, str]
    augment: AugmentPolicy = field(default_factory=AugmentPolicy)
    origin: str = ""
    seed: int = 0
    val_fraction: float = 0.1
    encoding: Encoding = "raw"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"manifest {self.name!r}: {len(self.class_names)} class_names for num_classes={self.num_classes}"
            )
        if set(self.counts) != set(SPLITS):
            raise ValueError(f"manifest {self.name!r}: counts has splits {sorted(self.counts)}, need {list(SPLITS)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"manifest {self.name!r}: mean/std need {self.channels} values")
        if any(not math.isfinite(s) or s <= 0 for s in self.std):
            raise ValueError(f"manifest {self.name!r}: std={self.std} must be finite and > 0")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"manifest {self.name!r}: encoding={self.encoding!r}; choose one of {ENCODINGS}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["class_names"] = list(self.class_names)
        out["image_size"] = list(self.image_size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | os.PathLike = "<dict>") -> TaskManifest:
        """Build from a parsed ``manifest.json``; errors name ``source`` and the bad key."""
        if not isinstance(data, dict):
            raise DataError(source, f"manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise DataError(source, f"format_version={version!r}; this reader understands {READABLE_VERSIONS}")
        try:
            kwargs = dict(data)
            kwargs["class_names"] = tuple(data["class_names"])
            kwargs["image_size"] = tuple(int(v) for v in data["image_size"])
            kwargs["mean"] = tuple(float(v) for v in data["mean"])
            kwargs["std"] = tuple(float(v) for v in data["std"])
            kwargs["counts"] = {str(k): int(v) for k, v in data["counts"].items()}
            kwargs["augment"] = AugmentPolicy(**data.get("augment", {}))
            kwargs["format_version"] = FORMAT_VERSION
            return cls(**kwargs)
        except KeyError as err:
            raise DataError(source, f"manifest lacks key {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise DataError(source, f"invalid manifest: {err}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_file(task_dir: Path, manifest: TaskManifest, filename: str) -> None:
    """Check one file of a task against the sha256 its manifest records."""
    path = Path(task_dir) / filename
    if filename not in manifest.files:
        raise DataError(path, f"not listed in the manifest (lists {sorted(manifest.files)})")
    if not path.is_file():
        raise DataError(path, "listed in the manifest but missing")
    actual = sha256_file(path)
    if actual != manifest.files[filename]:
        raise DataError(
            path, f"sha256 {actual[:16]}... does not match the manifest's {manifest.files[filename][:16]}..."
        )


def read_manifest(task_dir: str | os.PathLike, verify: bool = True) -> TaskManifest:
    """Read ``task_dir/manifest.json``; with ``verify`` check every file's sha256."""
    task_dir = Path(task_dir)
    path = task_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(path, "manifest not found (run the prepare stage first)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"not valid JSON ({err})") from None
    manifest = TaskManifest.from_dict(data, source=path)
    if verify:
        for filename in manifest.files:
            verify_file(task_dir, manifest, filename)
    return manifest


def write_manifest(task_dir: str | os.PathLike, manifest: TaskManifest) -> Path:
    """Write ``manifest.json`` atomically (temp file + ``os.replace``)."""
    path = Path(task_dir) / MANIFEST_NAME
    write_atomic(path, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path
