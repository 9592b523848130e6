"""A Tune sweep on a real multi-process Ray cluster on loopback, with an MLflow tracking server,
losing its worker node mid-sweep.

``infra/ray/start_local.sh`` starts a head and a worker node (each in its own session, 1 CPU each)
and ``infra/mlflow/start_local.sh`` an MLflow server; the sweep driver runs as a subprocess with
RAY_ADDRESS and MLFLOW_TRACKING_URI. While a trial runs on the worker node (its marker file names
a pid of that node's session), every process of that node's session is SIGKILLed (by pid; never
``ray stop``, which would stop other clusters). Tune retries the lost trial on the head
(``FailureConfig``); every trial is logged exactly once and present in the table.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import cmdline, free_port, session_pids
from stages.jobs.faults import MARKER_ENV

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PAIRS = [[1, 2], [2, 1], [1, 6], [2, 3], [3, 2], [6, 1]]
TRAIN = {"epochs": 2, "lr": 0.01, "step_size": 10, "batch_size": 32, "limit_train": 160, "limit_eval": 64}


def run_script(script: Path, *args: str, env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"{script.name} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def exports_of(stdout: str) -> dict[str, str]:
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("export ")]
    return dict(ln.removeprefix("export ").split("=", 1) for ln in lines)


@pytest.fixture
def services(tmp_path: Path):
    """A Ray head + worker and an MLflow server on loopback; everything stopped afterwards."""
    pytest.importorskip("ray")
    pytest.importorskip("mlflow")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHON=sys.executable, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    ray_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray puts unix sockets under it
    mlflow_dir = tmp_path / "mlflow"
    sids: list[int] = []
    try:
        out = run_script(INFRA / "mlflow/start_local.sh", "-p", str(free_port()), "-d", str(mlflow_dir),
                         env=env, timeout=150)
        sids.append(int((mlflow_dir / "mlflow.pid").read_text()))
        exports = exports_of(out)
        out = run_script(INFRA / "ray/start_local.sh", "-p", str(free_port()), "-c", "1", "-w", "1",
                         "-t", str(ray_dir), env=env, timeout=150)
        exports.update(exports_of(out))
        sids += [int((ray_dir / f"recast-{node}.pid").read_text()) for node in ("head", "worker")]
        yield {"env": {**env, **exports}, "worker_sid": sids[-1], "uri": exports["MLFLOW_TRACKING_URI"]}
    finally:
        try:
            if (ray_dir / "recast-head.pid").exists():
                run_script(INFRA / "ray/stop_local.sh", "-t", str(ray_dir), env=env, timeout=120)
        finally:
            if (mlflow_dir / "mlflow.pid").exists():
                run_script(INFRA / "mlflow/stop_local.sh", "-d", str(mlflow_dir), env=env, timeout=60)
            leftovers = {sid: session_pids(sid) for sid in sids}
            shutil.rmtree(ray_dir, ignore_errors=True)
        assert leftovers == {sid: [] for sid in sids}, "services left processes behind"


def wait_for_trial_on(sid: int, markers: Path, driver: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """(pid, trial) of a trial computing on a process of session ``sid`` (from the trials' markers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before a trial ran on the worker node"
        node = set(session_pids(sid))
        for marker in markers.glob("*") if markers.exists() else []:
            text = marker.read_text().strip()
            if text and int(text) in node:
                return int(text), marker.name.rsplit(".", 1)[0]
        time.sleep(0.2)
    raise AssertionError(f"no trial started on the worker node within {timeout} s")


def test_sweep_survives_losing_the_worker_node(services, stage_root: Path, tmp_path: Path) -> None:
    import yaml
    from mlflow.tracking import MlflowClient

    config = tmp_path / "gn.yaml"
    config.write_text(yaml.safe_dump({
        "pairs": PAIRS, "train": TRAIN, "out_dir": str(tmp_path / "sweeps"),
        "data_dir": str(stage_root / "data/prepared/offline"), "pretrain_dir": str(stage_root / "outputs/pretrain"),
        "runtime": {"cache_dir": str(tmp_path / "cache"), "storage": (tmp_path / "tune").as_uri(),
                    "experiment": "cluster-test", "progress": False, "max_retries": 3}}))
    markers = tmp_path / "markers"
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.sweep", "--sweep", "gn", "--config", str(config)],
                              cwd=REPO, env={**services["env"], MARKER_ENV: str(markers)}, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        victim, trial = wait_for_trial_on(services["worker_sid"], markers, driver, timeout=180)
        node = session_pids(services["worker_sid"])
        assert any("raylet" in cmdline(pid) for pid in node)
        for pid in node:  # the whole worker node: raylet, agents and the busy task worker
            os.kill(pid, signal.SIGKILL)
        rc = driver.wait(timeout=150)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    output = (tmp_path / "driver.log").read_text()
    assert rc == 0, output[-4000:]
    assert victim in node and session_pids(services["worker_sid"]) == []
    assert list(tmp_path.glob("tune/gn-*/tuner.pkl")), "runtime.storage holds the Tune experiment"
    started = collections.Counter(p.name.rsplit(".", 1)[0] for p in markers.iterdir())
    assert started[trial] == 2 and sorted(started.values()) == [1] * (len(PAIRS) - 1) + [2]  # only the lost trial re-ran

    ids = {f"gn/vit/G{g}-n{n}/mnist_lo5/s42" for g, n in PAIRS}
    client = MlflowClient(services["uri"])
    exp = client.get_experiment_by_name("cluster-test")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'", max_results=1000)
    counts = collections.Counter(r.info.run_name for r in children)
    assert counts == {i: 1 for i in ids}, counts
    assert all(r.info.status == "FINISHED" and "test_acc" in r.data.metrics for r in children)

    table = pq.read_table(tmp_path / "sweeps/gn/results.parquet").to_pylist()
    assert sorted(r["id"] for r in table) == sorted(ids)
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in table)
