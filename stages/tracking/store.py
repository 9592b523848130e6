"""The MLflow tracking store: its URI, the file lock that serialises writes to the default
sqlite store across processes and threads, and the bounded retry every write goes through.

Writes are retried with backoff for at most ``RECAST_MLFLOW_RETRY_S`` seconds in total (default
60; each retry is reported on stderr), and for the default sqlite store serialised across
processes with a file lock. A tracking server is checked once when a Tracker opens
(``check_server``, 5 s timeout). Importing this module sets MLflow's environment defaults, so
every module that imports ``mlflow`` for tracking imports this one first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from stages.config.common import WorkspaceUnavailable, workspace_root

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# MLflow's HTTP client retries 7 times with backoff and a 120 s timeout by default; our own
# bounded ``retry`` is the only retry loop (these defaults give way to the caller's env).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


from mlflow.tracking import MlflowClient  # noqa: E402

T = TypeVar("T")
DEFAULT_DB = "mlflow.db"  # in the workspace (``stages.config.common.workspace_root``)
RETRY_ENV = "RECAST_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 60.0
HEALTH_TIMEOUT_S = 5.0
TRANSIENT = ("locked", "busy", "timed out", "timeout", "503", "502", "504", "connection", "max retries exceeded",
             "duplicate column")


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store could not be reached (at stage start, or within the retry budget)."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the workspace's sqlite store ``mlflow.db``: also for an experiment
    that DVC runs in a temporary copy, whose own store would be deleted with it.

    Raises:
        TrackingUnavailable: the experiment's workspace cannot be found.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    try:
        return f"sqlite:///{workspace_root() / DEFAULT_DB}"
    except WorkspaceUnavailable as err:
        raise TrackingUnavailable(f"no MLflow store: {err}") from None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of the store ``uri`` keeps its artifacts: for a sqlite store the
    ``mlartifacts/`` folder beside the database (the default store's: the workspace's ``mlartifacts/``); None
    (the server's own default) otherwise. MLflow's default for sqlite, ``./mlruns``, would put
    them under whatever the working directory is."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def _lock_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).with_suffix(".lock")
    return None


_HELD = threading.local()  # the store locks this thread holds: a nested ``retry`` must not wait on itself


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An advisory lock on the sqlite store, across processes and threads; re-entrant per thread
    (two ``flock`` calls on separate descriptors of one file block each other, even in one thread)."""
    path = _lock_path(uri)
    held = getattr(_HELD, "paths", None)
    if held is None:
        held = _HELD.paths = set()
    if path is None or path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            fcntl.flock(fh, fcntl.LOCK_UN)


def retry_budget_s() -> float:
    """Total seconds a tracking call is retried: ``RECAST_MLFLOW_RETRY_S`` (default 60)."""
    raw = os.environ.get(RETRY_ENV, str(DEFAULT_RETRY_S))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{RETRY_ENV}={raw!r}: expected a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"{RETRY_ENV}={raw!r}: expected a finite number of seconds >= 0")
    return value


def short_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def retry(fn: Callable[[], T], uri: str | None = None, what: str = "MLflow call") -> T:
    """Call ``fn`` under the store lock, retrying transient errors (locked db, 5xx, connection)
    with backoff for at most ``retry_budget_s()`` seconds; each retry is reported on stderr.

    Raises:
        TrackingUnavailable: still failing when the budget is spent.
    """
    uri = uri or tracking_uri()
    budget = retry_budget_s()
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            with _store_lock(uri):
                return fn()
        except Exception as err:  # noqa: BLE001 - re-raised unless transient
            if not any(t in str(err).lower() for t in TRANSIENT):
                raise
            attempt += 1
            wait = min(5.0, 0.2 * 2**attempt) * (0.5 + random.random())
            left = deadline - time.monotonic()
            if left < wait:
                raise TrackingUnavailable(
                    f"MLflow at {_display(uri)}: {what} failed {attempt} time(s) within {budget:.0f} s "
                    f"({short_error(err)}); set {RETRY_ENV} to retry longer") from None
            print(f"[mlflow] {what} failed ({short_error(err)}); retry {attempt} in {wait:.1f} s, "
                  f"{left:.0f} s of {RETRY_ENV}={budget:.0f} left", file=sys.stderr, flush=True)
            time.sleep(wait)


def _display(uri: str) -> str:
    """The URI without credentials."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri


def check_server(uri: str | None = None, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """For an http(s) tracking URI, GET ``<uri>/health`` once; TrackingUnavailable if it does not answer."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = short_error(err)
    raise TrackingUnavailable(f"MLflow tracking server {_display(uri)} (MLFLOW_TRACKING_URI) does not answer within "
                              f"{timeout:.0f} s ({problem}); start it, or unset MLFLOW_TRACKING_URI to use the local "
                              "sqlite store")


def make_client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient whose store is opened under the lock: a fresh sqlite store runs its schema
    migrations on first open, which must not happen in two processes at once."""
    uri = uri or tracking_uri()

    def open_client() -> MlflowClient:
        client = MlflowClient(uri, registry_uri=uri)  # the registry lives in the same store
        client.search_experiments(max_results=1)  # opens the store (and runs its migrations) now
        return client

    return retry(open_client, uri=uri)
