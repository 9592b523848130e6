import pytest
import torch
from adapter_helpers import perturb
from torch import nn

from recast import RecastLinear
from recast.adapters import (
    AdapterWrapper,
    AdaptFormerMLP,
    CLRConv2d,
    LoRAConfig,
    adapter_parameters,
    adapter_preset,
    add_adapters,
    count_adapter_parameters,
    merge_adapters,
)

VIT_MERGEABLE = ["lora", "melo", "dora", "rosa", "rosa_spa_mlp"]


def _check_merge(model, x, tol):
    with torch.no_grad():
        y = model(x)
        merge_adapters(model)
        y_merged = model(x)
    assert not any(isinstance(m, AdapterWrapper) and m.mergeable for m in model.modules())
    assert (y_merged - y).abs().max() <= tol
    return y


@pytest.mark.parametrize("name", VIT_MERGEABLE)
def test_merge_equals_unmerged_plain_vit(vit, x, name):
    with torch.no_grad():
        y0 = vit(x)
    add_adapters(vit, adapter_preset(name))
    perturb(adapter_parameters(vit))
    y = _check_merge(vit, x, tol=1e-5)
    assert (y - y0).abs().max() > 1e-3  # the deltas were not trivial
    assert type(vit.blocks[0].attn.qkv) is nn.Linear and type(vit.blocks[0].mlp.fc1) is nn.Linear


@pytest.mark.parametrize("name", VIT_MERGEABLE + ["adaptformer"])
def test_merge_equals_unmerged_on_materialized_recast(vit, rc_vit, x, name):
    rc = rc_vit
    add_adapters(rc.model, adapter_preset(name))
    perturb(adapter_parameters(rc.model))
    if name != "adaptformer":  # a delta cannot be folded into a RecastLinear
        with pytest.raises(ValueError, match="materialize"):
            merge_adapters(rc.model)
    with torch.no_grad():
        y_rc = rc.eval()(x)
    plain = rc.materialize("t").eval()
    assert not any(isinstance(m, RecastLinear) for m in plain.modules())  # adapters now wrap plain layers
    y = _check_merge(plain, x, tol=1e-5)
    assert (y - y_rc).abs().max() <= 1e-5
    # merged: the original architecture's parameters (rc_vit was built from a copy of vit), plus
    # AdaptFormer's branches, which stay
    extra = 6 * (64 * 8 + 8 + 8 * 64 + 64) if name == "adaptformer" else 0
    assert count_adapter_parameters(plain) == extra
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in vit.parameters()) + extra


@pytest.mark.parametrize("use_recast", [False, True])
def test_piggyback_merge_resnet(resnet, rc_resnet, x, use_recast):
    model = rc_resnet.model if use_recast else resnet
    add_adapters(model, adapter_preset("piggyback"))
    perturb(adapter_parameters(model), scale=0.01)  # about a third of the masks drop below 5e-3
    zeros = sum(int((m.binary_mask() == 0).sum()) for m in model.modules() if hasattr(m, "binary_mask"))
    assert 0.2 * 628_224 < zeros < 0.5 * 628_224
    plain = rc_resnet.materialize("t").eval() if use_recast else model
    _check_merge(plain, x, tol=1e-4)
    assert all(type(m) is nn.Conv2d for n, m in plain.named_modules() if n.startswith("layer") and n.endswith("conv1"))


def test_branches_stay_and_their_insides_merge(vit, resnet, x):
    add_adapters(vit, adapter_preset("adaptformer"))
    add_adapters(vit, LoRAConfig(("mlp.fc1", "mlp.fc2"), rank=2))
    perturb(adapter_parameters(vit))
    _check_merge(vit, x, tol=1e-5)
    assert isinstance(vit.blocks[3].mlp, AdaptFormerMLP) and type(vit.blocks[3].mlp.base.fc1) is nn.Linear
    add_adapters(resnet, adapter_preset("piggyback"))
    add_adapters(resnet, adapter_preset("clr"))
    perturb(adapter_parameters(resnet), scale=0.01)
    _check_merge(resnet, x, tol=1e-4)
    assert isinstance(resnet.layer1[1].conv2, CLRConv2d) and type(resnet.layer1[1].conv2.base) is nn.Conv2d
