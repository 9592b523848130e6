"""Any Linear/Conv2d subclass: a templated module computes what its original class computes
with the generated weight, or is refused by name before any compute."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d, StdConv2dSame
from torch import nn

import recast
from recast import RecastConfig
from recast.layers import RecastConv2d, RecastLinear, UnsupportedModuleError
from recast.mixed import MixedBatchError
from recast.model import HeadDetectionError

TOL = 1e-5


def _stack(make, depth=3, channels=8):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(make(channels), nn.ReLU()) for _ in range(depth)]).eval()


def _exact_rc(model, **kw):
    cfg = RecastConfig(targets=(r"\d+\.0",), regex=True, groups=1, templates="group_size", coef_sets=1, **kw)
    rc = recast.apply(model, cfg, layer_key=lambda n: ("", int(n.split(".")[0])), head_name="")
    recast.mimic(rc, recast.MimicryConfig(progress=False))
    return rc.eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CLASSES = {
    "StdConv2d": lambda c: StdConv2d(c, c, 3, padding=1),
    "ScaledStdConv2d": lambda c: ScaledStdConv2d(c, c, 3, padding=1),
    "Conv2dSame": lambda c: Conv2dSame(c, c, 3, stride=1),
    "StdConv2dSame": lambda c: StdConv2dSame(c, c, 3, stride=1),
    "reflect padding": lambda c: nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect"),
}


@pytest.mark.parametrize("kind", list(CLASSES))
def test_subclass_forward_is_kept_exactly_and_materializes_to_its_class(kind):
    model = _stack(CLASSES[kind])
    with torch.no_grad():  # a learned gain that is not 1 (ScaledStdConv2d)
        for m in model.modules():
            if hasattr(m, "gain"):
                m.gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 9, 9)
    rc = _exact_rc(model)
    with torch.no_grad():
        ref, out = model(x), rc(x)
        assert out.shape == ref.shape  # Conv2dSame pads in forward: a plain conv would shrink the map
        assert _rel(out, ref) < 1e-5
        plain = rc.materialize("pretrained")
        assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
        assert torch.equal(plain(x), rc(x))
        reference = rc.reference_model()
        assert type(reference[0][0]) is type(model[0][0])
        assert torch.equal(reference(x), model(x))


def test_std_conv_two_layer_repro_of_the_issue():
    # issue 29: two StdConv2d, closed form, templates = group size; was off by 0.995 of its scale
    model = _stack(lambda c: StdConv2d(c, c, 3, padding=1), depth=2)
    x = torch.randn(2, 8, 8, 8)
    rc = _exact_rc(model)
    report = recast.mimic(rc, recast.MimicryConfig(progress=False), batch=x, feature_layers=["0", "1"])
    with torch.no_grad():
        assert _rel(rc(x), model(x)) < 1e-5
        assert type(rc.reference_model()[0][0]) is StdConv2d  # the check compares with the real original
    assert report.min_feature_cosine > 0.99999


@pytest.mark.parametrize("strategy", ["shared", "batched", "grouped", "auto", "loop"])
def test_mixed_batch_never_mixes_template_products_of_a_standardised_weight(strategy):
    model = _stack(lambda c: StdConv2d(c, c, 3, padding=1))
    rc = _exact_rc(model)
    g = torch.Generator().manual_seed(3)
    for task in ("a", "b"):
        rc.add_task(task)
        with torch.no_grad():
            for _, layer in rc.recast_layers():
                layer.coefs[task].add_(0.5 * torch.randn(layer.coefs[task].shape, generator=g))
    x = torch.randn(6, 8, 8, 8, generator=g)
    rows = ["a", "b", "pretrained", "b", "a", "a"]
    rc.mixed_strategy = strategy
    with torch.no_grad():
        mixed = rc(x, tasks=rows)
        # auto: the grouped strategy (the only per-layer one here) pays GROUP_OVERHEAD_MACS per task
        # and layer, the loop (one ordinary forward per task) LOOP_CALL_MACS per task and module call
        assert set(rc.last_routing.picks.values()) == ({"loop"} if strategy in ("auto", "loop") else {"grouped"})
        for t in set(rows):
            rc.set_task(t)
            alone = rc(x)
            for i, r in enumerate(rows):
                if r == t:  # relative to the row's scale (standardised weights give outputs ~100)
                    assert _rel(mixed[i], alone[i]) <= TOL


class CachedWeightConv(nn.Conv2d):
    """Reads a copy of its weight taken at init: templating it would change nothing."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.frozen = self.weight.detach().clone()

    def forward(self, x):
        return F.conv2d(x, self.frozen, self.bias, self.stride, self.padding)


class ShapeFussyLinear(nn.Linear):
    def forward(self, x):
        if x.dim() != 3:
            raise ValueError("wants (B, L, C)")
        return super().forward(x)


def test_unsupported_subclasses_are_refused_by_name_before_compute():
    model = _stack(lambda c: CachedWeightConv(c, c, 3, padding=1))
    with pytest.raises(UnsupportedModuleError, match=r"'0\.0' \(.*CachedWeightConv\).*does not read its weight"):
        _exact_rc(model)
    lin = nn.Sequential(*[nn.Sequential(ShapeFussyLinear(4, 4)) for _ in range(2)])
    with pytest.raises(UnsupportedModuleError, match=r"ShapeFussyLinear\).*probe input"):
        _exact_rc(lin)
    wn = _stack(lambda c: nn.utils.parametrizations.weight_norm(nn.Conv2d(c, c, 3, padding=1)))
    with pytest.raises(UnsupportedModuleError, match="parametrized"):
        _exact_rc(wn)
    err = UnsupportedModuleError("a.b", "x.Y", "why")
    assert pickle.loads(pickle.dumps(err)).args == err.args


def test_state_dict_keys_pickle_and_deepcopy_keep_outputs():
    model = _stack(lambda c: ScaledStdConv2d(c, c, 3, padding=1))
    rc = _exact_rc(model)
    conv = rc.model[0][0]
    assert isinstance(conv, RecastConv2d) and conv.base_class is ScaledStdConv2d
    assert sorted(conv.state_dict()) == ["bias", "coefs.pretrained", "gain"]  # the original's minus weight
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        ref = rc(x)
        for other in (copy.deepcopy(rc), pickle.loads(pickle.dumps(rc))):
            assert torch.equal(other(x), ref)


def test_head_detection_takes_the_single_linear_of_a_container_or_asks():
    class Net(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Linear(4, 4) for _ in range(2)])
            self.head = head

        def get_classifier(self):
            return self.head

        def forward(self, x):
            h = self.blocks(x)
            return self.head(h) if not isinstance(self.head, nn.ModuleList) else sum(m(h) for m in self.head)

    cfg = RecastConfig(targets=(r"blocks\.\d+",), regex=True, groups=1, templates="group_size", coef_sets=1)
    rc = recast.apply(Net(nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 3))), cfg,
                      layer_key=lambda n: ("blocks", int(n.split(".")[1])))
    assert rc.head_name == "head.1" and rc.num_features == 4
    rc.add_task("t", num_classes=5)
    rc.set_task("t")
    assert rc(torch.randn(2, 4)).shape == (2, 5)
    with pytest.raises(HeadDetectionError, match=r"'head' \(ModuleList\) holds 2 Linear.*pass head_name="):
        recast.apply(Net(nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])), cfg,
                     layer_key=lambda n: ("blocks", int(n.split(".")[1])))


def test_multihead_attention_out_proj_read_by_weight_is_exact_alone_and_refused_mixed():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return x + self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(2)]).eval()
    cfg = RecastConfig(targets=("attn.out_proj",), groups=1, templates="group_size", coef_sets=1)
    rc = recast.apply(model, cfg, head_name="")
    recast.mimic(rc, recast.MimicryConfig(progress=False))
    rc.add_task("b")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert _rel(rc(x), model(x)) < 1e-5
        with pytest.raises(MixedBatchError, match=r"'0\.attn\.out_proj'.*weight read directly"):
            rc(x, tasks=["pretrained", "b"])


def test_weight_space_adapters_refuse_a_standardising_or_padding_base():
    from recast.adapters import LoRAConfig, PiggybackConfig, add_adapters

    plain_std = _stack(lambda c: StdConv2d(c, c, 3, padding=1))
    with pytest.raises(UnsupportedModuleError, match=r"'0\.0' \(timm\.layers\.std_conv\.StdConv2d\).*weight-space"):
        add_adapters(plain_std, PiggybackConfig(targets=(r"\d\.0",), regex=True))
    rc = _exact_rc(_stack(lambda c: Conv2dSame(c, c, 3)))
    with pytest.raises(UnsupportedModuleError, match=r"Conv2dSame"):
        add_adapters(rc.model, PiggybackConfig(targets=(r"\d\.0",), regex=True))
    fine = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
    assert len(add_adapters(fine, LoRAConfig(targets=(r"\d\.0",), regex=True, rank=1))) == 2


def test_a_materialized_nfnet_is_an_nfnet_with_the_same_outputs():
    import timm

    from recast.coverage import prepare_random, templatable_names

    torch.manual_seed(0)
    model = timm.create_model("test_nfnet", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prepare_random(model, lambda i: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)))
    names = [n for n in templatable_names(model, "head.fc") if n.startswith("stages.")]
    cfg = RecastConfig(targets=tuple(names), groups=1, templates="group_size", coef_sets=1)
    rc = recast.apply(model, cfg, layer_key=lambda n: ("stages", names.index(n), "x".join(
        map(str, model.get_submodule(n).weight.shape))))
    recast.mimic(rc, recast.MimicryConfig(progress=False))
    plain = rc.materialize("pretrained")
    assert type(plain) is type(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    assert {n: type(m) for n, m in plain.named_modules()} == classes
    assert sum(c is ScaledStdConv2d for c in classes.values()) >= 8
    with torch.no_grad():
        assert _rel(plain(x), model(x)) < 1e-5 and _rel(rc(x), model(x)) < 1e-5


def test_exactness_tells_amplified_rounding_from_a_wrong_layer(monkeypatch):
    from recast.coverage import exactness

    # 40 layers whose gain amplifies any difference: float32 rounding of the reconstruction grows
    # beyond 1e-4, float64 is exact
    torch.manual_seed(0)
    deep = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(40)])
    with torch.no_grad():
        for block in deep:
            block[0].weight.mul_(6.0)
    x = torch.randn(4, 16)
    result = exactness(deep, x, head_name="")
    assert result.outcome == "exact" and result.dtype == "float64" and "float32: relative error" in result.detail
    assert exactness(deep, x, head_name="", float64_retry=False).outcome == "other"
    # a real defect (here: a templated Linear that scales its weight by 1.001) stays a mismatch in float64
    shallow = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)])
    monkeypatch.setattr(RecastLinear, "_plain_forward", lambda self, x, w, b: F.linear(x, 1.001 * w, b))
    result = exactness(shallow, x, head_name="")
    assert result.outcome == "other" and "float64: other" in result.detail, result
