"""A sequential run stopped at a task boundary, or after an epoch inside a task, resumes from its
checkpoint (safetensors bytes + JSON text, as stored): the accuracy matrix and every tensor of the
method (weights, replay memories and their generators, Fisher, masks, prompts, InfLoRA's
branches) equal an uninterrupted run's, bit for bit, for every baseline."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load, save

import recast
from recast.baselines import METHODS, TrainConfig, make_method, run_sequential
from recast.checkpoint import CheckpointMismatchError
from recast.io import tensors_sha256

CFG = TrainConfig(epochs=2, lr=5e-3, step_size=1, gamma=0.5, seed=0, progress=False)  # multi-epoch, a schedule
SMALL = {"gdumb": {"memory_size": 12}, "er_ace": {"memory_size": 12}, "derpp": {"memory_size": 12}}


class Stopped(Exception):
    pass


class BytesCheckpointer:
    """The last checkpoint as stored bytes (safetensors + JSON text); raises ``Stopped`` once
    the checkpoint named ``stop_at`` (its ``meta["point"]``) is saved."""

    def __init__(self, stop_at: str | None = None) -> None:
        self.blob, self.stop_at, self.saved = None, stop_at, []

    def load(self):
        return None if self.blob is None else (load(self.blob[0]), json.loads(self.blob[1]))

    def save(self, tensors, meta) -> None:
        self.blob = (save({k: v.contiguous() for k, v in tensors.items()}), json.dumps(meta))
        self.saved.append(meta["point"])
        if meta["point"] == self.stop_at:
            raise Stopped


def _method(name: str, make_backbone):
    if name.endswith("+dropout"):
        torch.manual_seed(0)
        backbone = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, drop_rate=0.1,
                                     proj_drop_rate=0.1, drop_path_rate=0.1)
        return make_method(name.removesuffix("+dropout"), backbone)
    backbone = make_backbone["vit"]()
    if name == "recast":
        rc = recast.apply(backbone, recast.preset("recast_mlp", groups=3), seed=0)
        recast.mimic(rc, recast.MimicryConfig(method="closed_form"))
        return make_method("recast", rc)
    return make_method(name, backbone, SMALL.get(name))


def _state(method) -> dict[str, torch.Tensor]:
    tensors, _ = method.checkpoint_state()
    return tensors


def _tasks(make_task):
    return [make_task("a", 2, seed=1, n_train=32, n_test=16), make_task("b", 3, seed=2, n_train=32, n_test=16),
            make_task("c", 2, seed=3, n_train=32, n_test=16)]


_REFERENCES: dict[str, tuple] = {}


def _reference(name, make_backbone, make_task):
    """The uninterrupted run of ``name`` (no checkpoints), once per module."""
    if name not in _REFERENCES:
        method = _method(name, make_backbone)
        _REFERENCES[name] = (run_sequential(method, _tasks(make_task), CFG), _state(method))
    return _REFERENCES[name]


def _points(name: str) -> list[str]:
    """Every checkpoint of a run, in order: each task's epochs (LwF: its warm-up's too, from the
    second task on), then the task."""
    out = []
    for j in range(3):
        epochs = CFG.epochs * (2 if name == "lwf" and j > 0 else 1)  # LwF: warm-up epochs = epochs
        out += [f"task:{j}:epoch:{k}" for k in range(1, epochs + 1)] + [f"task:{j + 1}"]
    return out


# stopped after a task (task:1), after epoch 1 of task 1 (of 2; LwF: of its warm-up); after task 1's
# last epoch (the loader must be left where it was: EWC's Fisher, InfLoRA's covariances iterate it
# after the task); for LwF, after epoch 1 of task 1's training after the warm-up (task epoch 3); and
# a backbone with dropout (training draws from torch's global RNG)
STOPS = ([(n, p) for n in sorted(METHODS) for p in ("task:1", "task:1:epoch:1")]
         + [("ewc", "task:1:epoch:2"), ("inflora", "task:1:epoch:2"), ("lwf", "task:1:epoch:3"),
            ("finetune_full+dropout", "task:1:epoch:1")])


@pytest.mark.parametrize("name, stop", STOPS)
def test_stopped_run_resumes_bit_identical(name, stop, make_backbone, make_task):
    ref, want = _reference(name, make_backbone, make_task)
    store = BytesCheckpointer(stop_at=stop)
    with pytest.raises(Stopped):
        run_sequential(_method(name, make_backbone), _tasks(make_task), CFG, checkpoint=store)
    torch.manual_seed(12345)  # the retry's process: other global RNG states, fresh loaders
    np.random.seed(12345)
    random.seed(12345)
    store.stop_at = None
    resumed = _method(name, make_backbone)
    res = run_sequential(resumed, _tasks(make_task), CFG, checkpoint=store)
    epoch = int(stop.rsplit(":", 1)[1]) if ":epoch:" in stop else 0
    assert (res.resumed_task, res.resumed_epoch) == (1, epoch)
    assert store.saved == _points(name)  # the stopped run's, then the retry's from the next one on
    assert res.acc_matrix == ref.acc_matrix and res.val_acc == ref.val_acc
    assert res.trainable_params == ref.trainable_params and res.training_state_bytes == ref.training_state_bytes
    assert res.state_sha256 == ref.state_sha256 == tensors_sha256(want)
    got = _state(resumed)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_a_checkpoint_from_a_later_phase_than_the_run_has_is_refused(make_backbone, make_task):
    """LwF stopped in task 1's training after its warm-up (phase 1); a run without warm-up has one
    phase per task, so it would never reach that state: a named error, not a silently wrong run."""
    store = BytesCheckpointer(stop_at="task:1:epoch:3")
    with pytest.raises(Stopped):
        run_sequential(_method("lwf", make_backbone), _tasks(make_task), CFG, checkpoint=store)
    no_warmup = make_method("lwf", make_backbone["vit"](), {"warmup_epochs": 0})
    with pytest.raises(CheckpointMismatchError) as caught:
        run_sequential(no_warmup, _tasks(make_task), CFG, checkpoint=store)
    assert caught.value.problem == "checkpoint in phase 1 of task 'b'; this run's training of it has 1 phase(s)"
    assert pickle.loads(pickle.dumps(caught.value)).problem == caught.value.problem  # crosses Ray intact
