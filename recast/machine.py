"""What a run's floating-point results depend on besides its params, code and inputs.

Same params give the same bytes only on the same kind of CPU with the same torch thread count:
torch picks its vectorised CPU kernels (ATen, MKL's GEMM, oneDNN) from the CPU it finds (AVX2,
AVX512, ...), and these sum in different orders, as do reductions split over another number of
threads. ``machine_record`` names those factors; each job stores it beside its metrics and its
MLflow run carries it as tags (``machine_tags``), so two runs can be compared knowingly.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

# Environment variables that change which CPU kernels torch, MKL and oneDNN dispatch to.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``: psutil does not report it), else ``platform.processor()`` or
    the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_record() -> dict[str, Any]:
    """The CPU model, torch's CPU kernel capability, the torch thread count now, the torch version
    and any kernel-selecting environment variable that is set."""
    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "kernel_env": " ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if os.environ.get(k)),
    }


def machine_tags(record: dict[str, Any] | None = None) -> dict[str, str]:
    """MLflow tags of ``record`` (default: this process now): ``cpu.model``,
    ``torch.cpu_capability``, ``torch.threads``, ``torch.version``, ``torch.kernel_env``."""
    r = machine_record() if record is None else record
    return {"cpu.model": str(r.get("cpu_model", "")), "torch.cpu_capability": str(r.get("cpu_capability", "")),
            "torch.threads": str(r.get("torch_threads", "")), "torch.version": str(r.get("torch_version", "")),
            "torch.kernel_env": str(r.get("kernel_env", "")) or "none"}
