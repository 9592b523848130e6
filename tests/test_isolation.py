"""Zero forgetting by construction: training task b never changes task a's outputs."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import recast
from recast import preset
from recast.training import TuneConfig, fit

ARCHS = {"vit": ("tiny_vit", "recast_att_mlp", {"groups": 3}), "resnet": ("tiny_resnet", "recast_resnet", {})}


def _pretrained_like_bn(model: nn.Module) -> nn.Module:
    """timm zero-initialises the last BN of every block and starts with mean 0 / var 1
    statistics; give every BN non-trivial values, as a pretrained network has."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _recast(request, arch: str, **overrides) -> recast.RecastModel:
    fixture, name, kw = ARCHS[arch]
    model = _pretrained_like_bn(request.getfixturevalue(fixture))
    rc = recast.apply(model, preset(name, **kw, **overrides))
    recast.mimic(rc)
    return rc


def _data(seed: int, n: int = 8, classes: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + 4], y[i:i + 4]) for i in range(0, n, 4)]


def _raw_loop(rc: recast.RecastModel, data, steps: int = 3, lr: float = 0.05) -> None:
    """The README's ``...train...``: train mode, forward, AdamW step on what requires grad."""
    opt = torch.optim.AdamW([p for p in rc.parameters() if p.requires_grad], lr=lr)
    rc.train()
    for step in range(steps):
        x, y = data[step % len(data)]
        opt.zero_grad()
        F.cross_entropy(rc(x), y).backward()
        opt.step()


def _fit(rc: recast.RecastModel, data) -> None:
    """``fit`` with BatchNorm left in train mode (the authors' setting)."""
    cfg = TuneConfig(epochs=1, lr=0.05, freeze_bn_stats=False, progress=False)
    fit(rc, [p for p in rc.parameters() if p.requires_grad], data, data[:1], cfg)


@torch.no_grad()
def _logits(rc: recast.RecastModel, task: str, x: torch.Tensor) -> torch.Tensor:
    rc.set_task(task)
    return rc.eval()(x)


TRAINERS = {"fit": _fit, "raw": _raw_loop}
CASES = [  # (arch, bn_stats or None for the default, train_biases, train_norms)
    ("vit", None, False, False), ("vit", None, True, True),
    ("resnet", None, False, False), ("resnet", None, False, True),
    ("resnet", "per_task", False, False), ("resnet", "per_task", True, True),
]


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("arch, bn_stats, biases, norms", CASES)
def test_training_task_b_leaves_task_a_bit_identical(request, trainer, arch, bn_stats, biases, norms):
    rc = _recast(request, arch, **({"bn_stats": bn_stats} if bn_stats else {}))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rc.add_task("a", num_classes=5)
    rc.set_task("a", train_biases=biases, train_norms=norms)
    TRAINERS[trainer](rc, _data(1))  # a owns what it trained
    ya = _logits(rc, "a", x)
    rc.add_task("b", num_classes=5)
    rc.set_task("b", train_biases=biases, train_norms=norms)
    yb0 = _logits(rc, "b", x)
    rc.set_task("b", train_biases=biases, train_norms=norms)
    TRAINERS[trainer](rc, _data(2))
    yb = _logits(rc, "b", x)
    assert not torch.allclose(yb, yb0)  # b did train
    ya2 = _logits(rc, "a", x)
    assert torch.equal(ya2, ya), f"task a's logits changed by {float((ya2 - ya).abs().max()):.3g}"
    assert torch.equal(_logits(rc, "b", x), yb)  # and switching back restores b exactly


def test_frozen_bn_stats_stay_in_eval_mode_and_unchanged(request):
    rc = _recast(request, "resnet")
    assert rc.config.bn_stats == "frozen"
    stats = {k: v.clone() for k, v in rc.state_dict().items() if "running" in k}
    rc.add_task("b", num_classes=5)
    rc.set_task("b")
    _raw_loop(rc, _data(2))
    bns = [m for m in rc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert rc.training and bns and not any(m.training for m in bns)
    assert all(torch.equal(v, rc.state_dict()[k]) for k, v in stats.items())
    assert recast.count_parameters(rc, "b").bn_stats == 0
    assert not any(k.startswith("bn.") for k in rc.task_tensors("b"))


def test_per_task_bn_stats_are_owned_counted_and_saved(request, tmp_path):
    rc = _recast(request, "resnet", bn_stats="per_task")
    rc.add_task("b", num_classes=5)
    rc.set_task("b")
    _raw_loop(rc, _data(2))
    base, b = rc.task_tensors("pretrained"), rc.task_tensors("b")
    bn_keys = sorted(k for k in b if k.startswith("bn."))
    bns = [m for m in rc.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_keys) == 3 * len(bns)  # running_mean, running_var, num_batches_tracked
    assert int(b["bn.bn1.num_batches_tracked"]) == 3 and int(base["bn.bn1.num_batches_tracked"]) == 0
    assert not torch.equal(b["bn.bn1.running_mean"], base["bn.bn1.running_mean"])
    floats = sum(m.running_mean.numel() + m.running_var.numel() for m in bns)
    counts = recast.count_parameters(rc, "b")
    assert counts.bn_stats == floats + len(bns)
    assert counts.bytes_per_task == 4 * (counts.coefficients + counts.head + floats) + 8 * len(bns)
    x = torch.randn(3, 3, 32, 32)
    yb = _logits(rc, "b", x)
    recast.save_banks(rc, tmp_path / "banks")
    recast.save_payload(rc, "b", tmp_path / "b")
    fresh = _recast(request, "resnet", bn_stats="per_task")
    recast.load_banks(fresh, tmp_path / "banks")
    recast.load_payload(fresh, tmp_path / "b")
    assert torch.equal(_logits(fresh, "b", x), yb)
    with torch.no_grad():
        assert torch.equal(rc.materialize("b").eval()(x), yb)  # materialize carries b's statistics
    frozen = _recast(request, "resnet")
    recast.load_banks(frozen, tmp_path / "banks")
    with pytest.raises(ValueError, match="bn_stats='frozen'"):
        recast.load_payload(frozen, tmp_path / "b")


def test_trained_biases_and_norms_are_per_task_copies(request):
    rc = _recast(request, "vit")
    rc.add_task("b", num_classes=5)
    rc.set_task("b", train_biases=True, train_norms=True)
    assert rc.owned_kinds("b") == ["biases", "norms"] and rc.owned_kinds("pretrained") == []
    _raw_loop(rc, _data(2))
    b, base = rc.task_tensors("b"), rc.task_tensors("pretrained")
    biases = {k: v for k, v in b.items() if k.startswith("bias.")}
    norms = {k: v for k, v in b.items() if k.startswith("norm.")}
    assert len(biases) == 18 and not any(k.startswith(("bias.", "norm.")) for k in base)
    assert len(norms) == 2 * 13  # weight + bias of 2 LayerNorms in 6 blocks and the final norm
    layer = dict(rc.recast_layers())["blocks.0.mlp.fc1"]
    assert not torch.equal(layer.bias, request.getfixturevalue("tiny_vit").blocks[0].mlp.fc1.bias)  # b's, trained
    rc.set_task("pretrained")
    assert torch.equal(layer.bias, request.getfixturevalue("tiny_vit").blocks[0].mlp.fc1.bias)  # the base's again
    counts = recast.count_parameters(rc, "b")
    assert counts.biases == sum(v.numel() for v in biases.values())
    assert counts.norms == sum(v.numel() for v in norms.values())
    assert counts.trainable == counts.coefficients + counts.head + counts.biases + counts.norms
    # a payload carries them: loading b's tensors as task c reproduces b's logits
    x = torch.randn(2, 3, 32, 32)
    rc.load_task_tensors("c", b)
    assert rc.owned_kinds("c") == ["biases", "norms"]
    assert torch.equal(_logits(rc, "c", x), _logits(rc, "b", x))


def test_mimicry_after_tasks_exist_needs_force(request):
    rc = _recast(request, "vit")
    rc.add_task("a", num_classes=5)
    with pytest.raises(RuntimeError, match=r"tasks \['a'\] exist.*force=True"):
        recast.mimic(rc)
    recast.mimic(rc, recast.MimicryConfig(method="gradient", steps=1, progress=False), force=True)


def test_load_task_tensors_respects_frozen_model(request):
    rc = _recast(request, "vit")
    rc.add_task("a", num_classes=5)
    rc.set_task("a")
    trainable = {n for n, p in rc.named_parameters() if p.requires_grad}
    a = rc.task_tensors("a")
    rc.load_task_tensors("c", a)  # a new task, head created from the payload
    rc.add_task("d", num_classes=3)
    assert {n for n, p in rc.named_parameters() if p.requires_grad} == trainable
    coefs = dict(rc.recast_layers())["blocks.0.mlp.fc1"].coefs["a"]
    rc.load_task_tensors("a", {k: v * 2 for k, v in a.items()})  # the active task: in place
    assert dict(rc.recast_layers())["blocks.0.mlp.fc1"].coefs["a"] is coefs
    assert {n for n, p in rc.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(ValueError, match=r"unknown keys \['extra.adapter.x'\]"):
        rc.load_task_tensors("e", {**a, "extra.adapter.x": torch.zeros(1)})


def test_materialize_bf16_is_one_dtype(tiny_vit):
    rc = recast.apply(tiny_vit.to(torch.bfloat16), preset("recast_att_mlp", groups=3))
    recast.mimic(rc)
    rc.add_task("a", num_classes=5)
    rc.set_task("a")
    plain = rc.materialize("a")
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in rc.parameters()} == {torch.bfloat16}


def test_fit_restores_the_best_epochs_bn_statistics():
    """One class: accuracy is 1.0 in every epoch, so epoch 0 stays the best; its BN buffers
    are those of a 1-epoch run, not the last epoch's."""
    data = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.zeros(4, dtype=torch.long))
            for i in range(2)]
    runs = {}
    for epochs in (1, 3):
        torch.manual_seed(0)
        model = _pretrained_like_bn(timm.create_model("test_resnet", pretrained=False, num_classes=1))
        cfg = TuneConfig(epochs=epochs, lr=1e-3, weight_decay=0.0, freeze_bn_stats=False, progress=False)
        res = fit(model, list(model.parameters()), data, data[:1], cfg)
        assert res.best_epoch == 0
        runs[epochs] = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert int(runs[3]["bn1.num_batches_tracked"]) == 2  # one epoch of 2 batches
    assert all(torch.equal(runs[1][k], runs[3][k]) for k in runs[1])


def _inner_loop(rc: recast.RecastModel, data, steps: int = 2, lr: float = 0.1) -> None:
    """A trainer that holds the inner network (Lightning, HF Trainer, timm's train script):
    ``rc.model.train()``, bypassing ``RecastModel.train``."""
    opt = torch.optim.AdamW([p for p in rc.parameters() if p.requires_grad], lr=lr)
    rc.model.train()
    for step in range(steps):
        x, y = data[step % len(data)]
        opt.zero_grad()
        F.cross_entropy(rc.model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("bn_stats", ["frozen", "per_task"])
def test_training_through_the_inner_model_leaves_task_a_bit_identical(bn_stats):
    """Frozen statistics stay frozen whatever mode the inner module is put in (issue 21 item 6)."""
    torch.manual_seed(0)
    model = _pretrained_like_bn(timm.create_model("test_resnet", pretrained=False, num_classes=10,
                                                  layers=(3, 3, 3, 3)).eval())
    rc = recast.apply(model, preset("recast_resnet", bn_stats=bn_stats))
    recast.mimic(rc)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rc.add_task("a", num_classes=5)
    ya = _logits(rc, "a", x)
    rc.add_task("b", num_classes=5)
    rc.set_task("b")
    yb0 = _logits(rc, "b", x)
    rc.set_task("b")
    _inner_loop(rc, _data(2))
    assert not torch.allclose(_logits(rc, "b", x), yb0)  # b did train
    ya2 = _logits(rc, "a", x)
    assert torch.equal(ya2, ya), f"task a's logits changed by {float((ya2 - ya).abs().max()):.3g}"
    if bn_stats == "frozen":
        bns = [m for m in rc.model.modules() if isinstance(m, nn.BatchNorm2d)]
        rc.model.train()
        assert bns and not any(m.training for m in bns)
        for m in bns:
            m.training = True  # even a direct write leaves the statistics frozen
        assert not any(m.training for m in bns)
