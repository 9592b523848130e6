"""Fast checks of the start/stop scripts' safety paths, against stand-in processes: a stop never
signals a session it did not start, a start refuses to run twice, SIGTERM escalates to SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import free_port

INFRA = Path(__file__).resolve().parents[2] / "infra"


def bash(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", script, *args],
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture
def stand_in() -> Iterator[Callable[[str], subprocess.Popen]]:
    """Start ``sleep`` in a new session under a given argv[0]; killed (by pid) at teardown."""
    procs: list[subprocess.Popen] = []

    def start(name: str) -> subprocess.Popen:
        proc = subprocess.Popen(["bash", "-c", f"exec -a {name} sleep 120"], start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("script", "flag", "pid_name"),
    [("mlflow/stop_local.sh", "-d", "mlflow.pid"), ("ray/stop_local.sh", "-t", "recast-head.pid")],
)
def test_stop_without_pid_file_is_a_no_op(tmp_path: Path, script: str, flag: str, pid_name: str) -> None:
    result = bash(str(INFRA / script), flag, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / pid_name).exists()


@pytest.mark.parametrize(
    ("script", "flag", "pid_name"),
    [("mlflow/stop_local.sh", "-d", "mlflow.pid"), ("ray/stop_local.sh", "-t", "recast-head.pid")],
)
def test_stop_leaves_a_foreign_session_alone(
    tmp_path: Path, stand_in, script: str, flag: str, pid_name: str
) -> None:
    other = stand_in("some-other-program")
    (tmp_path / pid_name).write_text(f"{other.pid}\n")
    result = bash(str(INFRA / script), flag, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "left alone" in result.stderr
    assert other.poll() is None, "a process the scripts did not start was signalled"
    assert not (tmp_path / pid_name).exists()


def test_mlflow_start_refuses_a_second_server(tmp_path: Path, stand_in) -> None:
    pytest.importorskip("mlflow")
    running = stand_in("mlflow-server-stand-in")
    (tmp_path / "mlflow.pid").write_text(f"{running.pid}\n")
    port = free_port()
    result = bash(str(INFRA / "mlflow" / "start_local.sh"), "-p", str(port), "-d", str(tmp_path))
    assert result.returncode == 1
    assert "already running" in result.stderr
    assert result.stdout == ""  # no export line for `eval` to pick up
    assert (tmp_path / "mlflow.pid").read_text() == f"{running.pid}\n"


def test_ray_start_refuses_a_second_head(tmp_path: Path, stand_in) -> None:
    running = stand_in("ray-head-stand-in")
    (tmp_path / "recast-head.pid").write_text(f"{running.pid}\n")
    result = bash(str(INFRA / "ray" / "start_local.sh"), "-p", str(free_port()), "-t", str(tmp_path))
    assert result.returncode == 1
    assert "already running" in result.stderr
    assert result.stdout == ""


def test_terminate_escalates_to_sigkill() -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print(flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        stubborn.stdout.readline()  # SIGTERM is ignored from here on
        result = subprocess.run(
            ["bash", "-c", f'source "{INFRA / "session.sh"}"; terminate 1 {stubborn.pid}'],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "sending SIGKILL" in result.stderr
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait(timeout=5)


def test_session_helpers_refuse_the_callers_own_session() -> None:
    result = subprocess.run(
        ["bash", "-c", f'source "{INFRA / "session.sh"}"; session_runs "$(ps -o sid= -p $$ | tr -d " ")" x'],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert "refusing" in result.stderr
