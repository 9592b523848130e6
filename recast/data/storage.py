"""Parquet storage of a prepared task and reading it back into uint8 tensors.

Layout of ``<out_dir>/<task>/``: ``train.parquet``, ``val.parquet``, ``test.parquet`` and
``manifest.json``. Each Parquet file has the columns ``image``, ``label`` (int64) and ``origin``
(string: where the row came from, e.g. ``mnist:123`` or a file path relative to the dataset
root). ``image`` is, by the manifest's ``encoding``, either ``raw`` (fixed-size binary: the
C*H*W uint8 pixels in CHW order) or ``jpeg`` (binary: one JPEG file of the stored size, decoded
by the loader, see ``recast.data.jpeg``). A task is written into a
hidden temporary directory that replaces the final one only once complete, so a crash never
leaves a half-written task behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recast.data.errors import DataError
from recast.data.jpeg import JPEG_QUALITY, decode_jpeg, encode_jpeg
from recast.data.manifest import (
    ENCODINGS,
    SPLITS,
    AugmentPolicy,
    Encoding,
    TaskManifest,
    read_manifest,
    sha256_file,
    verify_file,
    write_manifest,
)

ROW_GROUP_BYTES = 32 << 20


def _image_type(shape: tuple[int, int, int], encoding: Encoding) -> pa.DataType:
    return pa.binary(int(np.prod(shape))) if encoding == "raw" else pa.binary()


def _schema(shape: tuple[int, int, int], split: str, encoding: Encoding) -> pa.Schema:
    meta = {"recast": json.dumps({"layout": "CHW", "shape": list(shape), "split": split, "encoding": encoding})}
    return pa.schema(
        [
            pa.field("image", _image_type(shape, encoding), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("origin", pa.string(), nullable=False),
        ],
        metadata=meta,
    )


class TaskWriter:
    """Stream the splits of one task to Parquet, then write its manifest and publish it.

    Use as a context manager; on an exception the temporary directory is removed and any
    previously prepared version of the task stays untouched. ``encoding="jpeg"`` stores each
    image as a JPEG of ``quality`` (the channel statistics come from the pixels before encoding).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        name: str,
        class_names: Sequence[str],
        image_size: int | tuple[int, int],
        *,
        description: str,
        augment: AugmentPolicy,
        origin: str,
        seed: int,
        val_fraction: float,
        channels: int = 3,
        encoding: Encoding = "raw",
        quality: int = JPEG_QUALITY,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding={encoding!r}; choose one of {ENCODINGS}")
        if encoding == "jpeg" and (channels != 3 or not 1 <= quality <= 100):
            raise ValueError(f"jpeg needs 3 channels and quality in 1..100, got {channels}, {quality}")
        self.encoding, self.quality = encoding, quality
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.shape = (channels, int(hw[0]), int(hw[1]))
        self.final_dir = Path(out_dir) / name
        self.tmp_dir = Path(out_dir) / f".{name}.{os.getpid()}.tmp"
        self.name, self.class_names = name, tuple(class_names)
        self.meta = dict(description=description, augment=augment, origin=origin, seed=seed, val_fraction=val_fraction,
                         encoding=encoding)
        self.counts: dict[str, int] = {}
        self._sum = np.zeros(channels, np.float64)
        self._sumsq = np.zeros(channels, np.float64)

    def __enter__(self) -> TaskWriter:
        parent = self.final_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        for stale in [*parent.glob(f".{self.name}.*.tmp"), *parent.glob(f".{self.name}.*.old")]:
            shutil.rmtree(stale)  # left behind by a killed run
        self.tmp_dir.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)

    def write_split(self, split: str, chunks: Iterable[tuple[np.ndarray, np.ndarray, Sequence[str]]]) -> int:
        """Write one split from chunks of (uint8 images (n, C, H, W), labels (n,), origins (n,))."""
        if split not in SPLITS or split in self.counts:
            raise ValueError(f"split={split!r}: must be one of {SPLITS}, each written once")
        row_bytes = int(np.prod(self.shape))
        rows_per_group = max(64, ROW_GROUP_BYTES // row_bytes)
        path = self.tmp_dir / f"{split}.parquet"
        count = 0
        compression = "zstd" if self.encoding == "raw" else "none"  # JPEG bytes do not compress further
        with pq.ParquetWriter(path, _schema(self.shape, split, self.encoding), compression=compression) as writer:
            for images, labels, origins in chunks:
                images = np.ascontiguousarray(images)
                where = f"{self.name}/{split}"
                if images.dtype != np.uint8 or images.shape[1:] != self.shape:
                    raise ValueError(f"{where}: images {images.dtype}{images.shape}, need uint8 (n, *{self.shape})")
                labels = np.asarray(labels, dtype=np.int64)
                if len(labels) != len(images) or len(origins) != len(images):
                    raise ValueError(f"{where}: {len(images)} images, {len(labels)} labels, {len(origins)} origins")
                if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                    raise ValueError(f"{self.name}/{split}: label outside 0..{len(self.class_names) - 1}")
                n = len(images)
                if self.encoding == "jpeg":
                    column = pa.array(encode_jpeg(images, self.quality), pa.binary())
                else:
                    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), n, [None, pa.py_buffer(images)])
                table = pa.table([column, pa.array(labels), pa.array(list(origins), pa.string())], schema=writer.schema)
                writer.write_table(table, row_group_size=rows_per_group)
                if split == "train":
                    pixels = images.reshape(n, self.shape[0], -1).astype(np.float64) / 255.0
                    self._sum += pixels.sum(axis=(0, 2))
                    self._sumsq += (pixels**2).sum(axis=(0, 2))
                count += n
        self.counts[split] = count
        return count

    def finish(self) -> TaskManifest:
        """Hash the files, write the manifest, and move the task into place."""
        missing = [s for s in SPLITS if s not in self.counts]
        if missing:
            raise ValueError(f"{self.name}: splits {missing} were never written")
        if self.counts["train"] == 0:
            raise ValueError(f"{self.name}: empty train split")
        n_pix = self.counts["train"] * self.shape[1] * self.shape[2]
        mean = self._sum / n_pix
        std = np.sqrt(np.maximum(self._sumsq / n_pix - mean**2, 0.0))
        manifest = TaskManifest(
            name=self.name,
            num_classes=len(self.class_names),
            class_names=self.class_names,
            counts=dict(self.counts),
            image_size=(self.shape[1], self.shape[2]),
            channels=self.shape[0],
            mean=tuple(float(v) for v in mean),
            std=tuple(float(max(v, 1e-3)) for v in std),
            files={f"{s}.parquet": sha256_file(self.tmp_dir / f"{s}.parquet") for s in SPLITS},
            **self.meta,
        )
        write_manifest(self.tmp_dir, manifest)
        old = self.final_dir.with_name(f".{self.name}.{os.getpid()}.old")
        if self.final_dir.exists():
            os.replace(self.final_dir, old)
        os.replace(self.tmp_dir, self.final_dir)
        if old.exists():
            shutil.rmtree(old)
        return manifest


def write_task_arrays(
    writer: TaskWriter,
    splits: dict[str, tuple[np.ndarray, np.ndarray, Sequence[str]]],
    chunk: int = 4096,
) -> TaskManifest:
    """Write in-memory splits ``{split: (images, labels, origins)}`` and finish the task."""
    for split in SPLITS:
        images, labels, origins = splits[split]
        starts = range(0, len(images), chunk)
        chunks = ((images[i : i + chunk], labels[i : i + chunk], origins[i : i + chunk]) for i in starts)
        writer.write_split(split, chunks)
    return writer.finish()


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, carved): ``round(fraction * n_c)`` of each class carved out.

    Each class keeps at least one example. Both index arrays come back in a seeded random order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction}; must be in [0, 1)")
    rng = np.random.default_rng(seed)
    kept, carved = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        carved.append(idx[:k])
        kept.append(idx[k:])
    kept_all, carved_all = np.concatenate(kept), np.concatenate(carved)
    return rng.permutation(kept_all), rng.permutation(carved_all)


def load_split(
    task_dir: str | os.PathLike, split: str, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split into uint8 images (N, C, H, W) and int64 labels (N,).

    Args:
        task_dir: a prepared task directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        verify: check the file's sha256 against the manifest first.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    task_dir = Path(task_dir)
    manifest = read_manifest(task_dir, verify=False)
    return read_split_file(task_dir, manifest, split, verify=verify)


def read_split_file(
    task_dir: Path, manifest: TaskManifest, split: str, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<split>.parquet`` of a task whose manifest is already loaded: uint8 images
    (N, C, H, W) at the stored size (JPEG rows decoded) and int64 labels (N,)."""
    images, labels = read_encoded_split(task_dir, manifest, split, verify, any_encoding=True)
    if manifest.encoding == "jpeg":
        return decode_jpeg(images, manifest.image_size[0]), labels
    return images, labels


def read_encoded_split(
    task_dir: Path, manifest: TaskManifest, split: str, verify: bool = True, any_encoding: bool = False
) -> tuple[torch.Tensor | list[bytes], torch.Tensor]:
    """Read a split as stored: one JPEG file's bytes per row for ``jpeg`` tasks (uint8 images
    (N, C, H, W) for ``raw`` ones, with ``any_encoding``), and labels (N,)."""
    if manifest.encoding != "jpeg" and not any_encoding:
        raise ValueError(f"task {manifest.name!r} is stored {manifest.encoding!r}, not jpeg")
    filename = f"{split}.parquet"
    path = Path(task_dir) / filename
    if verify:
        verify_file(task_dir, manifest, filename)
    return _read_rows(path, path, manifest, split)


def read_split_bytes(
    manifest: TaskManifest, split: str, data: bytes | memoryview, verify: bool = True
) -> tuple[torch.Tensor | list[bytes], torch.Tensor]:
    """The bytes of ``<split>.parquet`` (e.g. received over the network) -> the split as stored:
    uint8 images (N, C, H, W) for ``raw`` tasks, one JPEG's bytes per row for ``jpeg`` ones
    (``BatchLoader.from_split`` takes either), and int64 labels (N,).

    Args:
        manifest: the task's manifest.
        split: ``"train"``, ``"val"`` or ``"test"``.
        data: the whole Parquet file.
        verify: check the bytes' sha256 against the manifest first.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    filename = f"{split}.parquet"
    label = f"{manifest.name}/{filename}"
    if verify:
        if filename not in manifest.files:
            raise DataError(label, f"not listed in the manifest (lists {sorted(manifest.files)})")
        actual = hashlib.sha256(data).hexdigest()
        if actual != manifest.files[filename]:
            raise DataError(label, f"sha256 {actual[:16]}... does not match the manifest's "
                                   f"{manifest.files[filename][:16]}...")
    return _read_rows(pa.py_buffer(data), label, manifest, split)


def _read_rows(
    source: Path | pa.Buffer, path: str | os.PathLike, manifest: TaskManifest, split: str
) -> tuple[torch.Tensor | list[bytes], torch.Tensor]:
    """A Parquet split (a file or an in-memory buffer) -> images as stored and int64 labels;
    errors name ``path``."""
    shape = (manifest.channels, *manifest.image_size)
    row_bytes = int(np.prod(shape))
    n = manifest.counts[split]
    labels = torch.empty(n, dtype=torch.int64)
    if manifest.encoding == "jpeg":
        encoded: list[bytes] = []
        images: torch.Tensor | list[bytes] = encoded
    else:
        images = torch.empty((n, *shape), dtype=torch.uint8)  # (N, C, H, W)
        flat = images.view(n, row_bytes).numpy()
    start = 0
    try:
        pfile = pq.ParquetFile(source if isinstance(source, Path) else pa.BufferReader(source))
        if pfile.metadata.num_rows != n:
            raise DataError(path, f"{pfile.metadata.num_rows} rows, the manifest says {n}")
        expected = _image_type(shape, manifest.encoding)
        if pfile.schema_arrow.field("image").type != expected:
            raise DataError(path, f"image column is {pfile.schema_arrow.field('image').type}, expected {expected} "
                                  f"({manifest.encoding} {shape} uint8)")
        for batch in pfile.iter_batches(batch_size=2048, columns=["image", "label"]):
            column = batch.column(0)
            m = len(column)
            if column.null_count:
                raise DataError(path, "null images")
            if manifest.encoding == "jpeg":
                encoded.extend(column.to_pylist())
            else:
                buf = np.frombuffer(column.buffers()[1], dtype=np.uint8)
                first = column.offset * row_bytes
                flat[start : start + m] = buf[first : first + m * row_bytes].reshape(m, row_bytes)
            label_values = batch.column(1).to_numpy(zero_copy_only=False).astype(np.int64)
            labels[start : start + m] = torch.from_numpy(label_values)
            start += m
    except (pa.ArrowException, OSError, KeyError) as err:
        raise DataError(path, f"unreadable Parquet file ({type(err).__name__}: {err})") from None
    if start != n:
        raise DataError(path, f"read {start} rows, the manifest says {n}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= manifest.num_classes):
        raise DataError(path, f"labels outside 0..{manifest.num_classes - 1}")
    return images, labels
