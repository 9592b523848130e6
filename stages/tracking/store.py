"""The MLflow tracking store: its URI, the file lock that serialises writes to the default
sqlite store across processes and threads, and the bounded retry every write goes through.

Writes are retried (tenacity) with backoff for at most ``RECAST_MLFLOW_RETRY_S`` seconds in total
(default 60; each retry is reported on stderr) when they fail with a transient error, told by
its type (``is_transient``), and for the default sqlite store serialised across processes with
a file lock (filelock). A tracking server is checked once when a Tracker opens
(``check_server``, 5 s timeout). Importing this module sets MLflow's environment defaults, so
every module that imports ``mlflow`` for tracking imports this one first.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import requests
import sqlalchemy.exc
import tenacity
from filelock import FileLock

from stages.config.common import WorkspaceUnavailable, stage_logger, workspace_root

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# MLflow's HTTP client retries 7 times with backoff and a 120 s timeout by default; our own
# bounded ``retry`` is the only retry loop (these defaults give way to the caller's env).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


# isort: split
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import (  # noqa: E402
    DEADLINE_EXCEEDED,
    REQUEST_LIMIT_EXCEEDED,
    RESOURCE_EXHAUSTED,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)
from mlflow.tracking import MlflowClient  # noqa: E402

T = TypeVar("T")
DEFAULT_DB = "mlflow.db"  # in the workspace (``stages.config.common.workspace_root``)
RETRY_ENV = "RECAST_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 60.0
HEALTH_TIMEOUT_S = 5.0
# Transient failures, by type: the store did not answer (connection refused or reset, timeout), the
# database was busy (sqlite "database is locked", a schema migration racing another process: the
# DB-API's OperationalError, also as SQLAlchemy wraps it), or the server said "try again" (HTTP 503,
# 504, 429: these MLflow error codes). Anything else (a bad request, a missing run, a bug) is raised
# at once. A proxy's 502 without an MLflow error body reaches us as INTERNAL_ERROR: not retried.
TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError, TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
    sqlite3.OperationalError, sqlalchemy.exc.OperationalError)
TRANSIENT_MLFLOW_CODES = frozenset(ErrorCode.Name(c) for c in (TEMPORARILY_UNAVAILABLE, DEADLINE_EXCEEDED,
                                                               REQUEST_LIMIT_EXCEEDED, RESOURCE_EXHAUSTED))


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
    """An exclusive lock on the sqlite store, across processes and threads; re-entrant per thread
    (filelock: one lock object per path, thread-local counts)."""
    path = _lock_path(uri)
    held = getattr(_HELD, "paths", None)
    if held is None:
        held = _HELD.paths = set()
    if path is None or path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, is_singleton=True):
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)


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


def is_transient(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from or while handling, is of a transient
    type (``TRANSIENT_TYPES``, or an MlflowException with a ``TRANSIENT_MLFLOW_CODES`` code).
    MLflow's REST client re-raises a connection error as a plain MlflowException whose context
    is the original."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TRANSIENT_TYPES):
            return True
        if isinstance(e, MlflowException) and e.error_code in TRANSIENT_MLFLOW_CODES:
            return True
        stack += [e.__cause__, e.__context__]
    return False


def _backoff(state: tenacity.RetryCallState) -> float:
    """0.4 s, doubling per attempt up to 5 s, times a jitter factor in [0.5, 1.5)."""
    return min(5.0, 0.2 * 2**state.attempt_number) * (0.5 + random.random())


def retry(fn: Callable[[], T], uri: str | None = None, what: str = "MLflow call") -> T:
    """Call ``fn`` under the store lock, retrying transient errors (``is_transient``: connection,
    timeout, locked db, 503/504/429) with backoff for at most ``retry_budget_s()`` seconds; each
    retry is reported on stderr. Any other error is raised at once.

    Raises:
        TrackingUnavailable: still failing when the budget is spent.
    """
    uri = uri or tracking_uri()
    budget = retry_budget_s()

    def attempt() -> T:
        with _store_lock(uri):
            return fn()

    def report(state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception()
        left = budget - state.seconds_since_start
        stage_logger(__name__).warning(f"[mlflow] {what} failed ({short_error(err)}); retry {state.attempt_number} in "
                                       f"{state.upcoming_sleep:.1f} s, {left:.0f} s of {RETRY_ENV}={budget:.0f} left")

    def give_up(state: tenacity.RetryCallState) -> T:
        err = state.outcome.exception()
        raise TrackingUnavailable(
            f"MLflow at {_display(uri)}: {what} failed {state.attempt_number} time(s) within {budget:.0f} s "
            f"({short_error(err)}); set {RETRY_ENV} to retry longer") from None

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient), wait=_backoff,
        stop=tenacity.stop_before_delay(budget),  # no retry whose wait would end past the budget
        before_sleep=report, retry_error_callback=give_up)
    return retrying(attempt)


def _display(uri: str) -> str:
    """The URI without credentials."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri


# MLflow 3.17's UI shows an experiment as its sidebar switch says (GenAI or model training, kept in
# the browser's local storage, GenAI at first), not by the experiment's ``mlflow.experimentKind``
# tag; this URL parameter opens it on its training runs in any browser (README "Browsing the runs table")
UI_WORKFLOW = "workflowType=machine_learning"
UI_DEFAULT = "http://127.0.0.1:5000"  # `make ui`, `mlflow ui`


def ui_link(experiment_id: str, run_id: str | None = None, uri: str | None = None) -> str:
    """The MLflow UI's address of an experiment's training runs (or of one run), on the tracking
    server of ``uri`` (default ``tracking_uri()``) or, for a local store, on ``make ui``'s."""
    uri = uri or tracking_uri()
    base = _display(uri).rstrip("/") if uri.startswith(("http://", "https://")) else UI_DEFAULT
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?{UI_WORKFLOW}"


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
