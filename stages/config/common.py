"""Helpers shared by every stage: reading and validating params sections, atomic JSON writes,
seeding, repo-relative paths. The section models are in ``stages.config.params``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, ValidationError

from recast.atomic import temp_path, write_atomic  # noqa: F401 - temp_path: stages' writers import it from here

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
PARAMS_ENV = "RECAST_PARAMS"  # the params file of this process (``--params`` sets it)
# DVC sets these in every stage it runs; in an experiment run in a temporary copy of the workspace
# (``dvc exp run --queue`` / ``--temp``) DVC_ROOT is the workspace it was queued from.
DVC_ROOT_ENV = "DVC_ROOT"
EXPERIMENT_ENVS = {"dvc.exp_name": "DVC_EXP_NAME", "dvc.exp_baseline_rev": "DVC_EXP_BASELINE_REV"}

M = TypeVar("M", bound="Section")


class Section(BaseModel):
    """Base class of a params.yaml section: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


class ParamsError(ValueError):
    """A params.yaml value is invalid; the message names the key."""


class IntegrityError(ValueError):
    """A file read back does not match the digest recorded for it (corrupt or edited); the
    message names the file and both digests."""


class StageKilled(KeyboardInterrupt):
    """Raised in a stage's driver by SIGTERM, as KeyboardInterrupt is by SIGINT (Ray cancels a
    ``ray.get`` on either), so that its ``finally`` blocks run: MLflow runs end KILLED."""



class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (as logging's own
    last-resort handler does), so redirected or captured stderr receives it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # noqa: D401 - logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property wins
        pass


def stage_logger(name: str) -> logging.Logger:
    """The logger of a ``stages`` module (``stages.<...>``) for diagnostics (job-cache hits, lock
    waits, tracking retries): under the ``stages`` logger, which writes each message as is to the
    current stderr at INFO and above, not through the root logger (set its level or handlers to
    change that: ``logging.getLogger("stages")``)."""
    root = logging.getLogger("stages")
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        root.addHandler(_CurrentStderr())
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name)


def check_digest(path: str | os.PathLike, actual: str, expected: str | None, what: str = "sha256") -> None:
    """Raise IntegrityError unless ``actual`` equals the recorded ``expected`` digest."""
    if not expected:
        raise IntegrityError(f"{path}: no recorded {what} to verify it against")
    if actual != expected:
        raise IntegrityError(f"{path}: content {what} {actual[:16]} does not match the recorded {expected[:16]} "
                             f"(corrupt or edited file); {repair_advice(path)}")


def repair_advice(path: str | os.PathLike) -> str:
    """How to repair a damaged stage output: DVC's cache keeps the bytes the stage wrote, and never
    shares them with the workspace file (``.dvc/config``: cache type reflink or copy)."""
    try:
        rel = Path(path).resolve().relative_to(REPO_ROOT)
    except ValueError:  # not under this repo: not a DVC output
        return "rebuild it with the stage that wrote it"
    return (f"restore the bytes the stage wrote from DVC's cache: `dvc checkout --force {rel}` "
            "(or rebuild it: `dvc repro -f -s <stage that wrote it>`)")


def read_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read params.yaml (or ``path``) into a dict."""
    path = Path(path or os.environ.get(PARAMS_ENV, DEFAULT_PARAMS))
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def section_errors(name: str, model: type[M], data: dict[str, Any]) -> tuple[M | None, list[str]]:
    """Validate ``data[name]`` against ``model``: the section, or None and one line per invalid
    key, each naming the full key (``section.key``)."""
    if name not in data:
        return None, [f"params: missing section '{name}'"]
    try:
        return model.model_validate(data[name] or {}), []
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join([name, *(str(p) for p in e["loc"])])
            msg = e["msg"].removeprefix("Value error, ")
            if re.match(r"[A-Za-z_][\w.\[\]]*: ", msg):  # a model check naming its own sub-key
                lines.append(f"{key}.{msg}")
            elif isinstance(e.get("input"), dict):
                lines.append(f"{key}: {msg}")
            else:
                lines.append(f"{key}: {msg} (got {e.get('input')!r})")
        return None, lines


def params_error(lines: list[str]) -> ParamsError:
    """One ParamsError listing every invalid key."""
    return ParamsError("invalid params:\n  " + "\n  ".join(lines))


def validate_section(name: str, model: type[M], data: dict[str, Any]) -> M:
    """Validate ``data[name]`` against ``model``; errors name the full key (``section.key``)."""
    section, lines = section_errors(name, model, data)
    if section is None:
        raise params_error(lines) if name in data else ParamsError(lines[0])
    return section


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; deterministic CPU kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def record_nondeterminism() -> Iterator[list[str]]:
    """Collect torch's warnings about ops without a deterministic implementation (raised under
    ``use_deterministic_algorithms(True, warn_only=True)``); yields the list of messages."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield found
        finally:
            found.extend(sorted({str(w.message).split("\n")[0] for w in caught
                                 if "deterministic" in str(w.message).lower()}))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock (filelock: an advisory OS lock) on ``path`` (created if missing),
    across processes and threads; re-entrant in one thread; released on exit, and by the OS when
    the process dies. ``waiting`` is printed to stderr when another holds it (this one then
    blocks until it is free)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            holder = path.read_text(errors="replace").strip() if path.exists() else ""
            stage_logger(__name__).warning("%s (lock %s held by %s); waiting", waiting, path, holder or "?")
        lock.acquire()
    try:
        path.write_text(f"pid {os.getpid()} on {os.uname().nodename}\n")  # who holds it, for the next waiter
        yield
    finally:
        lock.release()


def metrics_path(stage: str, out_dir: str, default_out_dir: str) -> Path:
    """Where a stage writes its metrics: ``metrics/<stage>.json`` for the configured ``out_dir``
    (the one dvc.yaml tracks); ``<out_dir>/metrics.json`` for a side run writing elsewhere, so
    it never overwrites the main run's metrics."""
    if resolve(out_dir) == resolve(default_out_dir):
        return resolve(f"metrics/{stage}.json")
    return resolve(out_dir) / "metrics.json"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` through a temp file + rename so a crash never leaves half a file."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class WorkspaceUnavailable(RuntimeError):
    """An experiment's workspace (DVC_ROOT) is not a DVC workspace: its store and job cache cannot be found."""


def workspace_root() -> Path:
    """The DVC workspace whose MLflow store and job cache this process shares: the repo itself,
    or, for an experiment that DVC runs in a temporary copy (``dvc exp run --queue`` / ``--temp``;
    the copy is deleted afterwards), the workspace DVC_ROOT names.

    Raises:
        WorkspaceUnavailable: DVC_ROOT names no DVC workspace (never a silent store of the copy's own).
    """
    root = os.environ.get(DVC_ROOT_ENV)
    if not root or Path(root).resolve() == REPO_ROOT:
        return REPO_ROOT
    root = Path(root).resolve()
    if not (root / ".dvc").is_dir():
        raise WorkspaceUnavailable(f"{DVC_ROOT_ENV}={root}: not a DVC workspace (no .dvc/); an experiment logs to and "
                                   "caches its jobs in the workspace it was queued from")
    return root


def experiment_tags() -> dict[str, str]:
    """``dvc.exp_name`` / ``dvc.exp_baseline_rev`` of the DVC experiment this process runs in (none outside one)."""
    return {tag: os.environ[env] for tag, env in EXPERIMENT_ENVS.items() if os.environ.get(env)}


def resolve_shared(path: str | os.PathLike) -> Path:
    """Resolve a path of what every run of the workspace shares (the job cache) against
    ``workspace_root()``: an experiment in a temporary copy uses the workspace's."""
    p = Path(path)
    return p if p.is_absolute() else (workspace_root() / p)


def resolve(path: str | os.PathLike) -> Path:
    """Resolve a params path relative to the repo root (absolute paths pass through)."""
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p)
