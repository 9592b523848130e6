import pytest
import timm
import torch

import recast
from recast.recipes import Backbone, MethodSpec, build_method
from recast.training import TuneConfig, evaluate, fit, make_optimizer, make_scheduler


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32, patch_size=8)
    rc = recast.apply(model, recast.preset("recast_att_mlp", groups=3))
    recast.mimic(rc)
    base = rc.task_tensors("pretrained")
    banks = {k: b.templates.detach() for k, b in rc.banks.items()}
    return Backbone("test_vit", {"img_size": 32, "patch_size": 8}, model.state_dict(), num_classes=10,
                    recast_config=rc.config, banks=banks, base=base)


def _batches(n=64, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()  # separable
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


@pytest.mark.parametrize("spec, trainable, stored", [
    (MethodSpec("head_only"), 64 * 3 + 3, 64 * 3 + 3),
    (MethodSpec("recast"), 72 + 195, 72 + 195),                       # 6 layers x 3 modules x K2 x n2
    (MethodSpec("adapter", adapter="lora_tiny"), 256 + 195, 256 + 195),  # r=1 on one qkv: 64+192
    (MethodSpec("adapter", adapter="lora_tiny", recast=True), 256 + 72 + 195, 256 + 72 + 195),
])
def test_method_counts(backbone, spec, trainable, stored):
    built = build_method(spec, backbone, "t", 3)
    assert sum(p.numel() for p in built.trainable) == trainable
    assert built.stored_params() == stored


def test_recast_backbone_reproduces_plain(backbone):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (backbone.recast().eval()(x) - backbone.plain().eval()(x)).abs().max() < 1e-5


def test_fit_learns_and_restores_best_state(backbone):
    built = build_method(MethodSpec("recast"), backbone, "t", 3)
    train, val = _batches(seed=0), _batches(seed=1)
    res = fit(built.model, built.trainable, train, val, TuneConfig(epochs=4, lr=0.02, step_size=3, progress=False))
    assert len(res.history) == 4 and res.steps == 16
    assert res.best_val_acc == max(h["val_acc"] for h in res.history)
    assert evaluate(built.model, val) == pytest.approx(res.best_val_acc)  # best state restored
    assert res.best_val_acc > 0.6  # separable 3-class task, chance is 1/3


def test_fit_is_deterministic(backbone):
    accs = []
    for _ in range(2):
        torch.manual_seed(3)
        built = build_method(MethodSpec("recast"), backbone, "t", 3)
        fit(built.model, built.trainable, _batches(), _batches(seed=1), TuneConfig(epochs=2, lr=0.02, progress=False))
        accs.append(torch.cat([t.flatten() for t in built.payload().values()]))
    assert torch.equal(accs[0], accs[1])


def test_tune_config_errors():
    with pytest.raises(ValueError, match="epochs"):
        TuneConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer"):
        TuneConfig(optimizer="lion")


@pytest.mark.parametrize("recast_on", [False, True])
def test_rosa_gradient_support_through_build_method(backbone, recast_on):
    """The RoSA presets choose their support by gradient; build_method's prepare does it on the
    first training batch, and the payload refuses to exist before."""
    from recast.adapters import RoSALinear, adapter_preset

    assert (adapter_preset("rosa").targets, adapter_preset("rosa").rank) == (("attn.qkv",), 1)  # RoSA (Full-Att.)
    assert adapter_preset("rosa").support == adapter_preset("rosa_spa_mlp").support == "gradient"
    built = build_method(MethodSpec("adapter", adapter="rosa", recast=recast_on), backbone, "t", 3)
    with pytest.raises(RuntimeError, match="prepare"):
        built.payload()
    wrapper = next(m for m in built.model.modules() if isinstance(m, RoSALinear))
    random_support = wrapper.sparse_index.clone()
    x, y = _batches()[0]
    seen = {}
    hook = wrapper.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0], out=out))
    built.model.eval()
    g_out = torch.autograd.grad(torch.nn.functional.cross_entropy(built.model(x), y), seen["out"])[0]
    hook.remove()
    grad = torch.einsum("bto,bti->oi", g_out, seen["x"])  # dL/dW of the wrapped qkv: (B, T, out) x (B, T, in)
    built.prepare(_batches())
    expected = set(grad.abs().flatten().topk(wrapper.num_sparse).indices.tolist())
    assert set(wrapper.sparse_index.tolist()) == expected != set(random_support.tolist())
    payload = built.payload()
    key = next(k for k in payload if k.endswith("sparse_index"))
    assert torch.equal(payload[key], wrapper.sparse_index)  # the chosen support travels with the task

def test_step_size_none_keeps_the_learning_rate_constant():
    p = torch.nn.Parameter(torch.zeros(1))
    lrs = {}
    for step_size in (None, 2):
        cfg = TuneConfig(lr=1.0, step_size=step_size, gamma=0.5, optimizer="sgd", momentum=0.0)
        opt = make_optimizer([p], cfg)
        sched = make_scheduler(opt, cfg)
        seen = []
        for _ in range(4):
            seen.append(opt.param_groups[0]["lr"])
            if sched is not None:
                opt.step()
                sched.step()
        lrs[step_size] = seen
    assert lrs == {None: [1.0] * 4, 2: [1.0, 1.0, 0.5, 0.5]}


def test_fit_with_a_constant_learning_rate(backbone):
    built = build_method(MethodSpec("head_only"), backbone, "t", 3)
    res = fit(built.model, built.trainable, _batches(), _batches(seed=1),
              TuneConfig(epochs=2, lr=0.02, step_size=None, progress=False))
    assert len(res.history) == 2 and res.steps == 8


def test_fit_history_has_one_row_per_epoch_with_the_lr_it_trained_with(backbone):
    built = build_method(MethodSpec("recast"), backbone, "t", 3)
    res = fit(built.model, built.trainable, _batches(), _batches(seed=1),
              TuneConfig(epochs=3, lr=0.02, step_size=2, gamma=0.1, progress=False))
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    assert [h["lr"] for h in res.history] == pytest.approx([0.02, 0.02, 0.002])  # StepLR(2, 0.1)
    assert all(h["train_loss"] > 0 and 0 <= h["val_acc"] <= 1 for h in res.history)
