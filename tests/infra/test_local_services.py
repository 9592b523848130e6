"""End-to-end runs of the loopback service scripts: start a real MLflow server / Ray cluster, use
it, stop it, and check that no process of it is left."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from helpers import free_port, listen_addresses, session_pids

pytestmark = pytest.mark.slow

INFRA = Path(__file__).resolve().parents[2] / "infra"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def run_script(script: Path, *args: str, env: dict[str, str], timeout: float) -> str:
    """Run ``script`` with bash; return its stdout, fail with its output when it exits non-zero."""
    result = subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{script.name} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_mlflow_local_server_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    port, state = free_port(), tmp_path / "mlflow"
    env = script_env()
    try:
        stdout = run_script(INFRA / "mlflow" / "start_local.sh", "-p", str(port), "-d", str(state),
                            env=env, timeout=150)
        uri = f"http://127.0.0.1:{port}"
        assert stdout.strip().splitlines()[-1] == f"export MLFLOW_TRACKING_URI={uri}"
        sid = int((state / "mlflow.pid").read_text())
        assert session_pids(sid)
        assert listen_addresses(port) == {"127.0.0.1"}, "the server must listen on 127.0.0.1 only"

        client = mlflow.MlflowClient(tracking_uri=uri)
        run_id = client.create_run(client.create_experiment("infra-smoke")).info.run_id
        for step, loss in enumerate([0.5, 0.25, 0.125]):
            client.log_metric(run_id, "loss", loss, step=step)
        client.log_dict(run_id, {"tasks": 3}, "summary/result.json")
        client.set_terminated(run_id)

        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics == {"loss": 0.125}
        history = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.25), (2, 0.125)]
        # The artifact went through the server's proxy into the local artifact store.
        stored = list((state / "artifacts").rglob("result.json"))
        assert len(stored) == 1 and json.loads(stored[0].read_text()) == {"tasks": 3}
        assert (state / "mlflow.db").stat().st_size > 0
    finally:
        run_script(INFRA / "mlflow" / "stop_local.sh", "-d", str(state), env=env, timeout=60)
    assert session_pids(sid) == []
    assert not (state / "mlflow.pid").exists()
    assert not port_open(port)


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray

    ray.init(address=sys.argv[1], log_to_driver=False)
    expected_cpus = float(sys.argv[2])
    deadline = time.monotonic() + 30
    while ray.cluster_resources().get("CPU", 0) < expected_cpus and time.monotonic() < deadline:
        time.sleep(0.5)

    @ray.remote(num_cpus=1)
    def where(seconds):
        time.sleep(seconds)
        return ray.get_runtime_context().get_node_id()

    # Two 1-CPU tasks at once on two 1-CPU nodes: one must run on each node.
    nodes = ray.get([where.remote(1.0), where.remote(1.0)])
    print(json.dumps({
        "cpus": ray.cluster_resources().get("CPU", 0),
        "alive_nodes": sum(n["Alive"] for n in ray.nodes()),
        "task_nodes": len(set(nodes)),
    }))
    ray.shutdown()
    """
)


def test_ray_local_head_and_worker() -> None:
    pytest.importorskip("ray")
    # Ray puts unix sockets under its temp dir; pytest's tmp_path is too long for them (108 chars).
    temp_dir = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
    port, head_cpus, worker_cpus = free_port(), 1, 1
    env = script_env(RAY_LOCAL_CLIENT_PORT=str(free_port()), RAY_USAGE_STATS_ENABLED="0")
    sids: list[int] = []
    try:
        stdout = run_script(INFRA / "ray" / "start_local.sh", "-p", str(port), "-c", str(head_cpus),
                            "-w", str(worker_cpus), "-t", str(temp_dir), env=env, timeout=150)
        address = f"127.0.0.1:{port}"
        exports = dict(line.removeprefix("export ").split("=", 1) for line in stdout.strip().splitlines())
        assert exports.pop("RAY_ADDRESS") == address
        assert set(exports) <= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}  # token auth, where Ray has it
        sids = [int((temp_dir / f"recast-{node}.pid").read_text()) for node in ("head", "worker")]
        assert all(session_pids(sid) for sid in sids)

        driver = subprocess.run(
            [sys.executable, "-c", DRIVER, address, str(head_cpus + worker_cpus)],
            env={**env, **exports}, capture_output=True, text=True, timeout=120, check=False,
        )
        assert driver.returncode == 0, driver.stderr
        report = json.loads(driver.stdout.strip().splitlines()[-1])
        assert report == {"cpus": head_cpus + worker_cpus, "alive_nodes": 2, "task_nodes": 2}
    finally:
        try:
            run_script(INFRA / "ray" / "stop_local.sh", "-t", str(temp_dir), env=env, timeout=90)
        finally:
            leftovers = {sid: session_pids(sid) for sid in sids}
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert leftovers == {sid: [] for sid in sids}
    assert not port_open(port)
