"""A sequential run stopped at a task boundary resumes from its checkpoint (safetensors bytes +
JSON text, as stored): the accuracy matrix and every tensor of the method (weights, replay
memories, Fisher, masks) equal an uninterrupted run's, bit for bit, for every baseline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

import recast
from recast.baselines import METHODS, TrainConfig, make_method, run_sequential

CFG = TrainConfig(epochs=1, lr=5e-3, seed=0, progress=False)
SMALL = {"gdumb": {"memory_size": 12}, "er_ace": {"memory_size": 12}, "derpp": {"memory_size": 12}}


class Stopped(Exception):
    pass


class BytesCheckpointer:
    def __init__(self, stop_after: int | None = None) -> None:
        self.blob, self.stop_after, self.saved = None, stop_after, []

    def load(self):
        return None if self.blob is None else (load(self.blob[0]), json.loads(self.blob[1]))

    def save(self, tensors, meta) -> None:
        self.blob = (save({k: v.contiguous() for k, v in tensors.items()}), json.dumps(meta))
        self.saved.append(meta["task"])
        if meta["task"] == self.stop_after:
            raise Stopped


def _method(name: str, make_backbone):
    backbone = make_backbone["vit"]()
    if name == "recast":
        rc = recast.apply(backbone, recast.preset("recast_mlp", groups=3), seed=0)
        recast.mimic(rc, recast.MimicryConfig(method="closed_form"))
        return make_method("recast", rc)
    return make_method(name, backbone, SMALL.get(name))


def _state(method) -> dict[str, torch.Tensor]:
    tensors, _ = method.checkpoint_state()
    return tensors


@pytest.mark.parametrize("name", sorted(METHODS))
def test_stopped_after_task_1_resumes_bit_identical(name, make_backbone, make_task):
    tasks = [make_task("a", 2, seed=1, n_train=32, n_test=16), make_task("b", 3, seed=2, n_train=32, n_test=16),
             make_task("c", 2, seed=3, n_train=32, n_test=16)]
    reference = _method(name, make_backbone)
    ref = run_sequential(reference, tasks, CFG)
    store = BytesCheckpointer(stop_after=1)
    with pytest.raises(Stopped):
        run_sequential(_method(name, make_backbone), tasks, CFG, checkpoint=store)
    torch.manual_seed(12345)  # the retry's process: another global RNG state
    store.stop_after = None
    resumed = _method(name, make_backbone)
    res = run_sequential(resumed, tasks, CFG, checkpoint=store)
    assert res.resumed_task == 1 and store.saved == [1, 2, 3]
    assert res.acc_matrix == ref.acc_matrix and res.val_acc == ref.val_acc
    assert res.trainable_params == ref.trainable_params and res.training_state_bytes == ref.training_state_bytes
    want, got = _state(reference), _state(resumed)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
