import pytest
import timm
import torch
from torch import nn

import recast
from recast import RecastConfig, RecastConv2d, RecastLinear, preset


def _perturb(rc, task, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rc.recast_layers():
            layer.coefs[task].add_(scale * torch.randn(layer.coefs[task].shape, generator=g))


def test_apply_replaces_layers_and_keeps_user_model(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_att_mlp", groups=3))
    assert isinstance(rc.model.blocks[0].mlp.fc1, RecastLinear)
    assert isinstance(tiny_vit.blocks[0].mlp.fc1, nn.Linear)  # user's model untouched
    assert sum(1 for _ in rc.recast_layers()) == 18


def test_banks_stored_once_in_state_dict(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))
    keys = [k for k in rc.state_dict() if "templates" in k]
    assert len(keys) == len(rc.plan.banks) == 6
    assert all(k.startswith("banks.") for k in keys)
    assert not any(k.endswith(".weight") and "mlp.fc" in k for k in rc.state_dict())


def test_materialize_matches_and_is_plain(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_att_mlp", groups=2))
    recast.mimic(rc)
    rc.add_task("a", num_classes=7)
    _perturb(rc, "a")
    rc.set_task("a")
    x = torch.randn(3, 3, 32, 32)
    plain = rc.materialize("a").eval()
    assert type(plain) is type(tiny_vit)
    assert not any(isinstance(m, (RecastLinear, recast.TaskHeads)) for m in plain.modules())
    with torch.no_grad():
        y_rc, y_plain = rc.eval()(x), plain(x)
    assert y_rc.shape == (3, 7)
    assert (y_rc - y_plain).abs().max() < 1e-5


def test_tasks_are_independent(tiny_vit):
    """Training task b (AdamW on what set_task leaves trainable) changes b and nothing of a."""
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))
    recast.mimic(rc)
    x = torch.randn(2, 3, 32, 32)
    rc.add_task("a", num_classes=5)
    rc.add_task("b", num_classes=5)
    rc.eval()
    rc.set_task("a")
    ya = rc(x).detach()
    rc.set_task("b")
    yb0 = rc(x).detach()
    trainable = [p for p in rc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(rc(x), torch.tensor([1, 3])).backward()
        opt.step()
    layers = dict(rc.recast_layers())
    assert all(not torch.equal(layer.coefs["b"], layer.coefs["a"]) for layer in layers.values())
    assert not torch.allclose(rc(x), yb0)
    rc.set_task("a")
    assert torch.equal(rc(x), ya)
    with pytest.raises(ValueError, match="unknown task 'zzz'"):
        rc.set_task("zzz")
    with pytest.raises(ValueError, match="exists"):
        rc.add_task("a", num_classes=3)
    with pytest.raises(ValueError, match="task name"):
        rc.add_task("bad.name", num_classes=3)


def test_set_task_trainable_are_coefficients_and_head(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3, coef_sets=2, templates=2))
    rc.add_task("a", num_classes=10)
    rc.set_task("a")
    trainable = {n: p.numel() for n, p in rc.named_parameters() if p.requires_grad}
    # 6 layers x 2 modules x K=2 x n=2 coefficients + head 64*10+10
    assert sum(trainable.values()) == 48 + 650
    assert all(".coefs.a" in n or "heads.a" in n for n in trainable)


def test_recast_conv_keeps_geometry():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([
                nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=True)) for _ in range(2)
            ])

        def forward(self, x):
            return torch.cat([b(x) for b in self.blocks], 1)

    net = Net()
    rc = recast.apply(net, RecastConfig(targets=(r"blocks\.\d\.0",), regex=True, groups=1, templates=2, coef_sets=1))
    recast.mimic(rc)
    conv = rc.model.blocks[0][0]
    assert isinstance(conv, RecastConv2d) and conv.groups == 2 and conv.dilation == (2, 2)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert (rc(x) - net(x)).abs().max() < 1e-5  # n = group size: exact reconstruction


def test_resnet_materialize_and_preset_counts(tiny_resnet):
    rc = recast.apply(tiny_resnet, preset("recast_resnet"))
    recast.mimic(rc)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (rc.eval()(x) - tiny_resnet(x)).abs().max() < 1e-4  # n = B-1: exact
    rc.add_task("t", num_classes=3)
    _perturb(rc, "t")
    rc.set_task("t")
    with torch.no_grad():
        assert (rc.eval()(x) - rc.materialize("t").eval()(x)).abs().max() < 1e-5


def test_paper_parameter_counts_vit_small():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    expected = {"recast_mlp": (96, 14_155_776), "recast_att": (48, 5_308_416), "recast_att_mlp": (144, 19_464_192)}
    for name, (coefs, templates) in expected.items():
        plan = recast.build_plan(vit, preset(name))
        assert plan.coefficients_per_task == coefs
        assert plan.effective_coefficients_per_task == coefs // 2
        assert sum(torch.Size(b.shape).numel() * b.templates for b in plan.banks) == templates


def test_paper_parameter_counts_resnet34():
    r34 = timm.create_model("resnet34", pretrained=False)
    rc = recast.apply(r34, preset("recast_resnet"), inplace=True)
    counts = recast.count_parameters(rc)
    assert counts.coefficients == 168
    assert counts.templates == 16_367_616
    assert counts.original_total == 21_797_672  # timm resnet34 with its 1000-class head
    assert {b.stack: b.templates for b in rc.plan.banks} == {"layer1": 2, "layer2": 3, "layer3": 5, "layer4": 2}


def test_vit_small_counts_via_accounting():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    rc = recast.apply(vit, preset("recast_mlp"), inplace=True)
    rc.add_task("flowers", num_classes=102)
    c = recast.count_parameters(rc, "flowers")
    assert (c.coefficients, c.effective_coefficients, c.head) == (96, 48, 384 * 102 + 102)
    assert c.templates == c.replaced == 14_155_776
    assert c.original_total == 22_050_664
    assert c.bytes_per_task == 4 * (96 + 384 * 102 + 102)


def test_custom_torch_transformer_with_layer_key():
    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ff_in, self.ff_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            return x + self.ff_out(torch.relu(self.ff_in(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleDict({f"L{i}": Block(16) for i in range(4)})
            self.classifier = nn.Linear(16, 3)

        def forward(self, x):
            for b in self.enc.values():
                x = b(x)
            return self.classifier(x)

    def key(name):
        _, layer, role = name.split(".")
        return "enc", int(layer[1:]), role

    net = Net()
    rc = recast.apply(net, RecastConfig(targets=("ff_in", "ff_out"), groups=2, templates=2, coef_sets=2),
                      layer_key=key, head_name="classifier")
    report = recast.mimic(rc, batch=torch.randn(5, 16))
    assert report.min_weight_cosine > 0.99999
    assert report.min_feature_cosine > 0.99999
    rc.add_task("x", num_classes=4)
    rc.set_task("x")
    assert rc(torch.randn(2, 16)).shape == (2, 4)
    assert recast.count_parameters(rc, "x").coefficients == 4 * 2 * 2 * 2
