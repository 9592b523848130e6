"""The served model: one backbone's banks plus the registered payloads of its tasks, as an MLflow
pyfunc model (``RecastServed``), answering mixed-task batches in one ``rc(x, tasks=...)`` forward.

What a logged version holds is its ``model_config`` (JSON), never tensors: the URI of the base
(backbone + banks + base coefficients, logged ONCE per bank sha256 by ``stages.serving.build``),
the bank sha256, the input shape, and per task the pinned registry URI of its payload
(``models:/recast.<arch>.<method>.<task>/<version>``). ``load_context`` downloads them, checks
every payload's bank sha256 against the served banks before loading any, and builds ONE
RecastModel. A new version for one more task therefore adds a line to the config, and the
banks are neither re-saved nor copied.

Input: a DataFrame with a ``task`` column (str) and an ``image`` column, each value the
model's input image (as the ``recast.data`` loaders yield it: float, C x H x W) flattened to a
list of C*H*W numbers. Output per row: ``class`` (int) and ``probabilities`` (softmax over
that task's classes, a list as long as its head). Bad input is refused before any compute with
a named error: ``UnknownServedTaskError`` (the served tasks listed), ``ImageShapeError``,
``ImageDtypeError``, ``EmptyBatchError``; a payload made against other banks raises
``BankMismatchError`` at build and at load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recast.io import load_payload, read_meta
from recast.mixed import UnknownTaskError
from stages.jobs.backbones import load_backbone

import mlflow  # noqa: E402

BASE_ARTIFACT = "base"  # artifact path of the base run: pretrain/<arch>.{json,safetensors}, mimic/<arch>/...


class ServingError(ValueError):
    """Input or configuration the served model refuses (nothing is changed)."""


class UnknownServedTaskError(UnknownTaskError, ServingError):
    """A row's task is not one of the served tasks (``known``)."""


class BankMismatchError(ServingError):
    """A payload trained against other banks than the served ones."""

    def __init__(self, task: str, payload_sha: str, served_sha: str, where: str = ""):
        self.task, self.payload_sha, self.served_sha, self.where = task, payload_sha, served_sha, where
        super().__init__(f"payload of task {task!r}{' (' + where + ')' if where else ''} was trained against banks "
                         f"{str(payload_sha)[:12]}, the served banks are {served_sha[:12]}: "
                         "register a payload tuned on these banks (or serve its own banks)")

    def __reduce__(self):
        return type(self), (self.task, self.payload_sha, self.served_sha, self.where)


class ImageShapeError(ServingError):
    """An image whose number of values is not C*H*W of the served input shape."""


class ImageDtypeError(ServingError):
    """An image whose values are not floating-point numbers."""


class EmptyBatchError(ServingError):
    """A request without rows."""


def payload_files(directory: str | Path) -> Path:
    """The stem of the one ``*.safetensors`` payload (with its JSON sidecar) in ``directory``."""
    found = sorted(Path(directory).rglob("*.safetensors"))
    if len(found) != 1:
        raise ServingError(f"{directory}: expected one payload .safetensors file, found {[p.name for p in found]}")
    return found[0].with_suffix("")


def check_bank(task: str, stem: Path, served_sha: str, where: str = "") -> dict[str, Any]:
    """The payload's sidecar; ``BankMismatchError`` unless it was made against ``served_sha``."""
    meta = read_meta(stem)
    if meta.get("bank_sha256") != served_sha:
        raise BankMismatchError(task, str(meta.get("bank_sha256")), served_sha, where)
    return meta


def images_tensor(frame: pd.DataFrame, shape: tuple[int, ...]) -> torch.Tensor:
    """The ``image`` column as one (rows, *shape) float32 tensor; named errors for bad rows."""
    want = int(np.prod(shape))
    out = np.empty((len(frame), want), dtype=np.float32)
    for i, value in enumerate(frame["image"]):
        arr = np.asarray(value)
        if arr.dtype == object:
            try:
                arr = np.asarray(value.tolist() if hasattr(value, "tolist") else list(value))
            except TypeError:
                raise ImageDtypeError(f"row {i}: image must be a list of numbers, got {type(value).__name__}") from None
        if not np.issubdtype(arr.dtype, np.floating):
            raise ImageDtypeError(f"row {i}: image values must be floating-point numbers (float32), got dtype "
                                  f"{arr.dtype}")
        if arr.size != want or (arr.ndim > 1 and tuple(arr.shape) != tuple(shape)):
            raise ImageShapeError(f"row {i}: image of shape {list(arr.shape)} ({arr.size} values); the served "
                                  f"model takes {list(shape)} images, flattened to {want} values")
        if not np.isfinite(arr).all():
            raise ImageDtypeError(f"row {i}: image has non-finite values")
        out[i] = arr.reshape(-1)
    return torch.from_numpy(out).reshape(len(frame), *shape)


class RecastServed(mlflow.pyfunc.PythonModel):
    """The served tasks of one arch and method on one set of banks (see the module docstring)."""

    def load_context(self, context) -> None:
        cfg = dict(context.model_config)
        self.arch, self.method = cfg["arch"], cfg["method"]
        self.bank_sha, self.shape = cfg["bank_sha256"], tuple(cfg["image_shape"])
        base = Path(mlflow.artifacts.download_artifacts(artifact_uri=cfg["base_uri"]))
        rc = load_backbone(self.arch, base / "pretrain", base / "mimic").recast()
        stems = {}
        for task, uri in cfg["payloads"].items():  # every sidecar checked before any payload is loaded
            stems[task] = payload_files(mlflow.artifacts.download_artifacts(artifact_uri=uri))
            check_bank(task, stems[task], self.bank_sha, uri)
        for task, stem in stems.items():
            load_payload(rc, stem, task=task)
        self.rc = rc.eval()
        self.tasks = list(cfg["payloads"])
        self.widths = {t: rc.num_classes(t) for t in self.tasks}

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("task", "image") if c not in frame.columns]
        if missing:
            raise ServingError(f"input needs the columns ['task', 'image'], missing {missing}")
        if len(frame) == 0:
            raise EmptyBatchError("empty batch: send at least one row (task, image)")
        tasks = [str(t) for t in frame["task"]]
        for t in tasks:
            if t not in self.widths:
                raise UnknownServedTaskError(t, self.tasks)
        x = images_tensor(frame, self.shape)
        with torch.no_grad():
            logits = self.rc(x, tasks=tasks)
        classes, probs = [], []
        for row, t in zip(logits, tasks):
            p = torch.softmax(row[:self.widths[t]], dim=0)
            classes.append(int(p.argmax()))
            probs.append(p.tolist())
        return pd.DataFrame({"task": tasks, "class": classes, "probabilities": probs})


def describe(cfg: dict[str, Any]) -> str:
    """One line for a log: which tasks at which payload versions on which banks."""
    return json.dumps({"arch": cfg["arch"], "method": cfg["method"], "bank_sha256": cfg["bank_sha256"][:12],
                       "payloads": cfg["payloads"]})
