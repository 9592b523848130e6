"""An example request for the served model, from prepared data: the first rows of a split of
each task, as base64 PNG files (lossless; a ``jpeg`` task's stored JPEG files as they are), in
the JSON body ``mlflow models serve`` takes (``dataframe_records``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from recast.data import read_manifest
from recast.data.storage import read_encoded_split


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 pixels (C, H, W) -> the bytes of a PNG file (lossless)."""
    buf = io.BytesIO()
    hwc = np.ascontiguousarray(pixels.transpose(1, 2, 0))  # (C, H, W) -> (H, W, C)
    Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(buf, format="PNG")
    return buf.getvalue()


def encoded_images(task_dir: Path, split: str = "test", rows: int | None = None) -> tuple[list[bytes], list[int]]:
    """(one PNG or JPEG file's bytes per row, labels) of the first ``rows`` rows of a prepared split."""
    manifest = read_manifest(task_dir, verify=False)
    images, labels = read_encoded_split(Path(task_dir), manifest, split, verify=False, any_encoding=True)
    n = len(labels) if rows is None else min(rows, len(labels))
    files = images[:n] if isinstance(images, list) else [encode_png(images[i].numpy()) for i in range(n)]
    return files, labels[:n].tolist()


def example_request(data_dir: Path, tasks: list[str], rows: int = 2, split: str = "test") -> dict[str, Any]:
    """The request body: ``rows`` images of each of ``tasks`` from ``data_dir``, base64 in JSON."""
    records = []
    for task in tasks:
        if not (Path(data_dir) / task / "manifest.json").exists():
            raise FileNotFoundError(f"no prepared task {task!r} in {data_dir}: run the prepare stage")
        files, _ = encoded_images(Path(data_dir) / task, split, rows)
        records += [{"task": task, "image": base64.b64encode(f).decode("ascii")} for f in files]
    return {"dataframe_records": records}
