"""Checkpoints of a sweep trial through Ray Tune's own API (``tune.report(..., checkpoint=)``,
``tune.get_checkpoint()``): a trial whose worker dies is restarted by Tune (``FailureConfig``)
from its last epoch, and Tune keeps, moves and deletes the checkpoints with the experiment.

A checkpoint is ``fit.safetensors`` + ``fit.json`` (``recast.checkpoint``'s state of ``fit`` after
an epoch; the JSON also holds the tensor file's sha256). Each epoch's metrics are reported once,
together with that epoch's checkpoint, so Tune's ``training_iteration`` (what ASHA counts) is the
epoch as before. A ``recast_sequence`` trial adds the model's other tasks and its accumulators to
each epoch's checkpoint (``pipelines.trials``): it resumes at the task and epoch it reached. A
``continual`` trial's checkpoint is ``sequence.*`` (``recast.baselines.run_sequential``'s after a
task), reported with the task's metrics: it resumes at its last finished task.
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


def _read(stem: str, trial_key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The trial's last checkpoint reported to Tune (``tune.get_checkpoint()``), or None."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        record = json.loads((Path(folder) / f"{stem}.json").read_text())
        blob = (Path(folder) / f"{stem}.safetensors").read_bytes()
    if hashlib.sha256(blob).hexdigest() != record["tensors_sha256"]:
        log.warning("%s: Tune checkpoint does not match its sha256; the trial starts over", trial_key)
        return None
    return load(blob), record["meta"]


def _report(stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], metrics: dict[str, Any]) -> None:
    """``tune.report(metrics)`` with the checkpoint (tensors + meta) attached."""
    blob = save({k: v.contiguous() for k, v in tensors.items()})
    with tempfile.TemporaryDirectory(prefix="recast-trial-") as folder:
        (Path(folder) / f"{stem}.safetensors").write_bytes(blob)
        record = {"meta": meta, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
        (Path(folder) / f"{stem}.json").write_text(json.dumps(record))
        # report copies the folder into the experiment's storage before it returns
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class TuneTrialCheckpoints:
    """``recast.checkpoint.Checkpointer`` of one Tune trial; ``save`` reports the epoch's metrics
    (``meta["history"][-1]`` plus ``extra``) with its checkpoint. The fault point of the tests is
    ``meta["point"]`` when the caller sets one, else ``epoch:<n>``."""

    def __init__(self, trial_key: str, extra: dict[str, Any]) -> None:
        self.trial_key, self.extra = trial_key, dict(extra)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        return _read("fit", self.trial_key)

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        _report("fit", tensors, meta, {**meta["history"][-1], **self.extra})
        maybe_fault(self.trial_key, meta.get("point") or f"epoch:{meta['epoch']}")  # tests: lose the worker here


class TuneSequenceCheckpoints:
    """``recast.checkpoint.Checkpointer`` of a ``continual`` trial (``recast.baselines.run_sequential``).

    The checkpoint after each task is reported through ``tune.report`` with that task's metrics
    (``pending``, set by a scored trial once the task's validation accuracies are measured; else
    ``tasks_done``; plus ``extra``). The checkpoints ``run_sequential`` takes inside a task are not kept: a Tune report
    per epoch would change what ASHA counts (its rungs are tasks) and carry no validation
    accuracy, so a retried trial resumes at its last finished task. ``state``: the trial's own
    JSON state (the validation rows measured so far), saved with every checkpoint and restored
    by ``load``.
    """

    def __init__(self, trial_key: str, extra: dict[str, Any]) -> None:
        self.trial_key, self.extra = trial_key, dict(extra)
        self.pending: dict[str, Any] = {}
        self.state: dict[str, Any] = {}

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        saved = _read("sequence", self.trial_key)
        if saved is not None:
            self.state = saved[1].pop("trial")
        return saved

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("phase") is not None:
            return  # inside a task: not reported (see the class docstring)
        metrics = self.pending or {"tasks_done": meta["task"]}
        _report("sequence", tensors, {**meta, "trial": self.state}, {**metrics, **self.extra})
        self.pending = {}
        maybe_fault(self.trial_key, meta["point"])  # tests: lose the worker after this task
