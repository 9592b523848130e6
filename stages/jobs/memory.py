"""Peak memory of one trial or phase inside a long-lived process (a reused Ray worker).

``reset_peak_memory`` clears the resident-set high-water mark (Linux ``/proc/self/clear_refs``,
value 5) and the CUDA peak; ``peak_memory`` then reads the peak since that reset (``VmHWM``), so a
worker's earlier, larger trials do not inflate a later one. Where the reset is not possible the
process-lifetime peak (``ru_maxrss``) is reported instead. The resident size now comes from psutil.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import psutil
import torch


def reset_peak_memory(device: str = "cpu") -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``) and the CUDA peak, where possible.

    Returns:
        Whether the RSS high-water mark was reset (else ``peak_memory`` reports the process
        lifetime peak).
    """
    # psutil reads RSS but has no high-water mark it can reset: that needs the kernel's own
    # interface (clear_refs + VmHWM, Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = _high_water_mb() is not None
    except OSError:
        reset = False  # not Linux or not permitted: peak_memory falls back to the process lifetime peak
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return reset


def _high_water_mb() -> float | None:
    """``VmHWM`` of ``/proc/self/status`` (MiB): psutil does not expose it."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) / 1024.0 if found else None


def lifetime_peak_mb() -> float:
    """The process-lifetime peak RSS (``ru_maxrss``; MiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # macOS reports bytes, Linux KiB


def current_rss_mb() -> float:
    """Resident memory of this process now (MiB; psutil)."""
    return psutil.Process().memory_info().rss / 2**20


def peak_memory(device: str = "cpu", start_rss_mb: float = 0.0) -> dict[str, float]:
    """Peak resident memory since ``reset_peak_memory`` (MiB), and peak CUDA memory on GPU.

    The kernel updates ``VmHWM`` lazily, so it can read a fraction of a MiB below the resident
    size measured just after the reset (``start_rss_mb``) or now: the peak is the largest of the
    three."""
    hwm = _high_water_mb()
    hwm = hwm if hwm is not None else lifetime_peak_mb()
    out = {"peak_rss_mb": max(hwm, current_rss_mb(), start_rss_mb)}
    if device == "cuda" and torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
