"""Checkpoints of a sweep trial through Ray Tune's own API (``tune.report(..., checkpoint=)``,
``tune.get_checkpoint()``): a trial whose worker dies is restarted by Tune (``FailureConfig``)
from its last epoch, and Tune keeps, moves and deletes the checkpoints with the experiment.

A checkpoint is ``fit.safetensors`` + ``fit.json`` (``recast.checkpoint``'s state of ``fit`` after
an epoch; the JSON also holds the tensor file's sha256). Each epoch's metrics are reported once,
together with that epoch's checkpoint, so Tune's ``training_iteration`` (what ASHA counts) is the
epoch as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune
from safetensors.torch import load, save

from stages.jobs.faults import maybe_fault

log = logging.getLogger(__name__)


class TuneTrialCheckpoints:
    """``recast.checkpoint.Checkpointer`` of one Tune trial; ``save`` reports the epoch's metrics
    (``meta["history"][-1]`` plus ``extra``) with its checkpoint."""

    def __init__(self, trial_key: str, extra: dict[str, Any]) -> None:
        self.trial_key, self.extra = trial_key, dict(extra)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            record = json.loads((Path(folder) / "fit.json").read_text())
            blob = (Path(folder) / "fit.safetensors").read_bytes()
        if hashlib.sha256(blob).hexdigest() != record["tensors_sha256"]:
            log.warning("%s: Tune checkpoint does not match its sha256; the trial starts over", self.trial_key)
            return None
        return load(blob), record["meta"]

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        blob = save({k: v.contiguous() for k, v in tensors.items()})
        with tempfile.TemporaryDirectory(prefix="recast-trial-") as folder:
            (Path(folder) / "fit.safetensors").write_bytes(blob)
            record = {"meta": meta, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
            (Path(folder) / "fit.json").write_text(json.dumps(record))
            # report copies the folder into the experiment's storage before it returns
            tune.report({**meta["history"][-1], **self.extra}, checkpoint=tune.Checkpoint.from_directory(folder))
        maybe_fault(self.trial_key, f"epoch:{meta['epoch']}")  # tests: lose the worker after this epoch
