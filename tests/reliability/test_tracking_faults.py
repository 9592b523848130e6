"""MLflow faults in-process: a tracking server that is down at stage start fails at once with a
clear message; retries are bounded and reported; child runs are found again by cache key and
payloads registered once; parent runs end FAILED or KILLED; a side run writes its own metrics;
the errors we raise survive pickling."""

from __future__ import annotations

import pickle
import sqlite3
import time

import pytest
import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from helpers import free_port
from stages.config.common import IntegrityError, StageKilled, metrics_path
from stages.tracking import store
from stages.tracking.payloads import register_payload
from stages.tracking.runs import Tracker
from stages.tracking.store import TrackingUnavailable, retry


@pytest.fixture(scope="module")
def module_store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one runs MLflow's migrations: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture
def sqlite_uri(module_store, monkeypatch, request) -> str:
    """The module's store; each test in its own experiment (``faults-<test name>``)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_store)
    return module_store


def _exp(request) -> str:
    return f"faults-{request.node.name}"


@pytest.mark.timeout(60)
def test_server_down_at_start_fails_fast_naming_it(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"{uri}.*does not answer.*MLFLOW_TRACKING_URI"):
        Tracker("tune", "faults")
    assert time.monotonic() - t0 < 15


def test_retries_are_bounded_and_reported(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(store.RETRY_ENV, "1.5")
    monkeypatch.setattr(store.random, "random", lambda: 0.5)  # no jitter: waits 0.4 s, 0.8 s, then 1.6 > 0.3 left
    calls = []

    def down():
        calls.append(time.monotonic())
        raise ConnectionError("Connection refused")

    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="log metrics failed .* within 2 s.*RECAST_MLFLOW_RETRY_S"):
        retry(down, uri=f"sqlite:///{tmp_path}/x.db", what="log metrics")
    assert 1.2 <= time.monotonic() - t0 < 4 and len(calls) == 3
    assert "[mlflow] log metrics failed (ConnectionError: Connection refused); retry 1" in capsys.readouterr().err
    with pytest.raises(KeyError):  # not transient: raised at once
        retry(lambda: {}["missing"], uri=f"sqlite:///{tmp_path}/x.db")
    monkeypatch.setenv(store.RETRY_ENV, "inf")
    with pytest.raises(ValueError, match="RECAST_MLFLOW_RETRY_S"):
        store.retry_budget_s()


def _flaky(error: BaseException, failures: int):
    """A call that raises ``error`` ``failures`` times, then returns "ok"; its ``calls`` counts them."""
    def call():
        call.calls += 1
        if call.calls <= failures:
            raise error
        return "ok"

    call.calls = 0
    return call


def _rest_connection_error() -> MlflowException:
    """What MLflow's REST client raises when the server refuses the connection: a plain
    MlflowException raised while handling requests' ConnectionError."""
    try:
        try:
            raise requests.exceptions.ConnectionError("Max retries exceeded: Connection refused")
        except requests.exceptions.ConnectionError as e:
            raise MlflowException(f"API request to http://x/api failed with exception {e}")
    except MlflowException as outer:
        return outer


@pytest.mark.parametrize("error", [
    ConnectionError("Connection refused"),
    sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked")),
    sqlite3.OperationalError("duplicate column name: storage_location"),  # two processes migrating one store
    MlflowException("server busy", error_code=TEMPORARILY_UNAVAILABLE),  # HTTP 503
    _rest_connection_error(),
], ids=["ConnectionError", "sqlalchemy-locked", "sqlite-migration", "mlflow-503", "mlflow-rest-connection"])
def test_transient_errors_are_retried_by_type(error, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(store.RETRY_ENV, "30")
    monkeypatch.setattr(store.random, "random", lambda: 0.0)  # waits 0.2 s, 0.4 s
    call = _flaky(error, failures=2)
    assert retry(call, uri=f"sqlite:///{tmp_path}/x.db", what="log metrics") == "ok"
    assert call.calls == 3  # two failures retried, then the success
    err = capsys.readouterr().err
    assert err.count("[mlflow] log metrics failed") == 2 and "retry 2 in 0.4 s" in err


@pytest.mark.parametrize("error", [
    KeyError("missing"),
    ValueError("connection timed out: database is locked (503)"),  # transient words, not a transient type
    MlflowException("Connection reset, locked, 503", error_code=INVALID_PARAMETER_VALUE),
    MlflowException("run not found", error_code=RESOURCE_DOES_NOT_EXIST),
], ids=["KeyError", "ValueError-with-transient-words", "mlflow-bad-request", "mlflow-not-found"])
def test_other_errors_are_raised_at_once(error, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(store.RETRY_ENV, "30")
    call = _flaky(error, failures=1)
    with pytest.raises(type(error)) as raised:
        retry(call, uri=f"sqlite:///{tmp_path}/x.db")
    assert raised.value is error and call.calls == 1
    assert "[mlflow]" not in capsys.readouterr().err


def test_mlflow_http_client_does_not_retry_on_its_own():
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30


def test_children_are_reattached_and_registration_is_idempotent(sqlite_uri, request):
    client = MlflowClient(sqlite_uri, registry_uri=sqlite_uri)
    first = Tracker("tune", _exp(request))
    rid = first.child("tune/vit/recast/a/s0", {"seed": 0}, {"test_acc": 0.5}, key="k1")
    v1 = register_payload(rid, "vit", "a", "recast", {"test_acc": "0.5"}, val_acc=0.5)
    assert register_payload(rid, "vit", "a", "recast", {"test_acc": "0.5"}, val_acc=0.5) == v1  # not twice
    # a child half-logged by a killed driver (created, never finished)
    half = client.create_run(first.experiment_id, run_name="tune/vit/recast/b/s0",
                             tags={"mlflow.parentRunId": first.parent_id, "spec_key": "k2"}).info.run_id
    first.finish(status="KILLED")

    resumed = Tracker("tune", _exp(request))
    assert resumed.child("tune/vit/recast/a/s0", {"seed": 0}, {"test_acc": 0.5}, key="k1") == rid  # reattached
    rid_b = resumed.child("tune/vit/recast/b/s0", {"seed": 0}, {"test_acc": 0.6}, key="k2")
    assert rid_b != half and client.get_run(half).info.lifecycle_stage == "deleted"
    assert register_payload(rid, "vit", "a", "recast", {"test_acc": "0.5"}, val_acc=0.5) == v1
    register_payload(rid_b, "vit", "b", "recast", {"test_acc": "0.6"}, val_acc=0.6)  # caught up
    resumed.finish()
    runs = client.search_runs([first.experiment_id], filter_string="tags.spec_key = 'k1'")
    assert [r.info.run_id for r in runs] == [rid]
    assert len(client.search_model_versions("name = 'recast.vit.recast.a'")) == 1
    assert len(client.search_model_versions("name = 'recast.vit.recast.b'")) == 1
    assert client.get_model_version_by_alias("recast.vit.recast.b", "current").run_id == rid_b


@pytest.mark.parametrize("raised, status", [(RuntimeError("job failed"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                                            (StageKilled("stopped by SIGTERM"), "KILLED")])
def test_parent_run_ends_failed_or_killed(sqlite_uri, request, raised, status):
    with pytest.raises(type(raised)):
        with Tracker("pretrain", _exp(request)) as tracker:
            raise raised
    run = MlflowClient(sqlite_uri).get_run(tracker.parent_id)
    assert run.info.status == status


def test_parent_of_a_dead_driver_is_ended_by_the_next_run(sqlite_uri, request):
    client = MlflowClient(sqlite_uri)
    stale = Tracker("mimic", _exp(request))
    child = client.create_run(stale.experiment_id, run_name="j",
                              tags={"mlflow.parentRunId": stale.parent_id}).info.run_id
    client.set_tag(stale.parent_id, "driver_pid", "999999999")  # as if its driver was SIGKILLed
    with Tracker("mimic", _exp(request)):
        pass
    assert client.get_run(stale.parent_id).info.status == "KILLED"
    assert client.get_run(child).info.status == "KILLED"


def test_errors_survive_pickling():
    for err in (TrackingUnavailable("MLflow at http://x: down"), IntegrityError("f: corrupt"),
                StageKilled("stopped by SIGTERM")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)


def test_side_run_metrics_never_overwrite_the_main_ones(stage_files, sqlite_uri, request, monkeypatch):
    """A tune run with another out_dir writes ``<out_dir>/metrics.json``, not ``metrics/tune.json``;
    a failing tune run ends its parent run FAILED."""
    import stages.jobs.driver as driver
    import stages.jobs.tuning as tuning
    from stages.config.params import RuntimeParams, TuneParams
    from stages.jobs.result import JobResult

    monkeypatch.setattr("stages.config.common.REPO_ROOT", stage_files)
    assert metrics_path("tune", "outputs/tune", "outputs/tune") == stage_files / "metrics/tune.json"
    assert metrics_path("tune", str(stage_files / "outputs/tune"), "outputs/tune") == stage_files / "metrics/tune.json"
    row = {"arch": "vit", "method": "head_only", "seed": 0, "test_acc": 0.5, "trainable_params": 1,
           "stored_params": 1, "task_params": 1, "head_params": 0, "bytes": 4, "seconds_per_step": 0.1,
           "train_seconds": 1.0}

    def fake_run_jobs(stage, fn, specs, rt, on_result, inputs=None):
        for spec in specs:
            on_result(spec, JobResult({**row, "task": spec["task"]}), False)

    monkeypatch.setattr(driver, "run_jobs", fake_run_jobs)
    p = TuneParams(archs=["vit"], tasks=["task_a"], seeds=[0], methods={"head_only": {"kind": "head_only"}},
                   out_dir=str(stage_files / "side"))
    rt = RuntimeParams(experiment=_exp(request), progress=False)
    summary = tuning.run_tuning("tune", p, p.methods, rt, p.out_dir, continual=False)
    assert summary["vit/head_only"]["avg_test_acc"] == 0.5
    assert (stage_files / "side/metrics.json").exists() and not (stage_files / "metrics").exists()

    def failing(stage, fn, specs, rt, on_result, inputs=None):
        raise RuntimeError("a job failed")

    monkeypatch.setattr(driver, "run_jobs", failing)
    with pytest.raises(RuntimeError, match="a job failed"):
        tuning.run_tuning("tune", p, p.methods, rt, p.out_dir, continual=False)
    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name(_exp(request))
    parents = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'stage'",
                                 order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in parents] == ["FINISHED", "FAILED"]
