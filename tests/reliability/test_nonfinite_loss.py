"""A NaN or infinite training loss stops the job with a named error (issue 15, probe 5).

Before: ``fit`` and the continual baselines' loop trained on and returned NaN parameters (exit 0,
a registered NaN payload). After: ``NonFiniteLossError`` at the first non-finite loss, naming
the loop, epoch and step; the error survives pickling, so a Ray job's failure reaches the driver."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from recast.baselines.method import train_epochs
from recast.checks import NonFiniteLossError
from recast.training import TuneConfig, fit


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def _loss_turning_nan(at_call: int):
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == at_call else loss

    return loss_fn


def test_fit_stops_at_the_first_nan_loss_and_leaves_the_weights_finite():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"tune\[x\]: the training loss is nan at epoch 1, step 4"):
        fit(model, list(model.parameters()), _batches(), _batches(), TuneConfig(epochs=3, lr=0.1, progress=False),
            loss_fn=_loss_turning_nan(5), desc="tune[x]")
    assert torch.isfinite(model.weight).all()  # the NaN step never reached the optimiser
    assert not torch.equal(model.weight, before)  # the four finite steps did


def test_an_infinite_learning_rate_is_caught_by_the_loss_check():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    with pytest.raises(NonFiniteLossError, match=r"the training loss is (nan|inf) at epoch 0"):
        fit(model, list(model.parameters()), _batches(), _batches(),
            TuneConfig(epochs=2, lr=1e38, grad_clip=None, optimizer="sgd", progress=False))


def test_the_continual_training_loop_stops_too():
    class Tiny(nn.Module):
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def before_step(self):
            pass

        def after_step(self):
            pass

    method = Tiny()
    loss = _loss_turning_nan(2)
    with pytest.raises(NonFiniteLossError, match=r"lwf:t1: the training loss is nan at epoch 0, step 1"):
        train_epochs(method, _batches(), lambda b: loss(method.lin(b[0]), b[1]), list(method.parameters()),
                     TuneConfig(epochs=1, lr=0.1, progress=False), desc="lwf:t1")


def test_the_error_survives_pickling_with_its_message():
    err = NonFiniteLossError("tune[x]: the training loss is inf at epoch 0, step 0")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is NonFiniteLossError and str(back) == str(err)
