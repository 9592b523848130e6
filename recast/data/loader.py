"""Reading prepared tasks for training: a fast in-memory batch loader and a map-style Dataset.

``BatchLoader`` holds a whole split in memory, as one uint8 tensor (``raw`` tasks) or as the
JPEG bytes of every row (``jpeg`` tasks, decoded and resized per batch by a thread pool on
CPU, or by nvjpeg on a CUDA ``device``: ``recast.data.jpeg``), and builds each batch with a few
vectorised tensor ops (gather, crop, flip, resize, normalise). Shuffling and augmentation draw from a
``torch.Generator`` seeded with (seed, epoch): iterating twice in the same epoch yields the
same batches; call ``set_epoch`` to reshuffle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset

from recast.data.augment import transform_batch
from recast.data.jpeg import decode_jpeg, default_workers
from recast.data.manifest import SPLITS, AugmentPolicy, TaskManifest, read_manifest
from recast.data.storage import read_encoded_split


def _load(
    task_dir: str | os.PathLike, split: str, limit: int | None, verify: bool
) -> tuple[TaskManifest, torch.Tensor | list[bytes], torch.Tensor]:
    """(manifest, uint8 images (N, C, H, W) or JPEG bytes per row, labels (N,))."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit}; must be a positive number of examples or None")
    manifest = read_manifest(task_dir, verify=False)
    images, labels = read_encoded_split(Path(task_dir), manifest, split, verify=verify, any_encoding=True)
    if limit is not None:
        # Rows are stored in a seeded random order, so the first `limit` are a random subset.
        images, labels = images[:limit], labels[:limit]
    return manifest, images, labels


class BatchLoader:
    """Iterable of (float32 images (B, 3, S, S) normalised, int64 labels (B,)) over one split.

    Args:
        task_dir: a prepared task directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: examples per batch.
        image_size: output side S (images are resized from the stored size).
        train: shuffle and augment (with the manifest's policy, or ``augment``).
        seed: seed of shuffling and augmentation; combined with the epoch.
        drop_last: drop the last incomplete batch.
        limit: use only the first ``limit`` examples (a random subset; for tiny CI runs).
        augment: override the manifest's augmentation policy (only used when ``train``).
        verify: check the split file's sha256 against the manifest.
        device: where JPEG rows are decoded and the batch is built (``cpu`` or a CUDA device).
        workers: threads of the CPU JPEG decoder (default: the usable CPUs, at most 8).
    """

    def __init__(
        self,
        task_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        image_size: int,
        train: bool,
        seed: int,
        drop_last: bool = False,
        limit: int | None = None,
        augment: AugmentPolicy | None = None,
        verify: bool = True,
        device: str = "cpu",
        workers: int | None = None,
    ) -> None:
        manifest, images, labels = _load(task_dir, split, limit, verify)
        self._setup(manifest, images, labels, split, batch_size, image_size, train, seed, drop_last, augment,
                    device, workers)

    @classmethod
    def from_split(
        cls,
        manifest: TaskManifest,
        images: torch.Tensor | list[bytes],
        labels: torch.Tensor,
        split: str,
        batch_size: int,
        image_size: int,
        train: bool,
        seed: int,
        drop_last: bool = False,
        limit: int | None = None,
        augment: AugmentPolicy | None = None,
        device: str = "cpu",
        workers: int | None = None,
    ) -> BatchLoader:
        """A loader over a split already in memory, as ``recast.data.storage.read_split_bytes``
        returns it: uint8 images (N, C, H, W) of a ``raw`` task or one JPEG's bytes per row of a
        ``jpeg`` task, and int64 labels (N,); other arguments as the constructor's."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; choose one of {SPLITS}")
        if limit is not None and limit <= 0:
            raise ValueError(f"limit={limit}; must be a positive number of examples or None")
        if manifest.encoding == "jpeg":
            if not isinstance(images, list) or len(images) != len(labels):
                raise ValueError(f"a jpeg task's images must be a list of JPEG bytes, one per label; got "
                                 f"{type(images).__name__} for {len(labels)} labels")
        elif (not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4
              or labels.shape != images.shape[:1]):
            raise ValueError(f"images must be uint8 (N, C, H, W) with labels (N,), got {getattr(images, 'shape', None)} "
                             f"{getattr(images, 'dtype', type(images).__name__)} and {tuple(labels.shape)}")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        loader = cls.__new__(cls)
        loader._setup(manifest, images, labels, split, batch_size, image_size, train, seed, drop_last, augment,
                      device, workers)
        return loader

    def _setup(self, manifest: TaskManifest, images: torch.Tensor | list[bytes], labels: torch.Tensor, split: str,
               batch_size: int, image_size: int, train: bool, seed: int, drop_last: bool,
               augment: AugmentPolicy | None, device: str, workers: int | None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}; must be >= 1")
        if image_size <= 0:
            raise ValueError(f"image_size={image_size}; must be >= 1")
        self.manifest: TaskManifest = manifest
        self.images, self.labels = images, labels
        self.split, self.batch_size, self.image_size = split, batch_size, image_size
        self.train, self.seed, self.drop_last = train, seed, drop_last
        self.policy = (augment or self.manifest.augment) if train else None
        self.epoch = 0
        self.device, self.workers = device, workers or default_workers()
        self.raw_view = False

    def with_raw_view(self) -> BatchLoader:
        """A copy whose batches are ``(augmented, labels, raw)``: ``raw`` the same images
        normalised without augmentation (what a replay memory stores; ``recast.baselines``)."""
        out = self.__class__.__new__(self.__class__)
        out.__dict__.update(self.__dict__)
        out.raw_view = True
        return out

    @property
    def num_classes(self) -> int:
        """Number of classes of the task."""
        return self.manifest.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names of the task."""
        return self.manifest.class_names

    @property
    def num_examples(self) -> int:
        """Examples in the (possibly limited) split."""
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffling/augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.num_examples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = self.num_examples
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for i in range(len(self)):
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                pixels = self._pixels(idx, pool)
                x = transform_batch(pixels, self.image_size, self.manifest.mean, self.manifest.std, self.policy,
                                    generator)
                if self.raw_view:
                    raw = transform_batch(pixels, self.image_size, self.manifest.mean, self.manifest.std)
                    yield x, self.labels[idx].to(self.device), raw
                else:
                    yield x, self.labels[idx].to(self.device)

    def _pixels(self, idx: torch.Tensor, pool: ThreadPoolExecutor) -> torch.Tensor:
        """uint8 (B, C, H, W) of the rows ``idx`` on ``device`` (JPEG rows decoded at
        min(stored side, image_size): a reduced-scale decode where that is smaller)."""
        if isinstance(self.images, torch.Tensor):
            return self.images[idx].to(self.device)
        side = min(self.manifest.image_size[0], self.image_size)
        return decode_jpeg([self.images[j] for j in idx.tolist()], side, self.device, pool)


class TaskDataset(Dataset):
    """Map-style Dataset over one split for a standard ``torch.utils.data.DataLoader``.

    Items are (float32 image (3, S, S) normalised, int label). Training augmentation draws
    from torch's global RNG (which DataLoader seeds per worker).

    Args:
        task_dir: a prepared task directory.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: output side S.
        train: apply the augmentation policy.
        limit: use only the first ``limit`` examples.
        augment: override the manifest's augmentation policy.
        verify: check the split file's sha256 against the manifest.
    """

    def __init__(
        self,
        task_dir: str | os.PathLike,
        split: str,
        image_size: int,
        train: bool = False,
        limit: int | None = None,
        augment: AugmentPolicy | None = None,
        verify: bool = True,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size={image_size}; must be >= 1")
        self.manifest, self.images, self.labels = _load(task_dir, split, limit, verify)
        self.image_size = image_size
        self.policy = (augment or self.manifest.augment) if train else None

    @property
    def num_classes(self) -> int:
        """Number of classes of the task."""
        return self.manifest.num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        index = index % len(self)
        if isinstance(self.images, torch.Tensor):
            pixels = self.images[index : index + 1]
        else:
            pixels = decode_jpeg([self.images[index]], min(self.manifest.image_size[0], self.image_size))
        x = transform_batch(pixels, self.image_size, self.manifest.mean, self.manifest.std, self.policy)
        return x[0], int(self.labels[index])
