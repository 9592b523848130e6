"""Bad params fail at validation, before any compute, naming the key: infinite floats (NaN already
failed every range check), empty
or duplicated task/seed lists, a boolean epoch count, adapter options on a non-adapter method."""

from __future__ import annotations

import copy
import math

import pytest
import yaml

from stages.config.common import REPO_ROOT, ParamsError
from stages.config.validate import validate_all


@pytest.fixture(scope="module")
def default_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def _set(params: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(params)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize("path, value, key", [
    (("tune", "train", "lr"), math.inf, "tune.train.lr"),
    (("tune", "train", "gamma"), math.inf, "tune.train.gamma"),
    (("tune", "methods", "recast", "lr"), math.inf, "tune.methods.recast.lr"),
    (("tune", "train", "grad_clip"), math.inf, "tune.train.grad_clip"),
    (("tune", "continual", "lr"), 0.001, "tune.continual.lr"),        # equal budget: no lr of their own
    (("tune", "continual", "epochs"), 3, "tune.continual.epochs"),    # ... and no epochs of their own
    (("pretrain", "lr"), math.inf, "pretrain.lr"),
    (("pretrain", "weight_decay"), math.inf, "pretrain.weight_decay"),
    (("tune", "tasks"), [], "tune.tasks"),
    (("tune", "seeds"), [], "tune.seeds"),
    (("tune", "tasks"), ["mnist_lo5", "uci_digits", "mnist_lo5"], "tune.tasks"),
    (("tune", "seeds"), [1, 2, 1], "tune.seeds"),
    (("tune", "train", "epochs"), True, "tune.train.epochs"),
    (("tune", "methods", "head_only", "overrides"), {"rank": 4}, "tune.methods.head_only"),
    (("tune", "methods", "head_only", "adapter"), "lora_tiny", "tune.methods.head_only"),
    (("tune", "methods", "recast", "recast"), True, "tune.methods.recast"),
])
def test_bad_value_fails_naming_the_key(default_params, path, value, key):
    validate_all(default_params)  # the defaults pass
    with pytest.raises(ParamsError) as err:
        validate_all(_set(default_params, path, value))
    assert key in str(err.value), str(err.value)
