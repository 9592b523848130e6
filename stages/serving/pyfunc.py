"""The served model: one backbone's banks plus the registered payloads of its tasks, as an MLflow
pyfunc model (``RecastServed``), answering mixed-task batches in one ``rc(x, tasks=...)`` forward.

What a logged version holds is its config (JSON), never tensors: in the ``model_config``, the
URI of the base (backbone + banks + base coefficients, logged ONCE per bank sha256 by
``stages.serving.build``), the bank sha256, the input shape and the sha256 of its per-task tables;
those tables in the model artifact ``tasks.json`` (not in the ``model_config``, which MLflow keeps
in memory with the loaded model): per task the pinned registry URI of its payload
(``models:/recast.<arch>.<method>.<task>/<version>``), its transform, and the packs holding the
payloads (``stages.serving.packs``: URI, sha256, tasks, head widths). A config passed whole as the
``model_config`` (tables included) loads too. ``load_context`` fetches the packs through the
local payload cache (a few files, verified by sha256; a version logged before packs existed is
read payload by payload), checks every payload's bank sha256 against the served banks before
loading any, and builds ONE RecastModel whose tasks are packed (``recast.packed``: every task's
coefficients in one tensor, heads in another, no module per task). A new version for one more
task therefore adds a line to the config and a pack of that task, and the banks are neither
re-saved nor copied.

The config also holds each task's evaluation transform (mean and std of its prepared data) and
``max_rows``, the most rows one request may hold (``DEFAULT_MAX_ROWS`` unless the build sets it).

Input: a DataFrame with a ``task`` column (str) and an ``image`` column: a base64 PNG or JPEG,
uint8 pixels H x W x C, or the model's input tensor flattened (``stages.serving.inputs``).
Output per row: ``class`` (int) and ``probabilities`` (softmax over that task's classes, a list
as long as its head). Bad input is refused before any compute with a ``RequestError``
(``stages.serving.errors``: an ``MlflowException`` that the scoring server answers as HTTP 400
with its message); a payload made against other banks raises ``BankMismatchError`` at build and
at load. ``predict`` keeps no per-call state on the model: concurrent calls (the scoring
server's worker threads) share only the loaded, read-only ``RecastModel``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from recast.io import bank_sha256, read_meta
from recast.packed import PackedTasks
from stages.jobs.backbones import load_backbone
from stages.serving.errors import (
    EmptyBatchError,
    RequestError,
    RowLimitError,
    ServingError,
    UnknownServedTaskError,
)
from stages.serving.inputs import TransformTable, images_tensor
from stages.serving.packs import PayloadCache, as_tensors, check_entry, iter_pack, pack_entry, packable

# isort: split
import mlflow  # noqa: E402

log = logging.getLogger(__name__)
TABLES = ("payloads", "transforms", "transform_table", "packs")  # the per-task parts of a config
TASKS_ARTIFACT = "tasks.json"  # the model artifact holding them (its sha256: the model_config's tasks_sha256)
BASE_ARTIFACT = "base"  # artifact path of the base run: pretrain/<arch>.{json,safetensors}, mimic/<arch>/...
DEFAULT_MAX_ROWS = 256  # rows per request unless the build sets ``max_rows``


def payload_files(directory: str | Path) -> Path:
    """The stem of the one ``*.safetensors`` payload (with its JSON sidecar) in ``directory``."""
    found = sorted(Path(directory).rglob("*.safetensors"))
    if len(found) != 1:
        raise ServingError(f"{directory}: expected one payload .safetensors file, found {[p.name for p in found]}")
    return found[0].with_suffix("")


def read_payload_files(stem: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, sidecar) of the payload ``<stem>.safetensors`` + ``<stem>.json``."""
    from safetensors.torch import load_file

    return load_file(f"{stem}.safetensors"), read_meta(stem)


class RecastServed(mlflow.pyfunc.PythonModel):
    """The served tasks of one arch and method on one set of banks (see the module docstring)."""

    def load_context(self, context) -> None:
        cfg = dict(context.model_config)
        # read-only: what this version serves (the base, banks, shape, row limit); the per-task tables
        # are dropped once loaded (the packed tasks, widths and transform table hold what is served)
        self.config = {k: v for k, v in cfg.items() if k not in TABLES}
        self.arch, self.method = cfg["arch"], cfg["method"]
        self.bank_sha, self.shape = cfg["bank_sha256"], tuple(cfg["image_shape"])
        base = Path(mlflow.artifacts.download_artifacts(artifact_uri=cfg["base_uri"]))
        rc = load_backbone(self.arch, base / "pretrain", base / "mimic").recast()
        if bank_sha256(rc) != self.bank_sha:
            raise ServingError(f"the base {cfg['base_uri']} holds banks {bank_sha256(rc)[:12]}, the model config "
                               f"names {self.bank_sha[:12]}")
        if "payloads" not in cfg:  # the per-task tables: the version's tasks.json, checked by its sha256
            # read after the backbone is built: its long-lived objects then do not sit among the
            # tables' short-lived ones, which would keep their memory resident
            data = Path(context.artifacts["tasks"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != cfg.get("tasks_sha256"):
                raise ServingError(f"{context.artifacts['tasks']}: not the tasks file this version was built with "
                                   "(its sha256 differs from the model_config's tasks_sha256)")
            cfg.update(json.loads(data))
            del data
        self.payload_cache = PayloadCache()  # $RECAST_PAYLOAD_CACHE; its counts say what this load fetched
        packed, single = self._payloads(rc, cfg, self.payload_cache)  # every payload checked, nothing loaded yet
        if packed is not None:
            rc.attach_packed(packed)
        for task, (core, meta) in single.items():
            rc.load_task_tensors(task, as_tensors(core), num_classes=meta.get("num_classes"))
        del packed, single
        self.rc = rc.eval()
        names = {t: t for t in rc.tasks}  # one copy of each name: the model's
        self.tasks = [names[t] for t in cfg["payloads"]]
        self.widths = {t: rc.num_classes(t) for t in self.tasks}
        if "transform_table" in cfg:  # tasks.json: in columns, in the order of the payloads
            self.transforms = TransformTable.from_columns(self.tasks, cfg["transform_table"])
        else:
            self.transforms = TransformTable(cfg.get("transforms", {}), self.tasks)
        self.max_rows = int(cfg.get("max_rows", DEFAULT_MAX_ROWS))

    def _payloads(self, rc, cfg: dict[str, Any], cache: PayloadCache) -> tuple[PackedTasks | None, dict]:
        """(the packed tasks, task -> (payload arrays, meta) of the tasks loaded one by one) of
        every served task, each checked (its pinned payload, made on the served banks, its sha256)
        and nothing of ``rc`` changed. The config's packs are fetched through ``cache`` and read
        task by task into the packed tensors (``recast.packed``); a task in no pack (a version
        logged before packs) is fetched alone; a payload that packing cannot hold (per-task
        biases, norms, statistics) is returned for ``load_task_tensors``."""
        payloads = cfg["payloads"]
        datas, where = [], {}  # pack bytes; task -> (index in datas, head width, packable)
        for pack in cfg.get("packs", []):  # the layout from the config: no pack parsed before the rows exist
            data = cache.read(pack["sha256"], lambda d, u=pack["uri"]: mlflow.artifacts.download_artifacts(
                artifact_uri=u, dst_path=str(d)), pack["uri"])
            alone = set(pack.get("single", []))
            for task, width in zip(pack["tasks"], pack["widths"], strict=True):
                if task not in payloads:
                    continue  # a pack may hold tasks this version does not serve
                if task in where:
                    raise ServingError(f"task {task!r} is in two packs of the model config")
                where[task] = (len(datas), int(width), task not in alone)
            datas.append((data, pack["uri"]))
        single = {}
        missing = [t for t in payloads if t not in where]
        if missing and "packs" in cfg:
            log.warning("%d served tasks are in no pack of the model config: fetched one by one", len(missing))
        for task in missing:  # a version logged before packs (or a config naming a payload outside them)
            uri = payloads[task]
            stem = payload_files(mlflow.artifacts.download_artifacts(artifact_uri=uri))
            tensors, meta = pack_entry(task, *read_payload_files(stem), uri, self.bank_sha)
            single[task] = ({k: v for k, v in tensors.items() if not k.startswith("extra.")}, meta)
        order = [t for t in payloads if t in where and where[t][2]]
        packed = None
        if order:
            widths = [where[t][1] for t in order]
            packed = PackedTasks(order, rc.packed_layers(), widths, rc.num_features, any(widths), rc._like())
        seen = set()
        for i, (data, uri) in enumerate(datas):  # one pack, one task at a time
            for task, arrays, meta in iter_pack(data, uri):
                if where.get(task, (None,))[0] != i:
                    continue
                if where[task][2] and not packable(arrays):
                    raise ServingError(f"{uri}: task {task!r} holds {sorted(arrays)[:6]}, which the model config "
                                       "says are packed tasks' tensors")
                seen.add(task)
                check_entry(task, (arrays, meta), payloads[task], self.bank_sha, uri)
                if where[task][2]:
                    packed.put(task, arrays)
                else:
                    core = {k: t.clone() for k, t in as_tensors(arrays).items() if not k.startswith("extra.")}
                    single[task] = (core, meta)
        lost = [t for t in where if t not in seen]
        if lost:
            raise ServingError(f"the packs of the model config hold no payload of the tasks {lost}")
        return packed, single

    def prepare(self, model_input: pd.DataFrame) -> tuple[list[str], torch.Tensor]:
        """A request's rows -> (task per row, input tensor (rows, C, S, S)); a ``RequestError`` for
        a request refused before any compute. ``predict`` and the Ray Serve deployment
        (``stages.serving.ray_app``, which batches several requests into one forward) share it."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("task", "image") if c not in frame.columns]
        if missing:
            raise RequestError(f"input needs the columns ['task', 'image'], missing {missing}")
        if len(frame) == 0:
            raise EmptyBatchError("empty batch: send at least one row (task, image)")
        if len(frame) > self.max_rows:
            raise RowLimitError(f"{len(frame)} rows in one request; this model takes at most {self.max_rows} rows "
                                "per request (max_rows, set at build): split the request")
        tasks = [str(t) for t in frame["task"]]
        for t in tasks:
            if t not in self.widths:
                raise UnknownServedTaskError(t, self.tasks)
        return tasks, images_tensor(list(frame["image"]), tasks, self.shape, self.transforms)

    def forward(self, x: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """One mixed-task forward of rows ``x`` (rows, C, S, S) -> logits (rows, widest head)."""
        with torch.no_grad():
            return self.rc(x, tasks=tasks)

    def answer(self, logits: torch.Tensor, tasks: list[str]) -> pd.DataFrame:
        """Logits of rows of ``tasks`` -> the answer: task, class, probabilities over its classes."""
        classes, probs = [], []
        for row, t in zip(logits, tasks):
            p = torch.softmax(row[:self.widths[t]], dim=0)
            classes.append(int(p.argmax()))
            probs.append(p.tolist())
        return pd.DataFrame({"task": tasks, "class": classes, "probabilities": probs})

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        tasks, x = self.prepare(model_input)
        return self.answer(self.forward(x, tasks), tasks)

DESCRIBE_TASKS = 8  # payloads a log line names; the count says how many there are


def describe(cfg: dict[str, Any]) -> str:
    """One line for a log: which tasks at which payload versions on which banks (the first
    ``DESCRIBE_TASKS`` payloads and the count of all: the config logged with the run has every one)."""
    payloads = cfg["payloads"]
    shown = dict(list(payloads.items())[:DESCRIBE_TASKS])
    return json.dumps({"arch": cfg["arch"], "method": cfg["method"], "bank_sha256": cfg["bank_sha256"][:12],
                       "tasks": len(payloads), "payloads": shown,
                       **({"payloads_shown": f"{len(shown)} of {len(payloads)}"} if len(shown) < len(payloads) else {})})
