"""MLflow runs of the stages: one parent run per stage, a child run per job (``Tracker``).

Only the driver writes to MLflow, through ``stages.tracking.store.retry``. If the store becomes
unreachable mid-stage, the Tracker goes offline: the stage keeps computing and caching, the runs
it could not log are listed, and the stage ends with ``TrackingUnavailable``; its next run
finds every job in the cache and logs what is missing (child runs are found again by their
``spec_key`` tag, payload versions by their run id: ``stages.tracking.payloads``, so nothing is
logged or registered twice).

A Tracker is a context manager: its parent run ends FINISHED, FAILED (an exception) or KILLED
(SIGINT, SIGTERM); a parent left RUNNING by a driver that died (SIGKILL) is ended KILLED by the
next run of the same stage on that host.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from recast.machine import machine_tags
from stages.config.common import StageKilled, experiment_tags, stage_logger, write_json_atomic
from stages.tracking.store import (
    TrackingUnavailable,
    artifact_location,
    check_server,
    make_client,
    retry,
    short_error,
    tracking_uri,
    ui_link,
)

# isort: split
import mlflow  # noqa: E402 - after stages.tracking.store, which sets MLflow's environment defaults

T = TypeVar("T")
# MLflow 3's UI opens an experiment by its kind: training runs, not its GenAI traces overview
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


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
        driver = {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid()), **machine_tags(),
                  **experiment_tags()}
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
            if not self.offline:
                stage_logger(__name__).info(f"[mlflow] {self.stage}: {ui_link(self.experiment_id, self.parent_id, self.uri)}")
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
            stage_logger(__name__).warning(f"[mlflow] could not end run {self.parent_id} as {status}: {short_error(err)}")

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
                stage_logger(__name__).warning(f"[mlflow] run {r.info.run_id} ({r.info.run_name}) of a dead driver "
                                               f"(pid {pid}): ended KILLED")
                self.client.set_terminated(r.info.run_id, "KILLED")

    def guard(self, fn: Callable[[], T], what: str) -> T | None:
        """``fn()`` (which retries through ``retry``); once the store is unreachable (it raised
        TrackingUnavailable), note ``what`` as missing and return None without calling ``fn``."""
        if self.offline is None:
            try:
                return fn()
            except TrackingUnavailable as err:
                self.offline = str(err)
                stage_logger(__name__).warning(f"[mlflow] {err}\n[mlflow] the stage keeps computing and caching; what "
                                               "is not logged now is logged by its next run")
        self.missing.append(what)
        return None

    # ------------------------------------------------------------------ runs
    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # a store from before the tag
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(self.uri),
                                                 tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
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
                tags={"mlflow.parentRunId": self.parent_id, "job": name, **where, **keyed, **refs,
                      **experiment_tags(), **(tags or {})})
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
