"""Runtime settings shared by the fan-out stages: Ray resources, retries, device, MLflow."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.common import Section


class RuntimeParams(Section):
    """``runtime`` section of params.yaml.

    Ray is local unless RAY_ADDRESS is set (then ``num_cpus`` is ignored: the cluster's count);
    MLflow uses an sqlite store under the repo unless MLFLOW_TRACKING_URI is set.
    """

    num_cpus: int = Field(2, ge=1)
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(0.0, ge=0)
    max_retries: int = Field(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    experiment: str = "recast"
    cache_dir: str = "outputs/.jobcache"
    progress: bool = True


def pick_device(device: str) -> str:
    """Resolve ``auto`` to cuda when a GPU is visible."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but no GPU is visible to this process")
    return device
