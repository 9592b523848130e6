"""The training state of ``recast.training.fit`` at an epoch boundary, as safetensors tensors plus
a JSON-able dict (never pickle), so that a job killed mid-training resumes where it stopped.

What is kept: the trained tensors (and BatchNorm buffers when they train), the optimizer's state
(AdamW/SGD moments and step counts), the scheduler's and the grad scaler's state, torch's RNG
states, the best epoch so far (its tensors, accuracy, index), the history and the step counters.
Resuming from it gives the same tensors, bit for bit, as never stopping (the loaders' order
depends on (seed, epoch) only, see ``recast.data.loader``).

Where the two parts are stored is the caller's business (``Checkpointer``): the library does no
I/O of its own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

FORMAT = "recast-fit-checkpoint/1"


class Checkpointer(Protocol):
    """Storage of the last checkpoint of one training run."""

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The last complete checkpoint (tensors, meta), or None to start at epoch 0."""

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Keep this checkpoint (atomically: a torn write must not replace the previous one)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit this run (other parameter shapes or count, other recipe)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


def pack_optimizer(opt: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as tensors (``<prefix>.<param index>.<name>``) and JSON (groups,
    and the non-tensor state entries)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{name}"] = value.detach().cpu().clone()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unpack_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                     prefix: str = "opt") -> None:
    """Load what ``pack_optimizer`` wrote into ``opt`` (built over the same parameters)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def pack_rng_states(device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every global RNG a training step may draw from: torch's (CPU, and CUDA on a CUDA device) as
    tensors, numpy's legacy global state (its key as a tensor, the rest JSON) and Python's
    ``random`` (JSON)."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(torch.device(device))
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    tensors["rng.numpy"] = torch.from_numpy(key.astype(np.int64))
    version, state, next_gauss = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(state), next_gauss]}


def unpack_rng_states(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: str | torch.device) -> None:
    """Set the global RNGs to what ``pack_rng_states`` saved."""
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], torch.device(device))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, next_gauss = meta["python"]
    random.setstate((version, tuple(state), next_gauss))


def pack_fit_state(
    epoch: int, trained: Sequence[torch.Tensor], opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None, scaler: torch.amp.GradScaler,
    best: tuple[float, int, Sequence[torch.Tensor] | None], history: list[dict], counters: dict[str, float],
    device: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of ``fit`` after ``epoch`` finished epochs (see the module docstring)."""
    tensors = {f"trained.{i}": t.detach().cpu().clone() for i, t in enumerate(trained)}
    best_acc, best_epoch, best_state = best
    if best_state is not None:
        tensors.update({f"best.{i}": t.detach().cpu().clone() for i, t in enumerate(best_state)})
    opt_tensors, opt_meta = pack_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.device(device).type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(torch.device(device))
    meta = {
        "format": FORMAT, "epoch": epoch, "trained": len(trained), "shapes": [list(t.shape) for t in trained],
        "best_acc": best_acc, "best_epoch": best_epoch, "has_best": best_state is not None,
        "optimizer": opt_meta, "scheduler": sched.state_dict() if sched is not None else None,
        "scaler": scaler.state_dict(), "history": history, "counters": counters,
    }
    return tensors, meta


def unpack_fit_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], trained: Sequence[torch.Tensor],
    opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler | None, scaler: torch.amp.GradScaler,
    device: str,
) -> tuple[int, tuple[float, int, list[torch.Tensor] | None], list[dict], dict[str, float]]:
    """Restore ``pack_fit_state``'s checkpoint in place; return (epoch, best, history, counters).

    Raises:
        CheckpointMismatchError: the checkpoint belongs to another run (format, tensor count or shapes).
    """
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    shapes = [list(t.shape) for t in trained]
    if meta["trained"] != len(trained) or meta["shapes"] != shapes:
        raise CheckpointMismatchError(f"checkpoint holds {meta['trained']} tensors of shapes {meta['shapes']}; "
                                      f"this run trains {len(trained)} of shapes {shapes}")
    if (sched is None) != (meta["scheduler"] is None):
        raise CheckpointMismatchError("checkpoint and run differ in having a learning-rate schedule")
    with torch.no_grad():
        for i, t in enumerate(trained):
            t.copy_(tensors[f"trained.{i}"])
    best_state = None
    if meta["has_best"]:
        best_state = [tensors[f"best.{i}"].to(trained[i].device) for i in range(len(trained))]
    unpack_optimizer(opt, tensors, meta["optimizer"])  # load_state_dict moves the moments to the parameters' device
    if sched is not None:
        sched.load_state_dict(meta["scheduler"])
    if meta["scaler"]:  # empty for a disabled (fp32/bf16) scaler
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], torch.device(device))
    return meta["epoch"], (meta["best_acc"], meta["best_epoch"], best_state), meta["history"], meta["counters"]
