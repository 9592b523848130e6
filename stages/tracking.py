"""MLflow logging for the stages: one parent run per stage, a child run per job, and the
coefficient registry (MLflow model registry: one registered model per arch/task, one version
per payload, aliases ``current`` and ``best``).

Only the driver writes to MLflow. Writes are retried with backoff, and for the default sqlite
store serialised across processes with a file lock, so concurrent stages or drivers never fail
or lose a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from stages.common import REPO_ROOT, write_json_atomic

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

T = TypeVar("T")
DEFAULT_DB = REPO_ROOT / "mlflow.db"
DEFAULT_ARTIFACTS = REPO_ROOT / "mlartifacts"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded sqlite store under the repo."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


def _lock_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).with_suffix(".lock")
    return None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    path = _lock_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def retry(fn: Callable[[], T], attempts: int = 8, uri: str | None = None) -> T:
    """Call ``fn`` under the store lock, retrying transient errors (locked db, 5xx) with backoff."""
    uri = uri or tracking_uri()
    for i in range(attempts):
        try:
            with _store_lock(uri):
                return fn()
        except Exception as err:  # noqa: BLE001 - re-raised after the last attempt
            msg = str(err).lower()
            transient = any(s in msg for s in ("locked", "busy", "timed out", "503", "502", "connection", "duplicate column"))
            if not transient or i == attempts - 1:
                raise
            time.sleep(min(5.0, 0.2 * 2**i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


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
    """The stage's MLflow parent run and its child runs."""

    def __init__(self, stage: str, experiment: str, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None):
        """Open a new parent run, or reattach to ``run_id`` (a resumed sweep); ``tags`` go on it."""
        self.uri = tracking_uri()  # every call names it: no process-wide mlflow.set_tracking_uri
        self.client = make_client(self.uri)
        self.experiment_id = retry(lambda: self._experiment(experiment), uri=self.uri)
        if run_id is None:
            run = retry(lambda: self.client.create_run(self.experiment_id, run_name=stage,
                                                       tags={"stage": stage, "kind": "stage", **(tags or {})}),
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
            retry(lambda chunk=items[i:i + 100]: self.client.log_batch(run_id, params=chunk), uri=self.uri)

    def child(self, name: str, params: dict[str, Any], metrics: dict[str, float],
              artifacts: list[Path] = (), tags: dict[str, str] | None = None,
              logged_at: Path | None = None) -> str:
        """One finished job as a child run (params, metrics, artifacts); returns its run id.

        Numeric metrics are logged as metrics; the job's ``host`` and ``ray_node`` become tags.
        ``logged_at`` (a JSON record, e.g. beside the job's cache entry) makes the artifacts be
        logged once per tracking store: the first run logs them and records its run id there; a
        later run of the same job (a cached result) logs none and tags ``artifacts_run_id`` and
        ``artifacts_uri`` with the first run's instead."""
        where = {k: str(metrics[k]) for k in ("host", "ray_node") if metrics.get(k)}
        first = self._artifacts_run(logged_at) if artifacts else None
        refs = {"artifacts_run_id": first[0], "artifacts_uri": first[1]} if first else {}
        run = retry(lambda: self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": self.parent_id, "job": name, **where, **refs, **(tags or {})}), uri=self.uri)
        rid = run.info.run_id
        self.log_params(rid, params)
        ts = int(time.time() * 1000)
        ms = [mlflow.entities.Metric(k, float(v), ts, 0) for k, v in metrics.items() if _is_number(v)]
        if ms:
            retry(lambda: self.client.log_batch(rid, metrics=ms), uri=self.uri)
        if artifacts and first is None:
            for path in artifacts:
                retry(lambda p=path: self.client.log_artifact(rid, str(p), artifact_path="payload"), uri=self.uri)
                _link_local_artifact(f"{run.info.artifact_uri}/payload/{Path(path).name}", Path(path))
            if logged_at is not None:
                write_json_atomic(logged_at, {"tracking_uri": self.uri, "run_id": rid,
                                              "artifacts_uri": f"{run.info.artifact_uri}/payload"})
        retry(lambda: self.client.set_terminated(rid, "FINISHED"), uri=self.uri)
        return rid

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
        if self._monitor is not None:
            self._monitor.finish()
        if metrics:
            ts = int(time.time() * 1000)
            ms = [mlflow.entities.Metric(k, float(v), ts, 0) for k, v in metrics.items() if _is_number(v)]
            retry(lambda: self.client.log_batch(self.parent_id, metrics=ms), uri=self.uri)
        retry(lambda: self.client.set_terminated(self.parent_id, status), uri=self.uri)


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
    (and ``best`` when it beats the current best test accuracy). Returns the version."""
    uri = tracking_uri()
    client = make_client(uri)
    name = registry_name(arch, task, method)

    def create() -> str:
        try:
            client.create_registered_model(name, tags={"arch": arch, "task": task, "method": method})
        except Exception as err:  # noqa: BLE001
            if "already exists" not in str(err).lower() and "resource_already_exists" not in str(err).lower():
                raise
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

    return retry(create, uri=uri)


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
