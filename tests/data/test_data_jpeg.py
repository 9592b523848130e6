"""JPEG-encoded tasks: Parquet rows hold JPEG files, the loader decodes and resizes them."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recast.data import BatchLoader, DataError, TaskDataset, load_split, read_manifest
from recast.data.jpeg import decode_jpeg, encode_jpeg
from recast.data.manifest import AugmentPolicy
from recast.data.storage import TaskWriter, write_task_arrays


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, size, size) smooth colour gradients (natural-image-like for JPEG)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(20, 235, 3)
        out[i, 0] = (a * ramp[None, :] + (255 - a) * ramp[:, None] / 2).clip(0, 255)
        out[i, 1] = (b * ramp[:, None] + 10).clip(0, 255)
        out[i, 2] = c
    return out


def write(tmp_path, name: str, encoding: str, size: int = 64):
    splits = {}
    for k, (split, n) in enumerate((("train", 12), ("val", 4), ("test", 6))):
        splits[split] = (smooth_images(n, size, k), np.arange(n) % 3, [f"{split}:{i}" for i in range(n)])
    writer = TaskWriter(tmp_path, name, ["a", "b", "c"], size, description="smooth", augment=AugmentPolicy("resized"),
                        origin="test", seed=0, val_fraction=0.25, encoding=encoding)
    with writer:
        write_task_arrays(writer, splits)
    return tmp_path / name, splits


def test_jpeg_task_stores_jpeg_files_and_loads_close_to_raw(tmp_path):
    jpeg_dir, splits = write(tmp_path, "jpg", "jpeg")
    raw_dir, _ = write(tmp_path, "raw", "raw")
    manifest = read_manifest(jpeg_dir)
    assert manifest.encoding == "jpeg" and read_manifest(raw_dir).encoding == "raw"
    column = pq.read_table(jpeg_dir / "test.parquet").column("image").to_pylist()
    assert all(b[:2] == b"\xff\xd8" for b in column)  # JPEG SOI marker
    assert sum(map(len, column)) < 0.25 * 6 * 3 * 64 * 64  # smaller than the raw pixels
    images, labels = load_split(jpeg_dir, "test")
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert (images.float() - torch.from_numpy(splits["test"][0]).float()).abs().mean() < 2.0  # quality 95
    for size in (64, 32):  # stored size, and a reduced-scale decode + resize
        jx = torch.cat([x for x, _ in BatchLoader(jpeg_dir, "test", 4, size, train=False, seed=0, workers=2)])
        rx = torch.cat([x for x, _ in BatchLoader(raw_dir, "test", 4, size, train=False, seed=0)])
        assert jx.shape == rx.shape == (6, 3, size, size)
        assert (jx - rx).abs().mean() < 0.05, size  # normalised units
    train = [y for _, y in BatchLoader(jpeg_dir, "train", 5, 32, train=True, seed=1)]
    assert sorted(torch.cat(train).tolist()) == sorted(splits["train"][1].tolist())
    x, y = TaskDataset(jpeg_dir, "val", 32)[1]
    assert x.shape == (3, 32, 32) and y == 1


def test_encode_decode_roundtrip_and_errors():
    images = smooth_images(3, 40, 0)
    encoded = encode_jpeg(images)
    decoded = decode_jpeg(encoded, 40)
    assert decoded.shape == (3, 3, 40, 40)
    assert (decoded.float() - torch.from_numpy(images).float()).abs().max() < 12
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(images.astype(np.float32))
    with pytest.raises(DataError, match="cannot decode"):
        decode_jpeg([b"not a jpeg"], 8)
