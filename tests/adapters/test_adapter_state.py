import copy

import pytest
import torch
from adapter_helpers import perturb
from safetensors.torch import load_file, save_file

from recast.adapters import (
    adapter_parameters,
    adapter_payload_bytes,
    adapter_preset,
    adapter_state,
    add_adapters,
    load_adapter_state,
)


@pytest.mark.parametrize("name", ["melo", "dora", "rosa", "adaptformer"])
def test_state_roundtrip_through_safetensors(vit, x, tmp_path, name):
    fresh = copy.deepcopy(vit)
    add_adapters(vit, adapter_preset(name))
    add_adapters(fresh, adapter_preset(name, seed=1))  # another random init (and RoSA support)
    perturb(adapter_parameters(vit))
    state = adapter_state(vit)
    assert all(".base." not in k for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "t.safetensors"))
    load_adapter_state(fresh, load_file(str(tmp_path / "t.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh(x), vit(x))


def test_rosa_state_has_its_support_and_payload_bytes(vit):
    add_adapters(vit, adapter_preset("rosa_spa_mlp"))
    state = adapter_state(vit)
    assert set(state) == {f"blocks.{i}.mlp.{fc}.{t}" for i in range(6) for fc in ("fc1", "fc2")
                          for t in ("sparse_index", "sparse_values")}
    assert sum(v.numel() for k, v in state.items() if k.endswith("values")) == 144
    assert adapter_payload_bytes(vit) == 144 * 4 + 144 * 8  # float32 values + int64 indices


def test_load_rejects_a_state_of_another_structure(vit, resnet):
    add_adapters(vit, adapter_preset("lora"))
    state = adapter_state(vit)
    other = copy.deepcopy(vit)
    add_adapters(resnet, adapter_preset("clr"))
    with pytest.raises(ValueError, match="missing .*unexpected"):
        load_adapter_state(resnet, state)
    bad = dict(state)
    bad["blocks.0.attn.qkv.lora_A.0"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.lora_A.0' has shape \(3, 64\)"):
        load_adapter_state(other, bad)


def test_piggyback_state_is_bit_packed_and_roundtrips(resnet, x, tmp_path):
    fresh = copy.deepcopy(resnet)
    add_adapters(resnet, adapter_preset("piggyback"))
    add_adapters(fresh, adapter_preset("piggyback"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random binary pattern: about half of every mask below the threshold
        for p in adapter_parameters(resnet):
            p.copy_(torch.rand(p.shape, generator=gen) * 2e-2 - 5e-3)
    state = adapter_state(resnet)
    assert all(k.endswith(".mask_bits") and v.dtype == torch.uint8 for k, v in state.items())
    weights = sum(p.numel() for p in adapter_parameters(resnet))
    assert sum(v.numel() for v in state.values()) == adapter_payload_bytes(resnet) == 78_528 == weights // 8
    save_file(state, str(tmp_path / "t.safetensors"))
    assert (tmp_path / "t.safetensors").stat().st_size < 78_528 + 8_000  # bytes on disk: the bits + header
    load_adapter_state(fresh, load_file(str(tmp_path / "t.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh(x), resnet(x))
    bad = {k: v[:-1] for k, v in state.items()}
    with pytest.raises(ValueError, match="mask_bits' has shape"):
        load_adapter_state(fresh, bad)
