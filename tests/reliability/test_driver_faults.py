"""A driver killed (SIGTERM, SIGKILL), two drivers at once, MLflow stopped mid-stage: every job
is computed once, each has exactly one finished child run and one registered version, and no
run is left RUNNING. The driver is ``tests/reliability/driver.py`` (the tune stage's machinery
around a sleeping job) in a subprocess; the MLflow server a real ``mlflow server``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]


def start(root: Path, n: int, sleep: float, uri: str, **env) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    full.update(MLFLOW_TRACKING_URI=uri, RAY_USAGE_STATS_ENABLED="0", TQDM_DISABLE="1", PYTHONWARNINGS="ignore", **env)
    k = len(list(root.glob("driver*.out"))) if root.exists() else 0
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"driver{k}.out", "w") as out, open(root / f"driver{k}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.driver", str(root), str(n), str(sleep)],
                                cwd=REPO, env=full, stdout=out, stderr=err, start_new_session=True)
    proc.index = k
    return proc


def finish(proc: subprocess.Popen, root: Path, timeout: float = 240) -> tuple[int, str, str]:
    rc = proc.wait(timeout)
    return rc, (root / f"driver{proc.index}.out").read_text(), (root / f"driver{proc.index}.err").read_text()


def cached_jobs(root: Path) -> int:
    """Finished job cache entries (``<key>.json``; not ``<key>.mlflow.json``, the record of its run)."""
    return sum(1 for p in (root / "cache" / "fake").glob("*.json") if p.name.count(".") == 1)


def wait_cached(root: Path, count: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while cached_jobs(root) < count:
        assert proc.poll() is None, f"driver exited early ({proc.returncode})"
        assert time.monotonic() < deadline, "the driver cached nothing"
        time.sleep(0.2)


def check_store(uri: str, n: int, parents: list[str]) -> None:
    """One finished child per job (distinct cache keys), one version per payload, nothing RUNNING."""
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert sorted(r.info.run_name for r in children) == [f"fake/vit/recast/t{i}/s0" for i in range(n)]
    assert all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["spec_key"] for r in children}) == n
    assert sorted(r.info.status for r in runs if not r.data.tags.get("mlflow.parentRunId")) == sorted(parents)
    for i in range(n):
        versions = client.search_model_versions(f"name = 'recast.vit.recast.t{i}'")
        assert len(versions) == 1, (i, [v.run_id for v in versions])
        assert client.get_model_version_by_alias(f"recast.vit.recast.t{i}", "current").version == versions[0].version


def marks(root: Path) -> list[str]:
    return sorted(p.name.split(".")[0] for p in (root / "marks").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_then_sigkill_then_resume(tmp_path):
    root, n = tmp_path / "run", 4
    uri = f"sqlite:///{root}/mlflow.db"
    first = start(root, n, 1.5, uri)
    wait_cached(root, 1, first)
    first.send_signal(signal.SIGTERM)  # the driver only, as a scheduler would
    rc, _, err = finish(first, root)
    assert rc in (1, 130, 143) and ("KeyboardInterrupt" in err or "SIGTERM" in err), err[-3000:]
    done = cached_jobs(root)  # jobs in flight may finish while the first ends
    second = start(root, n, 1.5, uri)
    wait_cached(root, done + 1, second)  # a job of its own: its parent run exists
    os.killpg(second.pid, signal.SIGKILL)  # the driver and its Ray, no cleanup at all
    second.wait(60)
    rc, out, err = finish(start(root, n, 1.5, uri), root)  # same specs (the sleep is part of the key)
    assert rc == 0, err[-3000:]
    assert err.count("(fake) of a dead driver") == 1  # the SIGKILLed one; the SIGTERMed one ended itself
    cached = json.loads(out.strip().splitlines()[-1])["cached"]
    assert sorted(cached) == [f"fake/vit/recast/t{i}/s0" for i in range(n)]
    assert sum(cached.values()) >= 2  # what the killed drivers finished is reused
    # at most the job in flight at each kill ran twice: a stopped driver cancels its queued jobs
    assert len(marks(root)) <= n + 2, sorted(p.name for p in (root / "marks").iterdir())  # task.pid.time_ns
    check_store(uri, n, ["FINISHED", "KILLED", "KILLED"])  # SIGTERM: ended by itself; SIGKILL: by the resume
    client = MlflowClient(uri)
    first_parent = client.search_runs([client.get_experiment_by_name("faults").experiment_id],
                                      filter_string="tags.kind = 'stage'", order_by=["attributes.start_time ASC"])[0]
    assert first_parent.info.status == "KILLED" and first_parent.info.end_time is not None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_concurrent_drivers_compute_each_job_once(tmp_path):
    root, n = tmp_path / "run", 3
    uri = f"sqlite:///{root}/mlflow.db"
    procs = [start(root, n, 1.0, uri) for _ in range(2)]
    results = [finish(p, root) for p in procs]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert marks(root) == [f"t{i}" for i in range(n)]  # computed once
    assert sum("another run of this stage is in progress" in r[2] for r in results) == 1
    lines = [json.loads(r[1].strip().splitlines()[-1]) for r in results]
    flags = [line["cached"] for line in lines]
    assert sorted(all(f.values()) for f in flags) == [False, True]  # the second reused the first's jobs
    # the local Ray (started by the one that computed) runs with token authentication; the other started none
    assert sorted((line["token_auth"] for line in lines), key=str) == [None, True]
    check_store(uri, n, ["FINISHED", "FINISHED"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_stopped_mid_stage_then_back(tmp_path, mlflow_server):
    root, n = tmp_path / "run", 4
    mlflow_server.start()
    env = {"RECAST_MLFLOW_RETRY_S": "3"}
    first = start(root, n, 2.0, mlflow_server.uri, **env)
    wait_cached(root, 1, first)
    mlflow_server.stop()
    rc, _, err = finish(first, root)
    assert rc != 0 and "became unreachable" in err and "Run the stage again" in err, err[-3000:]
    assert "retry 1" in err  # what is retried is said
    assert cached_jobs(root) == n  # kept computing and caching
    assert marks(root) == [f"t{i}" for i in range(n)]
    mlflow_server.start()
    rc, out, err = finish(start(root, n, 2.0, mlflow_server.uri, **env), root)
    assert rc == 0, err[-3000:]
    assert all(json.loads(out.strip().splitlines()[-1])["cached"].values())
    assert marks(root) == [f"t{i}" for i in range(n)]  # nothing computed again
    check_store(mlflow_server.uri, n, ["FINISHED", "KILLED"])  # the outage's parent ended by the next run
