"""Checkpoints inside a job: a job whose worker dies resumes, on its retry, from its last epoch.

``run_jobs`` gives every job a ``checkpoint_dir`` (a path field: not part of the job's cache key):
``<runtime.storage>/checkpoints/<stage>/<key>`` when ``runtime.storage`` is set (any node can read
it), else ``<cache_dir>/<stage>/checkpoints/<key>`` on the node that runs the job. Without shared
storage on a multi-node cluster a retry that lands on another node does not see them and starts
over at epoch 0.

A checkpoint is ``<unit>-<n>.safetensors`` (tensors) + ``<unit>-<n>.json`` (the rest, and the
sha256 of the tensor file), each written to a temporary name and moved into place, the JSON
last; the two newest are kept. The unit is ``epoch`` for a per-task job (``recast.training.fit``
after epoch n) and ``step`` for a sequential baseline (``recast.baselines.run_sequential``: its
n-th checkpoint, after an epoch inside a task or after a task; ``meta["point"]`` says which,
``task:<j>:epoch:<k>`` or ``task:<j>``). ``load`` takes the newest whose tensor file matches its digest;
a torn one (truncated, missing, edited) is skipped with a warning, falling back to the previous
one or to the start. A finished job deletes the directory (``clear``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load, save

from recast.atomic import write_atomic_fs
from stages.jobs.faults import maybe_fault

log = logging.getLogger(__name__)
KEEP = 2
UNITS = ("epoch", "step")


class JobCheckpoints:
    """The ``recast.checkpoint.Checkpointer`` of one job, over ``pyarrow.fs`` (local path or URI).

    ``after_save(point)`` (optional; ``"epoch:<n>"``, or a sequential checkpoint's ``meta["point"]``:
    ``"task:<j>"``, ``"task:<j>:epoch:<k>"``) runs once a checkpoint is complete: the fault injection
    of the tests (``stages.jobs.faults.maybe_fault``) kills the worker there.
    """

    def __init__(self, location: str, after_save=None) -> None:
        self.location = location
        self.fs, self.root = pafs.FileSystem.from_uri(location)
        self.after_save = after_save

    def _saved(self) -> list[tuple[int, str]]:
        """(n, "<unit>-<n>") of every checkpoint whose JSON exists, newest first."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except (OSError, FileNotFoundError):
            return []
        found = []
        for info in infos:
            unit, _, rest = info.base_name.partition("-")
            if info.type == pafs.FileType.File and unit in UNITS and rest.endswith(".json") and rest[:-5].isdigit():
                found.append((int(rest[:-5]), f"{unit}-{rest[:-5]}"))
        return sorted(found, reverse=True)

    def _write(self, name: str, data: bytes) -> None:
        write_atomic_fs(self.fs, f"{self.root}/{name}", data)

    def _read(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.root}/{name}") as fh:
            return fh.read()

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        unit = "step" if "step" in meta else "epoch"
        n = int(meta[unit])
        self.fs.create_dir(self.root, recursive=True)
        blob = save({k: v.contiguous() for k, v in tensors.items()})
        self._write(f"{unit}-{n}.safetensors", blob)
        record = {"meta": meta, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
        self._write(f"{unit}-{n}.json", json.dumps(record).encode())  # last: it makes the checkpoint whole
        for _, old in self._saved()[KEEP:]:
            for suffix in (".json", ".safetensors"):
                try:
                    self.fs.delete_file(f"{self.root}/{old}{suffix}")
                except (OSError, FileNotFoundError):
                    pass  # already gone
        if self.after_save is not None:
            self.after_save(meta.get("point") or f"{unit}:{n}")

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        saved = self._saved()
        for i, (_, name) in enumerate(saved):
            try:
                record = json.loads(self._read(f"{name}.json"))
                blob = self._read(f"{name}.safetensors")
                if hashlib.sha256(blob).hexdigest() != record["tensors_sha256"]:
                    raise ValueError("the tensor file does not match its sha256 (truncated or edited)")
                return load(blob), record["meta"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                fallback = f"the {saved[i + 1][1]} one" if i + 1 < len(saved) else "the start"
                # logging, not warnings: a job records its warnings (record_nondeterminism) and drops the rest
                log.warning("checkpoint %s/%s is torn (%s: %s); falling back to %s", self.location, name,
                            type(err).__name__, err, fallback)
        return None

    def clear(self) -> None:
        """Delete every checkpoint of this job (it finished)."""
        try:
            self.fs.delete_dir(self.root)
        except (OSError, FileNotFoundError):
            pass  # never written


def job_checkpoints(spec: dict) -> JobCheckpoints | None:
    """The checkpoints of ``spec``'s job (``spec["checkpoint_dir"]``, set by ``run_jobs``), or None
    for a job run outside ``run_jobs`` (no checkpoints)."""
    location = spec.get("checkpoint_dir")
    if not location:
        return None
    return JobCheckpoints(location, after_save=lambda point: maybe_fault(spec["id"], point))
