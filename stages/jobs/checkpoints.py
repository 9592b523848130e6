"""Checkpoints inside a job: a job whose worker dies resumes, on its retry, from its last epoch.

``run_jobs`` gives every job a ``checkpoint_dir`` (a path field: not part of the job's cache key):
``<runtime.storage>/checkpoints/<stage>/<key>`` when ``runtime.storage`` is set (any node can read
it), else ``<cache_dir>/<stage>/checkpoints/<key>`` on the node that runs the job. Without shared
storage on a multi-node cluster a retry that lands on another node does not see them and starts
over at epoch 0.

A checkpoint is ``epoch-<n>.safetensors`` (tensors) + ``epoch-<n>.json`` (the rest, and the
sha256 of the tensor file), each written to a temporary name and moved into place, the JSON
last; the two newest are kept. ``load`` takes the newest whose tensor file matches its digest;
a torn one (truncated, missing, edited) is skipped with a warning, falling back to the previous
one or to epoch 0. A finished job deletes the directory (``clear``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load, save

from stages.jobs.fanout import maybe_fault

log = logging.getLogger(__name__)
KEEP = 2


class JobCheckpoints:
    """The ``recast.checkpoint.Checkpointer`` of one job, over ``pyarrow.fs`` (local path or URI).

    ``after_save(epoch)`` (optional) runs once a checkpoint is complete: the fault injection of
    the tests (``stages.jobs.fanout.maybe_fault``) kills the worker there.
    """

    def __init__(self, location: str, after_save=None) -> None:
        self.location = location
        self.fs, self.root = pafs.FileSystem.from_uri(location)
        self.after_save = after_save

    def _epochs(self) -> list[int]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except (OSError, FileNotFoundError):
            return []
        names = [i.base_name for i in infos if i.type == pafs.FileType.File]
        return sorted((int(n[len("epoch-"):-len(".json")]) for n in names
                       if n.startswith("epoch-") and n.endswith(".json") and n[6:-5].isdigit()), reverse=True)

    def _write(self, name: str, data: bytes) -> None:
        tmp = f"{self.root}/{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, f"{self.root}/{name}")

    def _read(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.root}/{name}") as fh:
            return fh.read()

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        epoch = int(meta["epoch"])
        self.fs.create_dir(self.root, recursive=True)
        blob = save({k: v.contiguous() for k, v in tensors.items()})
        self._write(f"epoch-{epoch}.safetensors", blob)
        record = {"meta": meta, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
        self._write(f"epoch-{epoch}.json", json.dumps(record).encode())  # last: it makes the checkpoint whole
        for old in self._epochs()[KEEP:]:
            for suffix in (".json", ".safetensors"):
                try:
                    self.fs.delete_file(f"{self.root}/epoch-{old}{suffix}")
                except (OSError, FileNotFoundError):
                    pass  # already gone
        if self.after_save is not None:
            self.after_save(epoch)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        epochs = self._epochs()
        for i, epoch in enumerate(epochs):
            try:
                record = json.loads(self._read(f"epoch-{epoch}.json"))
                blob = self._read(f"epoch-{epoch}.safetensors")
                if hashlib.sha256(blob).hexdigest() != record["tensors_sha256"]:
                    raise ValueError("the tensor file does not match its sha256 (truncated or edited)")
                return load(blob), record["meta"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                fallback = f"the epoch {epochs[i + 1]} one" if i + 1 < len(epochs) else "epoch 0"
                # logging, not warnings: a job records its warnings (record_nondeterminism) and drops the rest
                log.warning("checkpoint %s/epoch-%d is torn (%s: %s); falling back to %s", self.location, epoch,
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
    return JobCheckpoints(location, after_save=lambda epoch: maybe_fault(spec["id"], f"epoch:{epoch}"))
