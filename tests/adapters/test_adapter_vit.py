import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from recast.adapters import (
    AdaptFormerConfig,
    DoRALinear,
    LoRAConfig,
    LoRALinear,
    RoSALinear,
    adapter_counts,
    adapter_parameters,
    adapter_preset,
    add_adapters,
    count_adapter_parameters,
    select_rosa_support,
)

VIT_PRESETS = ["lora", "lora_tiny", "melo", "dora", "adaptformer", "rosa", "rosa_spa_mlp"]
# exact trainable parameters per task on test_vit (6 blocks, dim 64, MLP 192, qkv 192)
VIT_COUNTS = {
    "lora": 6 * 4 * (64 + 192),
    "lora_tiny": 1 * (64 + 192),
    "melo": 6 * 2 * 1 * (64 + 64),  # q and v: two rank-1 pairs of (64 in, 64 rows)
    "dora": 6 * (4 * (64 + 192) + 192),  # + one magnitude per qkv row
    "adaptformer": 6 * (64 * 8 + 8 + 8 * 64 + 64),
    "rosa": 6 * 1 * (64 + 192) + 6 * 61,  # rank 1 on each qkv; 61 = round(0.005 * 64 * 192) sparse per qkv
    "rosa_spa_mlp": 144,
}
# the trainable tensors a first AdamW step must move (the others start with a zero gradient,
# e.g. LoRA's A while B is zero)
MUST_MOVE = {"lora": "lora_B", "lora_tiny": "lora_B", "melo": "lora_B", "dora": "magnitude",
             "adaptformer": "up", "rosa": "sparse_values", "rosa_spa_mlp": "sparse_values"}


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_identity_at_init_and_counts_plain(vit, x, name):
    with torch.no_grad():
        y0 = vit(x)
        add_adapters(vit, adapter_preset(name))
        y1 = vit(x)
    assert (y1 - y0).abs().max() <= 1e-6
    assert count_adapter_parameters(vit) == VIT_COUNTS[name]


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_on_recast_identity_and_one_step_trains_adapter_and_coefficients(rc_vit, x, name):
    rc = rc_vit
    with torch.no_grad():
        y0 = rc(x)
    names = add_adapters(rc.model, adapter_preset(name))
    assert names[0].startswith("blocks.0.") and ".base" not in names[0]  # original names
    with torch.no_grad():
        assert (rc(x) - y0).abs().max() <= 1e-6
    assert count_adapter_parameters(rc.model) == VIT_COUNTS[name]
    trainable = [p for p in rc.parameters() if p.requires_grad]
    coefs = {n: layer.coefs["t"].detach().clone() for n, layer in rc.recast_layers()}
    before = {n: p.detach().clone() for n, p in rc.model.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    F.cross_entropy(rc.train()(x), torch.tensor([1, 2])).backward()
    opt.step()
    moved = {n for n, p in rc.model.named_parameters() if not torch.equal(p, before[n])}
    adapter_ids = {id(p) for p in adapter_parameters(rc.model)}
    moved_adapter = {n for n, p in rc.model.named_parameters() if n in moved and id(p) in adapter_ids}
    assert any(MUST_MOVE[name] in n for n in moved_adapter)
    # eq. 6: the task's coefficients of the wrapped modules train too (through the adapter)
    changed = [n for n, layer in rc.recast_layers() if not torch.equal(layer.coefs["t"], coefs[n])]
    wrapped_paths = {id(m) for n, m in rc.model.named_modules() if ".base" in n}
    wrapped = [n for n, layer in rc.recast_layers() if n in changed and id(layer) in wrapped_paths]
    assert wrapped, "no coefficient under an adapter moved"
    assert not any(".base" in n for n in coefs)  # payload names do not depend on adapters
    assert len(changed) == len(coefs)  # all 18 templated modules got gradient


def test_melo_leaves_k_rows_untouched(vit, x):
    add_adapters(vit, adapter_preset("melo"))
    qkv = vit.blocks[2].attn.qkv
    assert isinstance(qkv, LoRALinear) and qkv.row_slices == ((0, 64), (128, 192))
    torch.nn.init.normal_(qkv.lora_B[0])
    torch.nn.init.normal_(qkv.lora_B[1])
    delta = qkv.weight - qkv.base.weight
    assert delta[64:128].abs().max() == 0  # k
    assert delta[:64].abs().min() > 0 and delta[128:].abs().min() > 0  # q and v (rank 1: dense)
    assert torch.linalg.matrix_rank(delta[:64]) == 1


def test_dora_magnitude_and_direction(vit, x):
    add_adapters(vit, adapter_preset("dora", rank=2, alpha=4.0))
    layer = vit.blocks[0].attn.qkv
    assert isinstance(layer, DoRALinear) and layer.scale == 2.0
    torch.testing.assert_close(layer.magnitude, layer.base.weight.norm(dim=1))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(3.0)
    # every output row of the effective weight has norm = its magnitude (direction is unit)
    torch.testing.assert_close(layer.weight.norm(dim=1), layer.magnitude, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def vit_small():
    """ViT-S on the meta device: the real structure, no memory or init time (counts only)."""
    with torch.device("meta"):
        return timm.create_model("vit_small_patch16_224", pretrained=False)


def test_rosa_spa_under_150_on_vit_small(vit_small):
    vit_s = copy.deepcopy(vit_small)
    names = add_adapters(vit_s, adapter_preset("rosa_spa_mlp"))
    assert len(names) == 24
    assert count_adapter_parameters(vit_s) == 144 < 150
    assert {m.num_sparse for m in vit_s.modules() if isinstance(m, RoSALinear)} == {6}


def test_rosa_sparse_support_is_fixed_and_selectable(vit, x):
    add_adapters(vit, adapter_preset("rosa_spa_mlp", seed=7))
    fc1 = vit.blocks[0].mlp.fc1
    assert fc1.num_sparse == 12 and fc1.sparse_index.unique().numel() == 12
    with torch.no_grad():
        fc1.sparse_values.fill_(1.0)
        delta = fc1.weight - fc1.base.weight
        assert int((delta != 0).sum()) == 12
        assert torch.equal(delta.flatten().nonzero().flatten(), fc1.sparse_index)
        fc1.sparse_values.zero_()
    # gradient-based support: the entries of largest |dL/dW|
    grad = torch.autograd.grad(vit(x).square().sum(), fc1.base.weight)[0]
    n = select_rosa_support(vit, lambda m: m(x).square().sum())
    assert n == 12 and fc1.sparse_values.abs().sum() == 0 and fc1.sparse_index.numel() == 12
    assert set(fc1.sparse_index.tolist()) == set(grad.abs().flatten().topk(12).indices.tolist())


def test_counts_on_vit_small(vit_small):
    vit_s = vit_small
    expected = {
        "lora": 12 * 4 * (384 + 1152), "melo": 12 * 2 * (384 + 384), "dora": 12 * (4 * (384 + 1152) + 1152),
        "adaptformer": 12 * (2 * 384 * 8 + 8 + 384),
        "rosa": 12 * 1 * (384 + 1152) + 12 * 2212,  # Full-Att.: rank 1 on qkv; 2212 = round(0.005 * 384 * 1152)
    }
    for name, count in expected.items():
        model = copy.deepcopy(vit_s)
        add_adapters(model, adapter_preset(name))
        assert count_adapter_parameters(model) == count, name
    model = copy.deepcopy(vit_s)
    add_adapters(model, adapter_preset("adaptformer", bottleneck=64))  # the paper's width
    assert count_adapter_parameters(model) == 12 * (2 * 384 * 64 + 64 + 384) == 595_200


def test_stacking_lora_inside_adaptformer_keeps_original_names(vit, x):
    add_adapters(vit, adapter_preset("adaptformer"))
    names = add_adapters(vit, LoRAConfig(("mlp.fc1",), rank=2))
    assert names == [f"blocks.{i}.mlp.fc1" for i in range(6)]
    assert isinstance(vit.blocks[0].mlp.base.fc1, LoRALinear)
    assert count_adapter_parameters(vit) == VIT_COUNTS["adaptformer"] + 6 * 2 * (64 + 192)
    assert adapter_counts(vit) == {"AdaptFormerMLP": VIT_COUNTS["adaptformer"], "LoRALinear": 6 * 2 * (64 + 192)}


@pytest.mark.parametrize("branch_input", ["residual", "mlp"])
def test_adaptformer_branch_reads_the_residual_stream_like_adaptformer(vit, x, branch_input):
    block = copy.deepcopy(vit.blocks[2])
    add_adapters(vit, adapter_preset("adaptformer", branch_input=branch_input))
    wrapper = vit.blocks[2].mlp
    torch.manual_seed(1)
    with torch.no_grad():
        wrapper.up.weight.normal_()
        wrapper.up.bias.normal_()
    tokens = torch.randn(3, 17, 64)
    with torch.no_grad():
        got = vit.blocks[2](tokens)
        h = tokens + block.attn(block.norm1(tokens))  # the attention half is untouched
        branch_in = h if branch_input == "residual" else block.norm2(h)
        branch = wrapper.scale * wrapper.up(torch.relu(wrapper.down(branch_in)))
        want = h + block.mlp(block.norm2(h)) + branch
    assert (got - want).abs().max() < 1e-5
    moved = branch_input == "residual"
    assert isinstance(vit.blocks[2].norm2, torch.nn.Identity) == moved and (wrapper.norm is not None) == moved
    # the moved norm is frozen backbone, not payload: counts and state are the branch's only
    assert count_adapter_parameters(vit) == VIT_COUNTS["adaptformer"]
    from recast.adapters import adapter_state

    assert not [k for k in adapter_state(vit) if ".norm." in k]


def test_adaptformer_residual_input_needs_a_pre_norm_block():
    mlp_only = torch.nn.Sequential()
    mlp_only.add_module("mlp", torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)))
    with pytest.raises(ValueError, match="branch_input='mlp'"):
        add_adapters(copy.deepcopy(mlp_only), AdaptFormerConfig(("mlp",)))
    add_adapters(mlp_only, AdaptFormerConfig(("mlp",), branch_input="mlp"))
    assert mlp_only(torch.randn(2, 8)).shape == (2, 8)
    with pytest.raises(ValueError, match="branch_input must be"):
        AdaptFormerConfig(("mlp",), branch_input="pre")
