"""What every benchmark records beside its figures: date, machine load and library versions."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import timm
import torch

import recast
from recast.machine import cpu_model


def environment(device: str = "cpu") -> dict:
    """Date, load average (1/5/15 min), CPUs, torch threads, device and library versions."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_avg_1_5_15": [round(v, 2) for v in load],
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "processor": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "recast": recast.__version__,
    }
