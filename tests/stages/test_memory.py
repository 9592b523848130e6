"""Per-job peak memory: never below the resident size at the job's start, and it sees a job's
own allocation after the reset (Linux)."""

import mmap
import sys

import pytest

from stages.jobs.memory import current_rss_mb, peak_memory, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux")
def test_peak_is_at_least_the_start_and_sees_an_allocation():
    reset_peak_memory()
    start = current_rss_mb()
    assert peak_memory(start_rss_mb=start + 0.5)["peak_rss_mb"] >= start + 0.5  # lazily updated VmHWM never wins below
    # 64 MiB of fresh anonymous pages, touched: malloc could reuse freed pages already resident
    # in a long test process (RSS did not grow at all once, at 1.5 GB)
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\x01" * (64 * 2**20))
    during = current_rss_mb()
    block.close()
    peak = peak_memory(start_rss_mb=start)["peak_rss_mb"]
    assert during - start > 48 and peak >= during - 1.0, (start, during, peak)
