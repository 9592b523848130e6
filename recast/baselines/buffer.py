"""Replay memories stored as tensors (reservoir, class-balanced) and per-task-head losses over
their samples."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from recast.baselines.common import MultiHeadNet
from recast.checks import check_int


class TensorMemory:
    """Fixed-size replay memory stored as tensors; subclasses choose the slot of each sample.

    Stores images, labels, task ids and (optionally, DER++) zero-padded logits per slot.

    Args:
        capacity: number of samples held at most (M).
        generator: CPU generator of the slot and sampling choices (None: torch's global RNG).
    """

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        check_int("buffer capacity", capacity, minimum=1)
        self.capacity, self.generator, self.size = capacity, generator, 0
        self.images: Tensor | None = None  # (M, 3, H, W)
        self.labels = torch.zeros(capacity, dtype=torch.long)
        self.task_ids = torch.zeros(capacity, dtype=torch.long)
        self.logits: Tensor | None = None  # (M, max classes), zero padded

    def __len__(self) -> int:
        return self.size

    def class_counts(self) -> dict[tuple[int, int], int]:
        """Samples held per ``(task_id, label)``."""
        pairs = zip(self.task_ids[:self.size].tolist(), self.labels[:self.size].tolist())
        return dict(Counter(pairs))

    def add(self, images: Tensor, labels: Tensor, task_id: int, logits: Tensor | None = None) -> None:
        """Offer a batch of one task to the memory (detached copies are stored)."""
        images, labels = images.detach(), labels.detach()
        if self.images is None:
            self.images = images.new_zeros((self.capacity, *images.shape[1:]))
            self.labels, self.task_ids = self.labels.to(images.device), self.task_ids.to(images.device)
        if logits is not None:
            self._fit_logits(logits.detach())
        writes: dict[int, int] = {}  # slot -> batch index (a slot refilled twice keeps the last)
        for i, label in enumerate(labels.tolist()):
            slot = self._slot(task_id, int(label))
            if slot is not None:
                writes[slot] = i
        if not writes:
            return
        slots = torch.tensor(list(writes), device=self.labels.device)
        rows = torch.tensor(list(writes.values()), device=self.labels.device)
        self.images[slots] = images[rows]
        self.labels[slots] = labels[rows].to(self.labels.dtype)
        self.task_ids[slots] = task_id
        if self.logits is not None:
            self.logits[slots] = 0.0
            if logits is not None:
                self.logits[slots, :logits.shape[1]] = logits[rows].to(self.logits.dtype)

    def _slot(self, task_id: int, label: int) -> int | None:
        """Slot that receives the offered sample (growing ``size``), or None to drop it."""
        raise NotImplementedError

    def _fit_logits(self, logits: Tensor) -> None:
        """Allocate or widen the zero-padded logit store to ``logits.shape[1]`` columns."""
        width = logits.shape[1]
        if self.logits is None:
            self.logits = logits.new_zeros((self.capacity, width))
        elif self.logits.shape[1] < width:
            pad = self.logits.new_zeros((self.capacity, width - self.logits.shape[1]))
            self.logits = torch.cat([self.logits, pad], dim=1)

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """Up to ``batch_size`` distinct random samples: images, labels, task_ids (+ logits)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        order = torch.randperm(self.size, generator=self.generator)[:batch_size]
        return self._select(order.to(self.labels.device))

    def batches(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """One shuffled pass over the whole memory."""
        order = torch.randperm(self.size, generator=self.generator).to(self.labels.device)
        for start in range(0, self.size, batch_size):
            yield self._select(order[start:start + batch_size])

    def _select(self, idx: Tensor) -> dict[str, Tensor]:
        assert self.images is not None
        out = {"images": self.images[idx], "labels": self.labels[idx], "task_ids": self.task_ids[idx]}
        if self.logits is not None:
            out["logits"] = self.logits[idx]
        return out

    def tensors(self) -> dict[str, Tensor]:
        """The filled part of the memory (what is stored; safetensors-ready)."""
        if self.images is None:
            return {}
        return self._select(torch.arange(self.size, device=self.labels.device))

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        """Everything that decides later slots and samples: the slots (whole, not just the filled
        part), the generator's state, the counters (a resumed run continues the same stream)."""
        tensors = {"labels": self.labels, "task_ids": self.task_ids}
        if self.images is not None:
            tensors["images"] = self.images
        if self.logits is not None:
            tensors["logits"] = self.logits
        if self.generator is not None:
            tensors["generator"] = self.generator.get_state()
        return tensors, {"size": self.size, **self._counters()}

    def load_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore ``checkpoint_state`` into this (freshly built) memory of the same capacity."""
        device = self.labels.device
        self.labels, self.task_ids = tensors["labels"].to(device), tensors["task_ids"].to(device)
        self.images = tensors["images"].to(device) if "images" in tensors else None
        self.logits = tensors["logits"].to(device) if "logits" in tensors else None
        if "generator" in tensors:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(tensors["generator"])
        self.size = int(meta["size"])
        self._load_counters(meta)

    def _counters(self) -> dict:
        return {}

    def _load_counters(self, meta: dict) -> None:
        pass


class ReservoirBuffer(TensorMemory):
    """Reservoir sampling (Vitter, 1985), the memory of ER-ACE and DER++ in their references
    (Mammoth's ``Buffer``): the first M samples fill the slots; the n-th sample after that
    (n counted from 0 over the whole stream) draws r uniform in ``[0, n]`` and replaces slot r
    if ``r < M``. Every sample seen so far is held with probability M / n, whatever its class.
    """

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        super().__init__(capacity, generator)
        self.seen = 0  # samples offered so far

    def _counters(self) -> dict:
        return {"seen": self.seen}

    def _load_counters(self, meta: dict) -> None:
        self.seen = int(meta["seen"])

    def _slot(self, task_id: int, label: int) -> int | None:
        n, self.seen = self.seen, self.seen + 1
        if n < self.capacity:
            self.size += 1
            return n
        r = int(torch.randint(n + 1, (1,), generator=self.generator))
        return r if r < self.capacity else None


class ClassBalancedBuffer(TensorMemory):
    """Fixed-size memory kept balanced over the classes seen so far (GDumb's greedy sampler,
    Prabhu et al. 2020, Algorithm 1).

    A class is a ``(task_id, label)`` pair. A new sample of class y is stored when y holds
    fewer than ``capacity / classes_seen`` samples; if the memory is full, a random sample of
    the currently largest class (ties: the earliest-seen class) is replaced. Once full, every
    class holds ``floor`` or ``ceil`` of ``capacity / classes_seen`` samples.
    """

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        super().__init__(capacity, generator)
        self._classes: list[tuple[int, int]] = []  # class of every slot
        self._seen: dict[tuple[int, int], int] = {}  # class -> first-seen order
        self._counts: Counter[tuple[int, int]] = Counter()

    def class_counts(self) -> dict[tuple[int, int], int]:
        return {c: n for c, n in self._counts.items() if n > 0}

    def _counters(self) -> dict:  # JSON: classes as [task id, label] pairs, in first-seen order
        return {"classes": [list(c) for c in self._classes], "seen": [list(c) for c in self._seen],
                "counts": [[*c, n] for c, n in self._counts.items()]}

    def _load_counters(self, meta: dict) -> None:
        self._classes = [tuple(c) for c in meta["classes"]]
        self._seen = {tuple(c): i for i, c in enumerate(meta["seen"])}
        self._counts = Counter({(t, label): n for t, label, n in meta["counts"]})

    def _slot(self, task_id: int, label: int) -> int | None:
        cls = (task_id, label)
        self._seen.setdefault(cls, len(self._seen))
        if self._counts[cls] >= self.capacity / len(self._seen):
            return None
        if self.size < self.capacity:
            slot = self.size
            self.size += 1
            self._classes.append(cls)
        else:
            slot = self._evict_slot()
            self._counts[self._classes[slot]] -= 1
            self._classes[slot] = cls
        self._counts[cls] += 1
        return slot

    def _evict_slot(self) -> int:
        """A random slot of the largest class (earliest seen on ties)."""
        largest = max(self._counts, key=lambda c: (self._counts[c], -self._seen[c]))
        slots = [s for s, c in enumerate(self._classes) if c == largest]
        pick = int(torch.randint(len(slots), (1,), generator=self.generator))
        return slots[pick]


def replay_checkpoint_state(buffer: TensorMemory | None, augment: object | None,
                            generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, Tensor], dict]:
    """The checkpoint of a replay method's state outside its ``state_dict``: the memory, the
    re-augmentation's generator (``TaskAugment.generator``) and the method's own generators."""
    tensors: dict[str, Tensor] = {}
    meta: dict = {}
    if buffer is not None:
        held, meta["buffer"] = buffer.checkpoint_state()
        tensors.update({f"buffer.{k}": v for k, v in held.items()})
    if getattr(augment, "generator", None) is not None:
        tensors["augment_generator"] = augment.generator.get_state()
    for name, gen in (generators or {}).items():
        tensors[f"generator.{name}"] = gen.get_state()
    return tensors, meta


def load_replay_checkpoint_state(buffer: TensorMemory | None, augment: object | None, tensors: dict[str, Tensor],
                                 meta: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore ``replay_checkpoint_state`` into the rebuilt memory, augmentation and generators."""
    if "buffer" in meta:
        if buffer is None:
            raise ValueError("checkpoint holds a replay memory; the rebuilt method has none")
        buffer.load_checkpoint_state({k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")},
                                     meta["buffer"])
    if "augment_generator" in tensors and getattr(augment, "generator", None) is not None:
        augment.generator.set_state(tensors["augment_generator"])
    for name, gen in (generators or {}).items():
        gen.set_state(tensors[f"generator.{name}"])


def grouped_logits(net: MultiHeadNet, images: Tensor, task_ids: Tensor,
                   task_names: list[str]) -> Iterator[tuple[Tensor, Tensor]]:
    """One backbone pass, then each sample through its own task head.

    Yields:
        ``(idx, logits)`` per task present: sample indices ``(n,)`` and logits ``(n, C_task)``.
    """
    feats = net.features(images)  # (B, D)
    for task_id in torch.unique(task_ids).tolist():
        idx = (task_ids == task_id).nonzero(as_tuple=True)[0]
        yield idx, net.head(task_names[task_id])(feats[idx])


def replay_cross_entropy(net: MultiHeadNet, batch: dict[str, Tensor], task_names: list[str]) -> Tensor:
    """Mean cross-entropy of buffer samples, each through its own task head."""
    total = batch["labels"].new_zeros((), dtype=torch.float32)
    for idx, logits in grouped_logits(net, batch["images"], batch["task_ids"], task_names):
        total = total + F.cross_entropy(logits, batch["labels"][idx], reduction="sum")
    return total / batch["labels"].numel()
