"""``fit`` checkpoints at epoch boundaries (``recast.checkpoint``): a run stopped after epoch k and
resumed from its checkpoint (through safetensors bytes and JSON text, as stored) ends with the
same tensors, bit for bit, as a run never stopped; a checkpoint of another run is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from recast.checkpoint import CheckpointMismatchError
from recast.training import TuneConfig, fit

CFG = TuneConfig(epochs=4, lr=5e-2, step_size=2, gamma=0.5, grad_clip=0.5, progress=False)


class Stopped(Exception):
    pass


class BytesCheckpointer:
    """Keeps the last checkpoint as it would be on disk: safetensors bytes + JSON text.
    ``stop_after``: raise after saving that epoch (a killed worker)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.blob: tuple[bytes, str] | None = None
        self.stop_after = stop_after
        self.saved_epochs: list[int] = []

    def load(self):
        return None if self.blob is None else (load(self.blob[0]), json.loads(self.blob[1]))

    def save(self, tensors, meta) -> None:
        self.blob = (save(tensors), json.dumps(meta))
        self.saved_epochs.append(meta["epoch"])
        if meta["epoch"] == self.stop_after:
            raise Stopped


def _run(checkpoint=None, width: int = 24):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, width), nn.GELU(), nn.Dropout(0.3), nn.Linear(width, 3))  # dropout: RNG
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 12, generator=gen), torch.randint(0, 3, (96,), generator=gen)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]
    torch.manual_seed(123)  # the global RNG the dropout draws from
    res = fit(model, list(model.parameters()), batches, batches[:2], CFG, checkpoint=checkpoint)
    return model, res


def test_resumed_fit_is_bit_identical_to_an_uninterrupted_one():
    reference, ref_res = _run()
    store = BytesCheckpointer(stop_after=2)
    with pytest.raises(Stopped):
        _run(store)
    torch.manual_seed(999)  # the retry's process has another RNG state: the checkpoint's must win
    store.stop_after = None
    resumed, res = _run(store)
    assert res.resumed_epoch == 2 and store.saved_epochs == [1, 2, 3, 4]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert res.history == ref_res.history and (res.best_epoch, res.best_val_acc) == (ref_res.best_epoch,
                                                                                       ref_res.best_val_acc)
    assert res.steps == ref_res.steps == 24


def test_resume_with_a_wrong_rng_state_differs():
    """The dropout masks depend on the restored RNG: the bit-identity test can see a wrong resume."""
    reference, _ = _run()
    store = BytesCheckpointer(stop_after=2)
    with pytest.raises(Stopped):
        _run(store)
    tensors, meta = store.load()
    tensors["rng.cpu"] = torch.manual_seed(999).get_state()  # a wrong RNG state
    store.blob, store.stop_after = (save(tensors), json.dumps(meta)), None
    resumed, _ = _run(store)
    assert not all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))


def test_checkpoint_of_another_run_is_refused():
    store = BytesCheckpointer(stop_after=1)
    with pytest.raises(Stopped):
        _run(store, width=24)
    store.stop_after = None
    with pytest.raises(CheckpointMismatchError, match=r"shapes \[\[24, 12\].*this run trains 4 of shapes \[\[16, 12\]"):
        _run(store, width=16)


def test_named_errors_survive_pickling():
    """They cross Ray's process boundary inside a JobError."""
    import pickle

    from recast.training import PrecisionError

    for err in (CheckpointMismatchError("other shapes"), PrecisionError("fp16", "cpu")):
        again = pickle.loads(pickle.dumps(err))
        assert (type(again), str(again)) == (type(err), str(err))
