"""JPEG encoding of prepared images and batched decoding in the loader.

Encoding (prepare): uint8 (N, 3, H, W) -> JPEG bytes (quality 95 by default), in a thread pool
(PIL releases the GIL while it encodes and decodes). Decoding (loader): a batch of encoded
images -> uint8 (B, 3, S, S). On CPU a thread pool decodes with PIL, at a reduced DCT scale
when S is at most half the stored side (``Image.draft``), then resizes (bilinear) to S; on
CUDA ``torchvision.io.decode_jpeg`` decodes the whole batch on the device (nvjpeg), which then
resizes it with ``F.interpolate`` (bilinear, antialiased).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from recast.data.errors import DataError

JPEG_QUALITY = 95


def default_workers() -> int:
    """Threads of the CPU decoder: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _encode_one(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_jpeg(images: np.ndarray, quality: int = JPEG_QUALITY, workers: int | None = None) -> list[bytes]:
    """uint8 RGB images (N, 3, H, W) -> one JPEG file's bytes per image."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_jpeg needs uint8 (N, 3, H, W) RGB images, got {images.dtype}{images.shape}")
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        return list(pool.map(lambda im: _encode_one(im, quality), images))


def _decode_one(data: bytes, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # DCT scaling: decode at 1/2..1/8 when that stays >= size
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (3, size, size)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError("<jpeg bytes>", f"cannot decode a stored image ({type(err).__name__}: {err})") from None


def decode_jpeg(encoded: list[bytes], size: int, device: str | torch.device = "cpu",
                pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """Decode square JPEGs and resize them to ``size``: uint8 (B, 3, size, size) on ``device``.

    Args:
        encoded: one JPEG file's bytes per image (all of the same stored side).
        size: output side.
        device: ``cpu`` (thread pool + PIL) or a CUDA device (torchvision's nvjpeg decoder).
        pool: the thread pool of the CPU decoder (default: a new one for this call).
    """
    device = torch.device(device)
    if device.type == "cuda":
        from torchvision.io import ImageReadMode, decode_jpeg as tv_decode_jpeg  # noqa: PLC0415 - GPU path only

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
        images = torch.stack(tv_decode_jpeg(data, mode=ImageReadMode.RGB, device=device))  # (B, 3, H, W)
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        return images
    if pool is None:
        with ThreadPoolExecutor(max_workers=default_workers()) as own:
            return decode_jpeg(encoded, size, device, own)
    if not encoded:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(list(pool.map(lambda b: _decode_one(b, size), encoded))))  # (B, 3, S, S)
