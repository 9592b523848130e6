import copy

import torch
from peft.tuners.lora import Linear as PeftLoraLinear

from recast.adapters import DoRAConfig, LoRAConfig, add_adapters, count_adapter_parameters, peft_lora


def _peft_layers(peft_model):
    return {n.replace("base_model.model.", ""): m for n, m in peft_model.named_modules() if isinstance(m, PeftLoraLinear)}


def _randomise(layer, g):
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_our_lora_matches_peft_lora(vit, x):
    ours = copy.deepcopy(vit)
    names = add_adapters(ours, LoRAConfig(("attn.qkv",), rank=4, alpha=8.0))
    ref = peft_lora(copy.deepcopy(vit), ("attn.qkv",), rank=4, alpha=8.0)
    layers = _peft_layers(ref)
    assert sorted(layers) == sorted(names)
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        _randomise(layer, g)
        mine = ours.get_submodule(name)
        assert mine.scale == layer.scaling["default"] == 2.0
        with torch.no_grad():
            mine.lora_A[0].copy_(layer.lora_A["default"].weight)  # (r, in)
            mine.lora_B[0].copy_(layer.lora_B["default"].weight)  # (out, r)
    with torch.no_grad():
        y_ref, y_ours, y_base = ref(x), ours(x), vit(x)
    assert (y_ours - y_ref).abs().max() <= 1e-6
    assert (y_ours - y_base).abs().max() > 1e-2  # non-trivial deltas
    # same trainable budget as PEFT's adapters
    peft_trainable = sum(p.numel() for n, p in ref.named_parameters() if "lora_" in n)
    assert count_adapter_parameters(ours) == peft_trainable == 6 * 4 * (64 + 192)


def test_our_dora_matches_peft_dora(vit, x):
    ours = copy.deepcopy(vit)
    add_adapters(ours, DoRAConfig(("attn.qkv",), rank=2))
    ref = peft_lora(copy.deepcopy(vit), "blocks\\.\\d+\\.attn\\.qkv", rank=2, use_dora=True)  # regex form
    g = torch.Generator().manual_seed(1)
    for name, layer in _peft_layers(ref).items():
        _randomise(layer, g)
        mine = ours.get_submodule(name)
        magnitude = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(mine.magnitude, magnitude)  # same init: row norms of W
        with torch.no_grad():
            magnitude.mul_(1.0 + 0.2 * torch.rand(magnitude.shape, generator=g))
            mine.magnitude.copy_(magnitude)
            mine.lora_A.copy_(layer.lora_A["default"].weight)
            mine.lora_B.copy_(layer.lora_B["default"].weight)
    with torch.no_grad():
        y_ref, y_ours, y_base = ref(x), ours(x), vit(x)
    assert (y_ours - y_ref).abs().max() <= 1e-6
    assert (y_ours - y_base).abs().max() > 1e-2
    peft_trainable = sum(p.numel() for n, p in ref.named_parameters() if p.requires_grad)
    assert count_adapter_parameters(ours) == peft_trainable == 6 * (2 * (64 + 192) + 192)


def test_peft_baseline_trains_only_adapters_and_head(vit):
    model = peft_lora(vit, (".attn.qkv",), rank=1, modules_to_save=("head",))  # our .suffix form works
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "head" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n) == 6 * (64 + 192)
