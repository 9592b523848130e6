"""A Tune sweep survives trial-worker deaths (``FailureConfig``), and a driver killed mid-sweep
resumes with ``Tuner.restore``: no finished trial is computed again, none is logged twice.

Trial-side evidence: with ``RECAST_TRIAL_MARKER_DIR`` set, every trial that starts computing
leaves a file named after its id there (``pipelines.sweep.sweep_trial``).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import session_pids
from pipelines.sweep import main
from stages.jobs.faults import FAULT_ENV, FAULT_POINT_ENV, MARKER_ENV

REPO = Path(__file__).resolve().parents[2]
METHODS = {"head_only": {}, "recast_att": {"recast": {"preset": "recast_att", "overrides": {"groups": 3}}}}


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if ray.is_initialized():  # init_ray would reuse it, without this test's fault injection
        ray.shutdown()
    yield ray
    ray.shutdown()


def computed(markers: Path) -> collections.Counter:
    """Trial id (``/`` as ``_``) -> how many times it started computing."""
    return collections.Counter(p.name.rsplit(".", 1)[0] for p in markers.iterdir()) if markers.exists() \
        else collections.Counter()


def mlflow_runs(uri: str, experiment: str) -> tuple[list, collections.Counter]:
    """(parent runs, child run name -> count) of the experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    ids = {p.info.run_id for p in parents}
    return parents, collections.Counter(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") in ids)


@pytest.mark.slow  # fault injection: trial workers killed and retried (~1 min)
def test_trial_worker_deaths_are_retried_and_rerun_recomputes_nothing(
        stage_outputs, write_config, local_ray, monkeypatch, tmp_path: Path) -> None:
    faults, markers = tmp_path / "faults", tmp_path / "markers"
    monkeypatch.setenv(FAULT_ENV, str(faults))
    monkeypatch.setenv(MARKER_ENV, str(markers))
    config = write_config("budget", methods=METHODS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = main(["--sweep", "budget", "--config", str(config), "--num-cpus", "2"])
    # every trial's worker was killed once (a marker per trial) and Tune's retry finished it
    assert sorted(p.name for p in faults.iterdir()) == [
        "budget_vit_head_only_mnist_lo5_s42.killed", "budget_vit_recast_att_mnist_lo5_s42.killed"]
    assert computed(markers) == {"budget_vit_head_only_mnist_lo5_s42": 1, "budget_vit_recast_att_mnist_lo5_s42": 1}
    assert (first["trials"], first["logged_here"], first["restored_experiments"]) == (2, 2, 0)
    assert first["points"]["recast_att"]["coefficients"] == 6 * 2 * 2  # 6 qkv x K=2 x n=2
    assert first["points"]["head_only"]["task_params"] == 0
    table = pq.read_table(tmp_path / "sweeps/budget/results.parquet").to_pylist()
    assert sorted(r["name"] for r in table) == ["head_only", "recast_att"]
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["peak_rss_mb"] > 0 for r in table)

    second = main(["--sweep", "budget", "--config", str(config)])
    assert (second["trials"], second["logged_here"], second["restored_experiments"]) == (2, 0, 1)
    assert second["mlflow_parent_run"] == first["mlflow_parent_run"]
    assert second["points"] == first["points"]
    assert sum(computed(markers).values()) == 2  # the rerun computed nothing
    parents, children = mlflow_runs(uri, "sweep-tests")
    assert len(parents) == 1 and children == {"budget/vit/head_only/mnist_lo5/s42": 1,
                                              "budget/vit/recast_att/mnist_lo5/s42": 1}


@pytest.mark.slow  # fault injection: trial workers killed after their first epoch (~1 min)
def test_trial_killed_after_an_epoch_resumes_from_its_tune_checkpoint(
        stage_outputs, write_config, local_ray, monkeypatch, tmp_path: Path) -> None:
    """Each epoch is reported with its checkpoint through Tune's API; the retried trial starts
    at epoch 1 (``resumed_epoch``), and its results equal those of a sweep never interrupted."""
    faults, markers = tmp_path / "faults", tmp_path / "markers"
    train = {"epochs": 2, "lr": 0.01, "step_size": 10, "batch_size": 32, "limit_train": 32, "limit_eval": 32}
    methods = {"recast_att": METHODS["recast_att"]}  # one trial: coefficients, a head, AdamW moments
    clean = main(["--sweep", "budget", "--config", str(write_config("budget", methods=methods, train=train)),
                  "--num-cpus", "2"])
    local_ray.shutdown()
    monkeypatch.setenv(FAULT_ENV, str(faults))
    monkeypatch.setenv(FAULT_POINT_ENV, "epoch:1")
    monkeypatch.setenv(MARKER_ENV, str(markers))
    config = write_config("budget", methods=methods, train=train, out_dir=str(tmp_path / "sweeps-killed"),
                          runtime={"cache_dir": str(tmp_path / "cache-killed"), "experiment": "sweep-killed",
                                   "progress": False})
    killed = main(["--sweep", "budget", "--config", str(config), "--num-cpus", "2"])
    assert sorted(p.name for p in faults.iterdir()) == ["budget_vit_recast_att_mnist_lo5_s42.epoch1.killed"]
    assert computed(markers) == {"budget_vit_recast_att_mnist_lo5_s42": 2}  # started twice, resumed once
    rows = {r["name"]: r for r in pq.read_table(tmp_path / "sweeps-killed/budget/results.parquet").to_pylist()}
    assert {n: r["resumed_epoch"] for n, r in rows.items()} == {"recast_att": 1}
    before = {r["name"]: r for r in pq.read_table(tmp_path / "sweeps/budget/results.parquet").to_pylist()}
    assert {n: r["resumed_epoch"] for n, r in before.items()} == {"recast_att": 0}
    for name in rows:  # same thread count, same machine: the resumed trial computed the same numbers
        assert (rows[name]["val_acc"], rows[name]["test_acc"]) == (before[name]["val_acc"], before[name]["test_acc"])
    assert clean["trials"] == killed["trials"] == 1


@pytest.mark.slow  # fault injection: two sequence trials' workers killed mid-stream (~1 min)
def test_sequence_trials_killed_mid_stream_resume_from_their_tune_checkpoints(
        stage_outputs, write_config, local_ray, monkeypatch, tmp_path: Path) -> None:
    """``order``: the ``recast_sequence`` trial loses its worker after epoch 1 of its second task,
    the ``continual`` (EWC) one after its first task; Tune's retries resume there
    (``resumed_task``/``resumed_epoch``) and end with the results of a sweep never interrupted."""
    faults, markers = tmp_path / "faults", tmp_path / "markers"
    tasks = ["mnist_lo5", "mnist_hi5_inv"]
    fields = {"tasks": tasks, "orders": [tasks], "continual": ["ewc"], "continual_epochs": 2,
              "train": {"epochs": 2, "lr": 0.01, "step_size": 10, "batch_size": 32, "limit_train": 32,
                        "limit_eval": 32}}
    clean = main(["--sweep", "order", "--config", str(write_config("order", **fields)), "--num-cpus", "2"])
    local_ray.shutdown()
    monkeypatch.setenv(FAULT_ENV, str(faults))
    monkeypatch.setenv(FAULT_POINT_ENV, "task:1:epoch:1,task:1")
    monkeypatch.setenv(MARKER_ENV, str(markers))
    config = write_config("order", **fields, out_dir=str(tmp_path / "sweeps-killed"),
                          runtime={"cache_dir": str(tmp_path / "cache-killed"), "experiment": "sweep-killed",
                                   "progress": False})
    killed = main(["--sweep", "order", "--config", str(config), "--num-cpus", "2"])
    label = "mnist_lo5>mnist_hi5_inv"  # the trial id, its "/" as "_"
    trial = {"recast": f"order_vit_recast_{label}_s42", "ewc": f"order_vit_ewc_{label}_s42"}
    assert sorted(p.name for p in faults.iterdir()) == sorted(
        [f"{trial['recast']}.task1.epoch1.killed", f"{trial['ewc']}.task1.killed"])
    assert computed(markers) == {trial["recast"]: 2, trial["ewc"]: 2}  # each started twice, resumed once
    rows = {r["name"]: r for r in pq.read_table(tmp_path / "sweeps-killed/order/results.parquet").to_pylist()}
    before = {r["name"]: r for r in pq.read_table(tmp_path / "sweeps/order/results.parquet").to_pylist()}
    assert {n: (r["resumed_task"], r["resumed_epoch"]) for n, r in rows.items()} == {"recast": (1, 1), "ewc": (1, 0)}
    assert {n: (r["resumed_task"], r["resumed_epoch"]) for n, r in before.items()} == {"recast": (0, 0),
                                                                                        "ewc": (0, 0)}
    for name in rows:  # same thread count, same machine: the resumed trials computed the same numbers
        assert (rows[name]["acc_matrix"], rows[name]["avg_acc"]) == (before[name]["acc_matrix"],
                                                                    before[name]["avg_acc"])
    assert rows["ewc"]["state_sha256"] == before["ewc"]["state_sha256"]
    assert clean["trials"] == killed["trials"] == 2


def _driver(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python -m pipelines.sweep`` in its own session (its local Ray starts inside it)."""
    return subprocess.Popen([sys.executable, "-m", "pipelines.sweep", "--sweep", "budget", "--config", str(config)],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_driver_killed_mid_sweep_resumes_with_tuner_restore(stage_root: Path, write_config, tmp_path: Path) -> None:
    methods = {**METHODS, "lora": {"adapter": {"preset": "lora_tiny"}}}
    ids = [f"budget/vit/{m}/mnist_lo5/s42" for m in methods]
    runtime = {"cache_dir": str(tmp_path / "cache"), "experiment": "driver-kill", "progress": False, "num_cpus": 1}
    config = write_config("budget", methods=methods, runtime=runtime,
                          data_dir=str(stage_root / "data/prepared/offline"),
                          pretrain_dir=str(stage_root / "outputs/pretrain"))
    markers, uri = tmp_path / "markers", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAULT_ENV)}
    env.update({MARKER_ENV: str(markers), "MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0",
                "TQDM_DISABLE": "1"})
    done_glob = "cache/tune/budget-*/done/*.json"

    driver = _driver(config, env, tmp_path / "first.log")
    try:  # one CPU: trials run one after another; kill the driver once the first has finished
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(done_glob)):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        _kill_session(driver.pid)  # the driver's local Ray, whatever outlived it
    finished_before = {p.stem for p in tmp_path.glob(done_glob)}
    assert 1 <= len(finished_before) < len(ids)
    assert not (tmp_path / "sweeps/budget/results.parquet").exists()

    driver = _driver(config, env, tmp_path / "second.log")
    try:
        rc = driver.wait(timeout=400)
    finally:
        _kill_session(driver.pid)
    assert rc == 0, (tmp_path / "second.log").read_text()[-4000:]
    summary = json.loads((tmp_path / "sweeps/budget/summary.json").read_text())
    assert (summary["trials"], summary["restored_experiments"]) == (3, 1)
    counts = computed(markers)
    assert set(counts) == {i.replace("/", "_") for i in ids}
    assert all(counts[key] == 1 for key in finished_before), (counts, finished_before)  # none recomputed
    assert sum(counts.values()) <= len(ids) + 1  # at most the trial running at the kill ran twice
    parents, children = mlflow_runs(uri, "driver-kill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert children == {i: 1 for i in ids}  # each logged exactly once
    table = pq.read_table(tmp_path / "sweeps/budget/results.parquet").to_pylist()
    assert sorted(r["id"] for r in table) == sorted(ids)
