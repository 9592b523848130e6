"""MLflow logging for the stages: one parent run per stage, a child run per job, and the
coefficient registry (MLflow model registry: one registered model per arch/task, one version
per payload, aliases ``current`` and ``best``).

Only the driver writes to MLflow. Writes are retried with backoff for at most
``RECAST_MLFLOW_RETRY_S`` seconds in total (default 60; each retry is reported on stderr), and
for the default sqlite store serialised across processes with a file lock. A tracking server is
checked once when a Tracker opens (``check_server``, 5 s timeout). If the store becomes
unreachable mid-stage, the Tracker goes offline: the stage keeps computing and caching, the runs
it could not log are listed, and the stage ends with ``TrackingUnavailable``; its next run
finds every job in the cache and logs what is missing (child runs are found again by their
``spec_key`` tag, payload versions by their run id, so nothing is logged or registered twice).

A Tracker is a context manager: its parent run ends FINISHED, FAILED (an exception) or KILLED
(SIGINT, SIGTERM); a parent left RUNNING by a driver that died (SIGKILL) is ended KILLED by the
next run of the same stage on that host.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from stages.config.common import REPO_ROOT, StageKilled, write_json_atomic

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# MLflow's HTTP client retries 7 times with backoff and a 120 s timeout by default; our own
# bounded ``retry`` is the only retry loop (these defaults give way to the caller's env).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

T = TypeVar("T")
DEFAULT_DB = REPO_ROOT / "mlflow.db"
DEFAULT_ARTIFACTS = REPO_ROOT / "mlartifacts"
RETRY_ENV = "RECAST_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 60.0
HEALTH_TIMEOUT_S = 5.0
TRANSIENT = ("locked", "busy", "timed out", "timeout", "503", "502", "504", "connection", "max retries exceeded",
             "duplicate column")


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store could not be reached (at stage start, or within the retry budget)."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded sqlite store under the repo."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


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


def _short(err: BaseException) -> str:
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
                    f"({_short(err)}); set {RETRY_ENV} to retry longer") from None
            print(f"[mlflow] {what} failed ({_short(err)}); retry {attempt} in {wait:.1f} s, "
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
        problem = _short(err)
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


class Tracker:
    """The stage's MLflow parent run and its child runs (a context manager: see the module doc)."""

    def __init__(self, stage: str, experiment: str, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None):
        """Open a new parent run, or reattach to ``run_id`` (a resumed sweep); ``tags`` go on it."""
        self.uri = tracking_uri()  # every call names it: no process-wide mlflow.set_tracking_uri
        self.stage = stage
        self.offline: str | None = None  # why the store became unreachable mid-stage
        self.missing: list[str] = []  # what could not be logged while offline
        self._finished = False
        self._previous_handler: Any = None
        check_server(self.uri)
        self.client = make_client(self.uri)
        self.experiment_id = retry(lambda: self._experiment(experiment), uri=self.uri)
        driver = {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid())}
        if run_id is None:
            retry(self._end_stale_runs, uri=self.uri, what="ending stale runs")
            run = retry(lambda: self.client.create_run(self.experiment_id, run_name=stage,
                                                       tags={"stage": stage, "kind": "stage", **driver, **(tags or {})}),
                        uri=self.uri)
            self.parent_id = run.info.run_id
            if params:
                self.log_params(self.parent_id, params)
        else:
            self.parent_id = run_id
            retry(lambda: self.client.update_run(run_id, status="RUNNING"), uri=self.uri)
        self._monitor = None
        try:  # CPU/RAM/GPU of the driver's machine, sampled into the parent run (needs psutil)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.parent_id, sampling_interval=5, tracking_uri=self.uri)
            self._monitor.start()
        except Exception:  # noqa: BLE001 - system metrics are optional
            self._monitor = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Tracker:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_killed)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        if exc_type is None:
            self.finish()
            if self.offline:
                raise TrackingUnavailable(
                    f"{self.stage}: every job finished and is cached, but MLflow became unreachable ({self.offline}); "
                    f"not logged: {len(self.missing)} item(s) ({', '.join(self.missing[:5])}"
                    f"{', ...' if len(self.missing) > 5 else ''}). Run the stage again when the server is back: it "
                    "takes the jobs from the cache and logs what is missing")
            return
        status = "KILLED" if issubclass(exc_type, (KeyboardInterrupt, StageKilled)) else "FAILED"
        try:
            self.finish(status=status)
        except Exception as err:  # noqa: BLE001 - the stage's own error is the one to raise
            print(f"[mlflow] could not end run {self.parent_id} as {status}: {_short(err)}", file=sys.stderr)

    def _end_stale_runs(self) -> None:
        """End as KILLED this stage's parent runs (and their unfinished children) left RUNNING by a
        driver on this host that no longer exists (killed with SIGKILL)."""
        host = socket.gethostname()
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.stage = '{self.stage}' "
                                                f"and tags.kind = 'stage' and tags.driver_host = '{host}'",
            max_results=1000)
        for run in runs:
            pid = run.data.tags.get("driver_pid", "")
            if not pid.isdigit() or _alive(int(pid)):
                continue
            children = self.client.search_runs(
                [self.experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                    f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", max_results=1000)
            for r in [*children, run]:
                print(f"[mlflow] run {r.info.run_id} ({r.info.run_name}) of a dead driver (pid {pid}): ended KILLED",
                      file=sys.stderr)
                self.client.set_terminated(r.info.run_id, "KILLED")

    def guard(self, fn: Callable[[], T], what: str) -> T | None:
        """``fn()`` (which retries through ``retry``); once the store is unreachable (it raised
        TrackingUnavailable), note ``what`` as missing and return None without calling ``fn``."""
        if self.offline is None:
            try:
                return fn()
            except TrackingUnavailable as err:
                self.offline = str(err)
                print(f"[mlflow] {err}\n[mlflow] the stage keeps computing and caching; what is not logged now is "
                      "logged by its next run", file=sys.stderr, flush=True)
        self.missing.append(what)
        return None

    # ------------------------------------------------------------------ runs
    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = DEFAULT_ARTIFACTS.as_uri() if self.uri == f"sqlite:///{DEFAULT_DB}" else \
                (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat = _flatten(params)
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            retry(lambda chunk=items[i:i + 100]: self.client.log_batch(run_id, params=chunk), uri=self.uri,
                  what="log params")

    def log_artifacts(self, run_id: str, paths: list[Path]) -> None:
        for path in paths:
            what = f"artifact {Path(path).name}"
            self.guard(lambda p=path, w=what: retry(lambda: self.client.log_artifact(run_id, str(p)), self.uri, w), what)

    def find_child(self, key: str) -> str | None:
        """The FINISHED child run tagged ``spec_key = key`` in this experiment (a job logged by an
        earlier run of the stage); unfinished ones (a driver killed while logging) are deleted."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.spec_key = '{key}'",
                                       max_results=100, order_by=["attributes.start_time ASC"])
        done = [r.info.run_id for r in runs if r.info.status == "FINISHED"]
        for r in runs:
            if r.info.status != "FINISHED":
                self.client.delete_run(r.info.run_id)
        return done[0] if done else None

    def child(self, name: str, params: dict[str, Any], metrics: dict[str, float],
              artifacts: list[Path] = (), tags: dict[str, str] | None = None, key: str | None = None,
              logged_at: Path | None = None) -> str | None:
        """One finished job as a child run (params, metrics, artifacts); returns its run id.

        With ``key`` (the job's cache key) a job that already has a finished child run is not
        logged again: that run's id is returned. Numeric metrics are logged as metrics; the job's
        ``host`` and ``ray_node`` become tags. ``logged_at`` (a JSON record beside the job's cache
        entry) makes the artifacts be logged once per tracking store: the first run logs them and
        records its run id there; a later run of the same job logs none and tags
        ``artifacts_run_id`` and ``artifacts_uri`` with the first run's instead. Returns None when
        the store is unreachable (the Tracker is offline; see ``guard``)."""
        def log() -> str:
            if key is not None and (found := self.find_child(key)) is not None:
                return found
            where = {k: str(metrics[k]) for k in ("host", "ray_node") if metrics.get(k)}
            keyed = {"spec_key": key} if key is not None else {}
            first = self._artifacts_run(logged_at) if artifacts else None
            refs = {"artifacts_run_id": first[0], "artifacts_uri": first[1]} if first else {}
            run = self.client.create_run(
                self.experiment_id, run_name=name,
                tags={"mlflow.parentRunId": self.parent_id, "job": name, **where, **keyed, **refs, **(tags or {})})
            rid = run.info.run_id
            flat = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in _flatten(params).items()]
            ts = int(time.time() * 1000)
            ms = [mlflow.entities.Metric(k, float(v), ts, 0) for k, v in metrics.items() if _is_number(v)]
            for i in range(0, max(len(flat), len(ms)), 100):
                self.client.log_batch(rid, params=flat[i:i + 100], metrics=ms[i:i + 100])
            if artifacts and first is None:
                for path in artifacts:
                    self.client.log_artifact(rid, str(path), artifact_path="payload")
                    _link_local_artifact(f"{run.info.artifact_uri}/payload/{Path(path).name}", Path(path))
                if logged_at is not None:
                    write_json_atomic(logged_at, {"tracking_uri": self.uri, "run_id": rid,
                                                  "artifacts_uri": f"{run.info.artifact_uri}/payload"})
            self.client.set_terminated(rid, "FINISHED")  # last: an unfinished child is logged again
            return rid

        what = f"child run {name}"
        return self.guard(lambda: retry(log, self.uri, what), what)

    def _artifacts_run(self, logged_at: Path | None) -> tuple[str, str] | None:
        """(run id, artifacts uri) of the run that logged a job's artifacts in this store, if any."""
        if logged_at is None or not logged_at.exists():
            return None
        record = json.loads(logged_at.read_text())
        if record.get("tracking_uri") != self.uri:
            return None
        try:
            retry(lambda: self.client.get_run(record["run_id"]), uri=self.uri)
        except Exception:  # noqa: BLE001 - the run was deleted (or the store replaced): log anew
            return None
        return record["run_id"], record["artifacts_uri"]

    def finish(self, metrics: dict[str, float] | None = None, status: str = "FINISHED") -> None:
        """End the parent run (once; later calls do nothing)."""
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()
        if self.offline:
            return  # the next run of the stage ends this one (see _end_stale_runs)
        if metrics:
            ts = int(time.time() * 1000)
            ms = [mlflow.entities.Metric(k, float(v), ts, 0) for k, v in metrics.items() if _is_number(v)]
            self.guard(lambda: retry(lambda: self.client.log_batch(self.parent_id, metrics=ms), self.uri,
                                     "stage metrics"), "stage metrics")
        what = f"end of parent run ({status})"
        self.guard(lambda: retry(lambda: self.client.set_terminated(self.parent_id, status), self.uri, what), what)


def _raise_killed(signum: int, frame: Any) -> None:
    raise StageKilled(f"stopped by {signal.Signals(signum).name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_local_artifact(artifact_uri: str, source: Path) -> None:
    """Replace MLflow's copy of a logged file by a hard link to ``source`` when the artifact
    store is a local folder on the same file system (MLflow never rewrites an artifact in place),
    so a payload takes its bytes once; any other store keeps its copy."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file"):
        return
    logged = Path(url2pathname(parsed.path))
    if not logged.is_file() or logged.stat().st_size != source.stat().st_size:
        return
    tmp = logged.with_name(f".{logged.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, logged)
    except OSError:  # another file system, or no hard links: MLflow's copy stays
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- registry
def registry_name(arch: str, task: str, method: str) -> str:
    """Registered-model name of one task's payload: ``recast.<arch>.<method>.<task>``."""
    return f"recast.{arch}.{method}.{task}"


def register_payload(run_id: str, arch: str, task: str, method: str, tags: dict[str, str],
                     accuracy: float | None = None) -> str:
    """Register the payload logged under ``run_id`` as a new version; alias it ``current``
    (and ``best`` when it beats the current best test accuracy). Returns the version.

    Idempotent: a payload whose run already has a version is not registered again (its aliases
    are set again when it is the latest version), so a resumed stage can register every job."""
    uri = tracking_uri()
    client = make_client(uri)
    name = registry_name(arch, task, method)

    def create() -> str:
        try:
            client.create_registered_model(name, tags={"arch": arch, "task": task, "method": method})
        except Exception as err:  # noqa: BLE001
            if "already exists" not in str(err).lower() and "resource_already_exists" not in str(err).lower():
                raise
        versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
        mine = [v for v in versions if v.run_id == run_id]
        if mine:
            mv = mine[0]
            if int(mv.version) != max(int(v.version) for v in versions):
                return str(mv.version)  # a later payload is current now
        else:
            run = client.get_run(run_id)
            mv = client.create_model_version(name, f"{run.info.artifact_uri}/payload", run_id=run_id, tags=tags)
        client.set_registered_model_alias(name, "current", mv.version)
        best = None
        try:
            best = client.get_model_version_by_alias(name, "best")
        except Exception:  # noqa: BLE001 - no best yet
            best = None
        prev = float(best.tags.get("test_acc", "-1")) if best is not None else -1.0
        if accuracy is not None and accuracy >= prev:
            client.set_registered_model_alias(name, "best", mv.version)
        return str(mv.version)

    return retry(create, uri=uri, what=f"registration of {name}")


def list_registered(prefix: str = "recast.") -> list[dict[str, Any]]:
    """Registered payloads: name, arch, task, method, latest version, aliases."""
    client = make_client()
    out = []
    for rm in client.search_registered_models(max_results=1000):
        if not rm.name.startswith(prefix):
            continue
        out.append({"name": rm.name, **rm.tags, "aliases": dict(getattr(rm, "aliases", {}) or {})})
    return sorted(out, key=lambda d: d["name"])


def download_payload(arch: str, task: str, method: str = "recast", alias: str = "current") -> Path:
    """Download a registered payload's files from the current store (MLFLOW_TRACKING_URI or
    the embedded one); returns the local directory."""
    uri = tracking_uri()
    client = make_client(uri)
    mv = client.get_model_version_by_alias(registry_name(arch, task, method), alias)
    dst = Path(tempfile.mkdtemp(prefix="recast-payload-"))
    return Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="payload", dst_path=str(dst),
                                                    tracking_uri=uri, registry_uri=uri))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
