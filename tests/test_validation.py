"""recast.validation: the library configs' fields are checked by pydantic (strict), and the errors
name the field, the rule and the value as the hand-written checks did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from recast.adapters.config import AdapterConfig
from recast.config import MimicryConfig, RecastConfig
from recast.validation import AtLeast1


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=0), "groups must be an integer >= 1, got 0"),
    (dict(groups=2.0), "groups must be an integer >= 1, got 2.0"),
    (dict(coef_sets=True), "coef_sets must be an integer >= 1, got True"),  # a bool is not an int
    (dict(templates=0), "templates must be an integer >= 1 or 'group_size', got 0"),
    (dict(min_layer=-1), "min_layer must be an integer >= 0, got -1"),
    (dict(bn_stats="running"), "bn_stats must be one of ('frozen', 'per_task'), got 'running'"),
    (dict(base_task=""), "RecastConfig.base_task must be a non-empty string, got ''"),
])
def test_recast_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        RecastConfig(targets="mlp.fc1", **kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="svd"), "method must be one of ('closed_form', 'gradient', 'refine', 'vae'), got 'svd'"),
    (dict(eval_every=0), "eval_every must be an integer >= 1, got 0"),
    (dict(lr=-0.1), "lr must be a number >= 0, got -0.1"),
    (dict(steps=-1), "steps must be an integer >= 0, got -1"),
])
def test_mimicry_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        MimicryConfig(**kwargs)
    assert str(err.value) == message


def test_valid_values_pass_unchanged():
    cfg = MimicryConfig(lr=1, grad_clip=None, role_weights={"conv1": 3.5})  # an int is a number
    assert (cfg.lr, cfg.grad_clip, cfg.role_weights) == (1, None, {"conv1": 3.5})
    assert RecastConfig(targets="x", templates="group_size").templates == "group_size"


def test_a_subclass_written_with_plain_dataclass_gets_its_own_fields_checked():
    @dataclass(frozen=True)
    class WidthConfig(AdapterConfig):
        kind: ClassVar[str] = "width_test"
        width: AtLeast1 = 1

    assert WidthConfig(("mlp",), width=3).width == 3
    with pytest.raises(ValueError, match=r"^WidthConfig.width must be an integer >= 1, got 0$"):
        WidthConfig(("mlp",), width=0)
