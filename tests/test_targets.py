import pytest
from torch import nn

from recast import RecastConfig, build_plan, default_layer_key, match_modules
from recast.targets import role_of


def test_layer_key_parsing():
    assert default_layer_key("blocks.3.mlp.fc1") == ("blocks", 3)
    assert default_layer_key("layer2.1.conv1") == ("layer2", 1)
    assert default_layer_key("encoder.layer.5.attention.self.query") == ("encoder.layer", 5)
    assert default_layer_key("stages.1.blocks.2.conv_dw") == ("stages.1.blocks", 2)
    assert default_layer_key("head") is None
    assert role_of("blocks.3.mlp.fc1", ("blocks", 3)) == "mlp.fc1"


def test_match_exact_suffix_regex_exclude(tiny_vit):
    assert len(match_modules(tiny_vit, ["mlp.fc1"])) == 6
    assert match_modules(tiny_vit, ["blocks.0.mlp.fc1"]) == ["blocks.0.mlp.fc1"]
    assert len(match_modules(tiny_vit, [".fc2"])) == 6
    assert len(match_modules(tiny_vit, [r"blocks\.[0-2]\.attn\.qkv"], regex=True)) == 3
    assert len(match_modules(tiny_vit, ["mlp.fc1"], exclude=["blocks.0.mlp.fc1"])) == 5


def test_no_match_error_names_patterns(tiny_vit):
    with pytest.raises(ValueError, match=r"mlp\.nope"):
        match_modules(tiny_vit, ["mlp.nope"])


def test_wrong_type_error(tiny_vit):
    with pytest.raises(ValueError, match="LayerNorm"):
        match_modules(tiny_vit, ["norm1"])


@pytest.mark.parametrize("bad", [dict(groups=4), dict(groups=0), dict(templates=0), dict(coef_sets=0), dict(templates=1.5)])
def test_invalid_grouping(tiny_vit, bad):
    with pytest.raises(ValueError) as err:
        build_plan(tiny_vit, RecastConfig(targets=("mlp.fc1",), **bad))
    assert str(list(bad.values())[0]) in str(err.value)


def test_grouping_eq1(tiny_vit):
    plan = build_plan(tiny_vit, RecastConfig(targets=("mlp.fc1", "mlp.fc2"), groups=3, templates=2, coef_sets=2))
    assert len(plan.banks) == 6  # 2 roles x 3 groups
    fc1 = sorted((m.layer, m.group, m.position) for m in plan.modules if m.role == "mlp.fc1")
    assert fc1 == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1), (4, 2, 0), (5, 2, 1)]
    assert plan.coefficients_per_task == 12 * 2 * 2
    assert plan.effective_coefficients_per_task == 12 * 2


def test_resnet_scheme_group_size(tiny_resnet):
    from recast import preset
    plan = build_plan(tiny_resnet, preset("recast_resnet"))
    n = {b.stack: b.templates for b in plan.banks}
    assert n == {"layer1": 1, "layer2": 2, "layer3": 1, "layer4": 1}
    assert all(m.layer >= 1 for m in plan.modules)


def test_custom_layer_key_on_plain_torch_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
            self.second = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    net = Net()
    with pytest.raises(ValueError, match="layer_key"):
        build_plan(net, RecastConfig(targets=(r"(first|second)\.0",), regex=True, groups=1))
    def key(name):
        return ("net", {"first": 0, "second": 1}[name.split(".")[0]], "linear")
    plan = build_plan(net, RecastConfig(targets=(r"(first|second)\.0",), regex=True, groups=1), layer_key=key)
    assert len(plan.banks) == 1 and plan.banks[0].modules == ("first.0", "second.0")
