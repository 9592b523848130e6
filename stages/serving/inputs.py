"""A request's ``image`` values -> one float tensor (rows, C, S, S) for the served model's forward.

An ``image`` value takes one of three forms, told apart by its type and shape:

- an encoded image: a PNG or JPEG file, base64 in a JSON string (a ``data:image/...;base64,``
  prefix is allowed; ``bytes`` in process);
- uint8 pixels H x W x C: nested lists of integers 0..255 (a uint8 array in process), any H, W;
- the model's input tensor as the ``recast.data`` loaders yield it (normalised float, C x S x S),
  flattened to a list of C*S*S numbers (a C x S x S float array in process). A list of integers
  only is refused (integer pixels go in the H x W x C form); a list holding floats is read as
  float32, its integers as the floats they denote; strings (also numeric ones such as "1e3")
  are refused.

Pixels and encoded images go through the row's task's evaluation transform, the one the
evaluate stage's loader applies (``recast.data.transform_batch`` without augmentation: resize to
S, bilinear and antialiased when shrinking, then normalise with the task's mean and std); a JPEG
sent for a ``jpeg``-stored task is first decoded as that task's loader decodes its stored JPEGs
(``recast.data.jpeg.decode_jpeg``), so the task's own test files give the loader's tensors.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from recast.data import DataError, transform_batch
from recast.data.jpeg import decode_jpeg
from stages.serving.errors import ImageDecodeError, ImageDtypeError, ImageShapeError, ImageValueError

ENCODED_FORMATS = ("PNG", "JPEG")
MAX_ENCODED_PIXELS = 4096 * 4096  # larger encoded images are refused before they are decoded


@dataclass(frozen=True)
class TaskTransform:
    """The evaluation transform of one task: its train split's per-channel mean and std (pixels
    scaled to [0, 1]), as its prepared ``manifest.json`` records them, and for a ``jpeg``-stored
    task the side its loader decodes a JPEG at (``recast.data.jpeg.decode_jpeg``: min(stored
    side, S), a reduced DCT scale where that is at most half), so that a JPEG sent gets the
    loader's pixels; None for ``raw`` tasks."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    jpeg_side: int | None = None


def decode_image(value: str | bytes, row: int, channels: int, jpeg_side: int | None = None) -> np.ndarray:
    """Base64 text (or the bytes) of a PNG or JPEG file -> uint8 pixels (C, H, W); a JPEG decoded
    as a ``jpeg``-stored task's loader decodes it when ``jpeg_side`` is given."""
    data = value
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ImageDecodeError(f"row {row}: image is a string but not base64 ({err}); send a PNG or JPEG file "
                                   "base64-encoded, or the pixels as a list") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ENCODED_FORMATS:
                raise ImageDecodeError(f"row {row}: an encoded image must be one of {list(ENCODED_FORMATS)}, "
                                       f"got {img.format}")
            if img.width * img.height > MAX_ENCODED_PIXELS:
                raise ImageShapeError(f"row {row}: encoded image of {img.width} x {img.height} pixels; at most "
                                      f"{MAX_ENCODED_PIXELS} pixels are decoded")
            if img.format == "JPEG" and jpeg_side is not None and channels == 3:
                return decode_jpeg([data], jpeg_side)[0].numpy()  # (3, side, side), the loader's
            pixels = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except DataError as err:
        raise ImageDecodeError(f"row {row}: cannot decode the image as JPEG ({err})") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"row {row}: cannot decode the image as PNG or JPEG ({type(err).__name__}: "
                               f"{err})") from None
    pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)  # (H, W, C)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (C, H, W)


def _pixels(arr: np.ndarray, row: int, channels: int) -> np.ndarray:
    """uint8 pixels H x W x C as integers 0..255 -> (C, H, W), checked."""
    if arr.shape[-1] != channels or min(arr.shape) == 0:
        raise ImageShapeError(f"row {row}: pixels of shape {list(arr.shape)}; the served model takes H x W x "
                              f"{channels} uint8 pixels")
    if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
        raise ImageValueError(f"row {row}: pixel values from {arr.min()} to {arr.max()}; uint8 pixels are 0..255")
    return np.ascontiguousarray(arr.astype(np.uint8).transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def _as_array(value: object, row: int) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value.tolist() if hasattr(value, "tolist") else value)
    except (TypeError, ValueError):
        raise ImageShapeError(f"row {row}: image is a ragged list; send C*H*W floats, H x W x C pixels or a "
                              "base64 PNG/JPEG string") from None


def row_tensor(value: object, row: int, shape: Sequence[int], transform: TaskTransform | None) -> torch.Tensor:
    """One ``image`` value (any of the module docstring's forms) -> float32 (C, S, S)."""
    channels, want = shape[0], int(np.prod(shape))
    if value is None or (isinstance(value, float) and np.isnan(value)):  # null, or a record without "image"
        raise ImageShapeError(f"row {row}: no image; send {want} floats, H x W x {channels} uint8 pixels or a "
                              "base64 PNG/JPEG string")
    if isinstance(value, str | bytes):
        pixels = decode_image(value, row, channels, transform.jpeg_side if transform else None)
    else:
        arr = _as_array(value, row)
        if arr.ndim == 3 and np.issubdtype(arr.dtype, np.integer):
            pixels = _pixels(arr, row, channels)
        elif arr.ndim in (1, len(shape)) and np.issubdtype(arr.dtype, np.floating):
            if arr.size != want or (arr.ndim > 1 and tuple(arr.shape) != tuple(shape)):
                raise ImageShapeError(f"row {row}: image of shape {list(arr.shape)} ({arr.size} values); the served "
                                      f"model takes {list(shape)} float images, flattened to {want} values")
            if not np.isfinite(arr).all():
                raise ImageValueError(f"row {row}: image has {int((~np.isfinite(arr)).sum())} non-finite values "
                                      "(NaN or Inf)")
            return torch.from_numpy(arr.astype(np.float32, copy=False).reshape(shape))
        elif arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
            raise ImageDtypeError(f"row {row}: image is a flat list of integers; the flattened input takes "
                                  f"normalised floats (float32), uint8 pixels go as H x W x {channels} nested lists")
        elif arr.ndim in (1, 3):
            raise ImageDtypeError(f"row {row}: image values of dtype {arr.dtype}; send numbers (floats flattened, "
                                  "or integer pixels H x W x C), not strings")
        else:
            raise ImageShapeError(f"row {row}: image of shape {list(arr.shape)}; send {want} floats (the {list(shape)} "
                                  f"input flattened), H x W x {channels} uint8 pixels or a base64 PNG/JPEG string")
    if transform is None:
        raise ImageDtypeError(f"row {row}: this model version was built without the tasks' transforms: it takes "
                              f"only the flattened float input ({want} values)")
    x = transform_batch(torch.from_numpy(pixels)[None], shape[-1], transform.mean, transform.std)  # (1, C, S, S)
    return x[0]


def images_tensor(images: Sequence[object], tasks: Sequence[str], shape: Sequence[int],
                  transforms: Mapping[str, TaskTransform]) -> torch.Tensor:
    """The ``image`` column as one (rows, *shape) float32 tensor; named errors for bad rows."""
    return torch.stack([row_tensor(v, i, shape, transforms.get(t)) for i, (v, t) in enumerate(zip(images, tasks))])


class TransformTable(Mapping):
    """Per task its ``TaskTransform``, held as arrays with one row per task (means, stds, JPEG
    sides) instead of an object per task: what a served model of thousands of tasks keeps. A
    lookup builds the task's ``TaskTransform`` from its row; float64 rows give back the very floats
    of the config. Built from the config's form, task -> ``{"mean", "std", "jpeg_side"?}``."""

    def __init__(self, transforms: Mapping[str, Mapping], tasks: Sequence[str] | None = None):
        names = list(tasks) if tasks is not None else list(transforms)
        names = [t for t in names if t in transforms]
        lengths = {len(transforms[t]["mean"]) for t in names} | {len(transforms[t]["std"]) for t in names}
        if len(lengths) > 1:
            raise ValueError(f"task transforms of different channel counts {sorted(lengths)}")
        self._set(names, [transforms[t]["mean"] for t in names], [transforms[t]["std"] for t in names],
                  [transforms[t].get("jpeg_side") for t in names], lengths.pop() if lengths else 0)

    @classmethod
    def from_columns(cls, tasks: Sequence[str], table: Mapping[str, Sequence]) -> TransformTable:
        """From ``columns``' form (a model's ``tasks.json``): ``mean`` and ``std`` flat, ``channels``
        values per task in ``tasks`` order, ``jpeg_side`` one per task (None: raw)."""
        self = cls.__new__(cls)
        self._set(list(tasks), table["mean"], table["std"], table["jpeg_side"], int(table["channels"]))
        return self

    def _set(self, names: list[str], means, stds, sides, width: int) -> None:
        self._row = {t: i for i, t in enumerate(names)}
        self._mean = np.asarray(means, dtype=np.float64).reshape(len(names), width)
        self._std = np.asarray(stds, dtype=np.float64).reshape(len(names), width)
        if len(sides) != len(names):
            raise ValueError(f"{len(sides)} JPEG sides for {len(names)} tasks")
        self._side = np.asarray([-1 if s is None else int(s) for s in sides], dtype=np.int64)

    @staticmethod
    def columns(transforms: Mapping[str, Mapping], tasks: Sequence[str]) -> dict[str, Any]:
        """``transforms`` (task -> {"mean", "std", "jpeg_side"?}) of ``tasks`` in columns: a float
        per JSON number instead of a dict and two lists per task (``from_columns`` reads it)."""
        lengths = {len(transforms[t]["mean"]) for t in tasks} | {len(transforms[t]["std"]) for t in tasks}
        if len(lengths) > 1:
            raise ValueError(f"task transforms of different channel counts {sorted(lengths)}")
        return {"channels": lengths.pop() if lengths else 0, "mean": [v for t in tasks for v in transforms[t]["mean"]],
                "std": [v for t in tasks for v in transforms[t]["std"]],
                "jpeg_side": [transforms[t].get("jpeg_side") for t in tasks]}

    def __getitem__(self, task: str) -> TaskTransform:
        i = self._row[task]
        side = int(self._side[i])
        return TaskTransform(tuple(self._mean[i].tolist()), tuple(self._std[i].tolist()), None if side < 0 else side)

    def __iter__(self):
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)
