"""Raw form of a dataset as its reader returns it, and decoding of image files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from recast.data.errors import DataError


@dataclass(frozen=True)
class RawSplit:
    """One official split: labels plus either decoded images or image file paths.

    Attributes:
        labels: int64 (N,), 0-based.
        origins: one provenance string per example (file path or ``file:record``).
        images: uint8 (N, 3, H, W) for datasets shipped as arrays (CIFAR), else None.
        paths: image files to decode, else None.
    """

    labels: np.ndarray
    origins: tuple[str, ...]
    images: np.ndarray | None = None
    paths: tuple[Path, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.origins) != n or (self.images is None) == (self.paths is None):
            raise ValueError("RawSplit needs one origin per label and exactly one of images / paths")
        if (self.images is not None and len(self.images) != n) or (self.paths is not None and len(self.paths) != n):
            raise ValueError(f"RawSplit: {n} labels but a different number of images/paths")

    def take(self, idx: np.ndarray) -> RawSplit:
        """The examples at ``idx``, in that order."""
        return RawSplit(
            labels=self.labels[idx],
            origins=tuple(self.origins[i] for i in idx),
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else tuple(self.paths[i] for i in idx),
        )


@dataclass(frozen=True)
class RawTask:
    """A dataset as read from disk: classes, the official train(+val) and test splits.

    Attributes:
        class_names: one name per class.
        trainval: the official training data (train and val merged where both exist).
        test: the official test split.
        origin: the directory it was read from.
        crop_bottom: pixels to cut from the bottom of each image (Aircraft's banner).
    """

    class_names: tuple[str, ...]
    trainval: RawSplit
    test: RawSplit
    origin: str
    crop_bottom: int = 0


def decode_image(path: Path, size: int, crop_bottom: int = 0) -> np.ndarray:
    """Decode an image file to uint8 (3, size, size): RGB, shorter side resized, centre crop.

    Args:
        path: image file (any format PIL reads).
        size: output side.
        crop_bottom: pixels (at full resolution) cut from the bottom first.
    """
    try:
        with Image.open(path) as img:
            full_h = img.size[1]
            img.draft("RGB", (size, size))  # JPEG: decode at 1/2..1/8 scale, still >= size
            img = img.convert("RGB")
            if crop_bottom:
                cut = int(round(crop_bottom * img.size[1] / full_h))
                img = img.crop((0, 0, img.size[0], img.size[1] - cut))
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8)  # (size, size, 3)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(path, f"cannot decode image ({type(err).__name__}: {err})") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, size, size)


def iter_chunks(
    split: RawSplit, size: int, crop_bottom: int = 0, chunk: int = 256, workers: int | None = None, progress: str = ""
) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[str, ...]]]:
    """Yield (uint8 images (n, 3, size, size), labels, origins) chunks of a split.

    Array splits must already be ``size``; file splits are decoded by a thread pool (PIL
    releases the GIL while decoding).
    """
    n = len(split.labels)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=progress, unit="img")
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            if split.images is not None:
                images = split.images[start:stop]
            else:
                decoded = pool.map(lambda p: decode_image(p, size, crop_bottom), split.paths[start:stop])
                images = np.stack(list(decoded)) if stop > start else np.zeros((0, 3, size, size), np.uint8)
            if bar is not None:
                bar.update(stop - start)
            yield images, split.labels[start:stop], split.origins[start:stop]
    if bar is not None:
        bar.close()
