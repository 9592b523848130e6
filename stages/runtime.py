"""Where jobs run: the compute device a job uses (``runtime.device``)."""

from __future__ import annotations

import torch


def pick_device(device: str) -> str:
    """Resolve ``auto`` to cuda when a GPU is visible."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no GPU is visible to this process")
    return device
