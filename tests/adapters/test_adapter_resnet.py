import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from recast.adapters import (
    CLRConv2d,
    PiggybackConfig,
    PiggybackConv2d,
    PiggybackLinear,
    adapter_parameters,
    adapter_payload_bytes,
    adapter_preset,
    add_adapters,
    count_adapter_parameters,
)


def _stage_convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("layer")}


def test_presets_cover_every_stage_conv_and_counts(resnet, x):
    convs = _stage_convs(resnet)
    assert len(convs) == 21  # conv1/2(/3) of 8 blocks + 3 downsample projections
    weights = sum(m.weight.numel() for m in convs.values())
    channels = sum(m.out_channels for m in convs.values())
    pig = add_adapters(resnet, adapter_preset("piggyback"))
    assert sorted(pig) == sorted(convs)
    assert count_adapter_parameters(resnet) == weights == 628_224  # one real per weight in training
    assert adapter_payload_bytes(resnet) == sum((m.weight.numel() + 7) // 8 for m in convs.values()) == 78_528
    clr = add_adapters(resnet, adapter_preset("clr"))  # stacks on top of Piggyback, same names
    assert sorted(clr) == sorted(convs)
    assert count_adapter_parameters(resnet) == weights + 9 * channels == 628_224 + 14_544


@pytest.mark.parametrize("name", ["piggyback", "clr"])
def test_identity_at_init_plain_and_recast(resnet, rc_resnet, x, name):
    for model in (resnet, rc_resnet):
        with torch.no_grad():
            y0 = model(x)
            add_adapters(model.model if model is rc_resnet else model, adapter_preset(name))
            assert (model(x) - y0).abs().max() <= 1e-6


def test_piggyback_threshold_and_straight_through_gradient():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    layer = PiggybackConv2d(conv)
    assert torch.equal(layer.binary_mask(), torch.ones_like(conv.weight))
    with torch.no_grad():
        layer.mask[0].fill_(1e-3)  # below the 5e-3 threshold: output channel 0 is switched off
    assert layer.weight[0].abs().max() == 0 and torch.equal(layer.weight[1:], conv.weight[1:])
    x = torch.randn(2, 4, 9, 9)
    y = layer(x)
    assert y.shape == (2, 6, 5, 5)
    torch.testing.assert_close(y[:, 0], conv.bias[0].expand(2, 5, 5))
    y.square().sum().backward()
    # straight-through: dL/dmask = dL/dW_eff * W, also where the mask is below the threshold
    w_eff = (conv.weight * layer.binary_mask()).detach().requires_grad_(True)
    grad_w = torch.autograd.grad(F.conv2d(x, w_eff, conv.bias, 2, 1).square().sum(), w_eff)[0]
    torch.testing.assert_close(layer.mask.grad, grad_w * conv.weight)
    assert layer.mask.grad[0].abs().sum() > 0
    assert layer.stored_bits == 6 * 4 * 9


def test_piggyback_linear_on_vit(vit, x):
    add_adapters(vit, PiggybackConfig(("attn.proj",)))
    assert isinstance(vit.blocks[0].attn.proj, PiggybackLinear)
    assert count_adapter_parameters(vit) == 6 * 64 * 64


def test_clr_is_depthwise_dirac(resnet):
    add_adapters(resnet, adapter_preset("clr"))
    layer = resnet.layer2[0].downsample[1]
    assert isinstance(layer, CLRConv2d)
    w = layer.reprogram.weight
    assert w.shape == (48, 1, 3, 3) and layer.reprogram.groups == 48 and layer.reprogram.bias is None
    assert torch.equal(w[:, 0, 1, 1], torch.ones(48)) and w.sum() == 48


@pytest.mark.parametrize("name, must_move", [("piggyback", "mask"), ("clr", "reprogram")])
def test_one_step_on_recast_trains_adapter_and_coefficients(rc_resnet, x, name, must_move):
    rc = rc_resnet
    add_adapters(rc.model, adapter_preset(name))
    coefs = {n: layer.coefs["t"].detach().clone() for n, layer in rc.recast_layers()}
    from recast.layers import RECAST_LAYERS

    paths = [n for n, m in rc.model.named_modules() if isinstance(m, RECAST_LAYERS)]
    assert paths and all(n.endswith(".base") for n in paths)  # every templated conv is under an adapter
    assert not any(".base" in n for n in coefs)  # payload names do not depend on adapters
    adapters = adapter_parameters(rc.model)
    before = [p.detach().clone() for p in adapters]
    opt = torch.optim.AdamW([p for p in rc.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    F.cross_entropy(rc.train()(x), torch.tensor([3, 4])).backward()
    opt.step()
    named = {id(p): n for n, p in rc.model.named_parameters()}
    moved = [named[id(p)] for p, b in zip(adapters, before) if not torch.equal(p, b)]
    assert len(moved) == len(adapters) and all(must_move in n for n in moved)
    assert all(not torch.equal(layer.coefs["t"], coefs[n]) for n, layer in rc.recast_layers())


def test_counts_on_resnet34():
    with torch.device("meta"):  # structure only: no memory, no init time
        r34 = timm.create_model("resnet34", pretrained=False)
    convs = _stage_convs(r34)
    pig = copy.deepcopy(r34)
    assert len(add_adapters(pig, adapter_preset("piggyback"))) == len(convs) == 35
    assert count_adapter_parameters(pig) == sum(m.weight.numel() for m in convs.values()) == 21_258_240
    assert adapter_payload_bytes(pig) == 21_258_240 // 8  # 2.66 MB of binary masks per task
    add_adapters(r34, adapter_preset("clr"))
    assert count_adapter_parameters(r34) == 9 * sum(m.out_channels for m in convs.values()) == 76_032
