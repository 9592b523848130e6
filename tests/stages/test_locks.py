"""The two file locks (filelock): ``stages.config.common.file_lock`` and the tracking store's lock
exclude other processes and other threads, are re-entrant in one thread, and a waiter is told
who holds the lock."""

from __future__ import annotations

import subprocess
import sys
import threading

from stages.config.common import REPO_ROOT, file_lock
from stages.tracking import store

OTHER = """
import sys
from stages.config.common import file_lock
with file_lock(sys.argv[1], waiting="other: busy"):
    print("acquired", flush=True)
"""


def test_file_lock_waits_for_another_process_and_names_the_holder(tmp_path):
    path = tmp_path / "stage.lock"
    with file_lock(path):
        with file_lock(path):  # re-entrant in this thread
            pass
        other = subprocess.Popen([sys.executable, "-c", OTHER, str(path)], cwd=REPO_ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = other.stderr.readline()  # printed before it blocks
        assert line.startswith(f"other: busy (lock {path} held by pid ") and line.rstrip().endswith("); waiting"), line
        assert other.poll() is None  # still waiting
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0 and out == "acquired\n"


def test_file_lock_excludes_other_threads_until_released(tmp_path):
    path, entered = tmp_path / "stage.lock", threading.Event()

    def other():
        with file_lock(path):
            entered.set()

    with file_lock(path):
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.5)  # blocked while this thread holds it
    assert entered.wait(10)  # and gets it once released
    thread.join(timeout=10)


def test_store_lock_excludes_other_threads_until_released(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    entered = threading.Event()

    def other():
        with store._store_lock(uri):
            entered.set()

    with store._store_lock(uri):
        with store._store_lock(uri):  # nested retry in one thread: no self-deadlock
            pass
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.5)  # blocked while this thread holds it
    assert entered.wait(10)  # and gets it once released
    thread.join(timeout=10)
