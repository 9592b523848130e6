"""Where jobs run: the compute device a job uses (``runtime.device``, ``runtime.gpus_per_task``)."""

from __future__ import annotations

import torch

from stages.config.params import RuntimeParams


def pick_device(device: str) -> str:
    """Resolve ``auto`` to cuda when a GPU is visible to this process."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no GPU is visible to this process")
    return device


def job_device(rt: RuntimeParams) -> str:
    """The device each Ray job is told to use (``spec["device"]``).

    A job may use a GPU only when Ray reserves one for it, so this follows ``gpus_per_task``
    rather than the driver's hardware (the driver of a cluster run often has no GPU): ``auto``
    means cuda when ``gpus_per_task > 0``, else cpu; ``cuda`` needs ``gpus_per_task > 0``.
    """
    if rt.device == "cuda" and rt.gpus_per_task == 0:
        raise ValueError("runtime.device is 'cuda' but runtime.gpus_per_task is 0: Ray would give the jobs no GPU")
    if rt.device == "auto":
        return "cuda" if rt.gpus_per_task > 0 else "cpu"
    return rt.device
