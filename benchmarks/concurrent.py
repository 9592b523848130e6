"""Load from several threads at once: each worker's calls in turn, all workers released together."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def released_together(workers: list[Callable[[], None]]) -> float:
    """Start one thread per worker, release them at once, wait for all: the wall seconds from the
    release. A worker's exception is re-raised here (the first one)."""
    barrier = threading.Barrier(len(workers) + 1)
    errors: list[BaseException] = []

    def run(fn: Callable[[], None]) -> None:
        barrier.wait()
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in workers]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start
