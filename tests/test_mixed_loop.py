"""The ``"loop"`` strategy of mixed-task batches (one ordinary forward per task inside
``rc(x, tasks=...)``) and ``auto``'s model-level choice of it (``recast.mixed.loop_costs``)."""

import pytest
import torch
from torch import nn

import recast
from recast import RecastConfig, mixed
from recast.adapters import LoRAConfig, add_adapters
from recast.mixed import LayerShape, MixedBatchAdapterError, loop_costs, pick_model_strategy
from tests.test_multitask import ROWS, _assert_rows_match, _resnet, _vit, _with_tasks


def _model(request, arch):
    if arch == "vit":
        return _vit(request.getfixturevalue("tiny_vit"), "recast_att_mlp")
    return _resnet(request.getfixturevalue("tiny_resnet"), bn_stats="per_task")


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_loop_rows_are_bit_identical_to_each_task_alone(request, arch):
    """Each task's rows of a loop forward == ``set_task(task)`` + forward of those rows, bit for
    bit (the same operations on the same rows), with per-task biases, norms and (ResNet)
    BatchNorm statistics; narrower heads padded with -inf; rows not sorted by task."""
    rc = _with_tasks(_model(request, arch), train_biases=True, train_norms=True).eval()
    x = torch.randn(len(ROWS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    picks = _assert_rows_match(rc, x, ROWS, "loop")  # and within TOL of the whole batch alone
    assert set(picks) == {n for n, _ in rc.recast_layers()} and set(picks.values()) == {"loop"}
    assert rc.last_routing.tasks == ["a", "b", "pretrained", "c"]
    with torch.no_grad():
        mixed = rc(x, tasks=ROWS)
        for t in set(ROWS):
            idx = torch.tensor([i for i, r in enumerate(ROWS) if r == t])
            rc.set_task(t)
            alone = rc(x[idx])
            assert torch.equal(mixed[idx, : alone.shape[1]], alone), t
    rc.set_task("a")
    with torch.no_grad():  # the loop reads the stores and switches nothing
        assert torch.equal(rc(x, tasks=ROWS), mixed)
    assert rc.active_task == "a"


def test_loop_on_a_non_timm_net():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
            self.norm = nn.GroupNorm(2, 4)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            for conv in self.convs:
                x = torch.relu(self.norm(conv(x)))
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    cfg = RecastConfig(targets=(r"convs\.\d+",), regex=True, groups=1, templates=2, coef_sets=2)
    rc = recast.apply(Net(), cfg, layer_key=lambda n: ("convs", int(n.split(".")[1])), head_name="fc")
    rc = _with_tasks(rc, train_biases=True, train_norms=True).eval()
    x = torch.randn(len(ROWS), 4, 6, 6, generator=torch.Generator().manual_seed(0))
    assert set(_assert_rows_match(rc, x, ROWS, "loop").values()) == {"loop"}


def test_loop_refuses_adapters_like_every_strategy(tiny_vit):
    rc = _with_tasks(_vit(tiny_vit, "recast_mlp")).eval()
    rc.mixed_strategy = "loop"
    add_adapters(rc.model, LoRAConfig(targets=("mlp.fc1",), rank=2))
    with pytest.raises(MixedBatchAdapterError, match=r"blocks\.0\.mlp\.fc1: LoRALinear"):
        rc(torch.randn(3, 3, 32, 32), tasks=["a", "b", "c"])  # adapters hold one task's tensors


def _vit_shapes(tokens, dim, ratio, depth):
    """qkv, fc1, fc2 of ``depth`` ViT blocks (n = 2 templates)."""
    one = [LayerShape(tokens, dim * 3 * dim, 2, 3 * dim), LayerShape(tokens, dim * ratio * dim, 2, ratio * dim),
           LayerShape(tokens, ratio * dim * dim, 2, dim)]
    return one * depth


def test_loop_cost_model():
    s = LayerShape(10, 1000, 2, 50)
    costs = loop_costs([s], 8, 4, 2, calls=3)
    assert costs["loop"] == 4 * 3 * mixed.LOOP_CALL_MACS + 4 * 2 * 1000 + 8 * 10 * 1000
    per_layer = mixed.layer_costs(8, 10, 1000, 2, 4, 50, 2)
    assert min(per_layer, key=per_layer.get) == "batched"  # ... which also pays for its 4 stacked weights
    assert costs["layers"] == per_layer["batched"] + 4 * 1000 * mixed.STACKED_WEIGHT_MACS
    vit_s, test_vit = (_vit_shapes(197, 384, 4, 12), 237), (_vit_shapes(101, 64, 3, 6), 123)  # bench_multitask
    assert pick_model_strategy(*vit_s[:1], 64, 64, 1, vit_s[1]) == "loop"  # as measured: 64 tasks, one row each
    assert pick_model_strategy(*vit_s[:1], 64, 8, 8, vit_s[1]) == "loop"  # and 8 tasks of 8 rows
    assert pick_model_strategy(*test_vit[:1], 64, 64, 1, test_vit[1]) == "layers"  # small layers: calls dominate
    assert pick_model_strategy(*test_vit[:1], 64, 8, 8, test_vit[1]) == "layers"


class _TokenNet(nn.Module):
    """Tokens (B, L, d) through three d x d Linear layers, mean-pooled into a classifier: large
    layers and few module calls, where the cost model puts the loop first."""

    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x.mean(dim=1))


def _token_rc(d):
    torch.manual_seed(0)
    cfg = RecastConfig(targets=(r"layers\.\d+",), regex=True, groups=1, templates=2, coef_sets=2)
    rc = recast.apply(_TokenNet(d), cfg, layer_key=lambda n: ("layers", int(n.split(".")[1])), head_name="head")
    g = torch.Generator().manual_seed(1)
    for i in range(8):
        rc.add_task(f"t{i}", num_classes=5, init="random", generator=g)
    return rc.eval()


def test_auto_loops_where_the_cost_model_says_so_and_not_elsewhere(tiny_vit):
    rc = _token_rc(512)
    rc.set_task("t0")
    x = torch.randn(8, 16, 512, generator=torch.Generator().manual_seed(2))
    rows = [f"t{7 - i}" for i in range(8)]  # 8 distinct tasks, one row each
    with torch.no_grad():
        out = rc(x, tasks=rows)
        picks = rc.last_routing.picks
        assert set(picks.values()) == {"loop"} and len(picks) == 3
        shapes, calls, _ = rc._profiles[((16, 512), torch.float32, "cpu")]  # what auto decided on
        assert calls == 4 and [s.positions for s in shapes] == [16, 16, 16]  # 3 templated layers + the head
        assert pick_model_strategy(shapes, 8, 8, 1, calls) == "loop"
        for i, t in enumerate(rows):
            rc.set_task(t)
            assert torch.equal(out[i : i + 1], rc(x[i : i + 1])), t
        rc.set_task("t0")
        rc.train()  # train mode: one forward of the batch (BatchNorm statistics would differ)
        rc(x, tasks=rows)
        assert "loop" not in rc.last_routing.picks.values()
        rc.eval()
        rc.mixed_strategy = "batched"  # a forced strategy is kept
        rc(x, tasks=rows)
        assert set(rc.last_routing.picks.values()) == {"batched"}
    # a small ViT, a large batch of two tasks: the loop's calls cost more than it saves
    vit = _vit(tiny_vit, "recast_att_mlp")
    for t in ("a", "b"):
        vit.add_task(t, num_classes=10)
    _perturb_all(vit)
    vit.set_task("a")
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    rows = ["a", "b"] * 16
    with torch.no_grad():
        out = vit.eval()(x, tasks=rows)
        assert set(vit.last_routing.picks.values()) == {"batched"}
        shapes, calls, _ = vit._profiles[((3, 32, 32), torch.float32, "cpu")]
        assert pick_model_strategy(shapes, 32, 2, 16, calls) == "layers"
        vit.mixed_strategy = "loop"
        assert (vit(x, tasks=rows) - out).abs().max() <= 1e-5  # both right, the pick is about speed


def _perturb_all(rc):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in rc.recast_layers():
            for p in layer.coefs.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_auto_reads_packed_tasks_head_widths():
    """A served model's tasks are packed (no head module each): ``auto`` must see their widths,
    looping where they are one width and not where they differ, with rows equal to the ones of
    the same tasks added one by one."""
    base = _token_rc(512)
    g = torch.Generator().manual_seed(5)

    def payload(classes):
        own = {f"coefs.{n}": torch.randn(layer.coef_sets, layer.bank.num_templates, generator=g)
               for n, layer in base.recast_layers()}
        return {**own, "head.weight": torch.randn(classes, 512, generator=g) * 0.1,
                "head.bias": torch.randn(classes, generator=g) * 0.1}

    x = torch.randn(4, 16, 512, generator=torch.Generator().manual_seed(6))
    for widths, looped in (((5, 5, 5, 5), True), ((5, 7, 5, 7), False)):
        payloads = {f"p{i}": payload(w) for i, w in enumerate(widths)}
        packed, one_by_one = _token_rc(512), _token_rc(512)
        packed.add_packed_tasks(payloads)
        for t, own in payloads.items():
            one_by_one.load_task_tensors(t, own, num_classes=own["head.weight"].shape[0])
        rows = list(payloads)
        with torch.no_grad():
            got = packed(x, tasks=rows)
            picks = dict(packed.last_routing.picks)  # the calling thread's last mixed forward
            want = one_by_one(x, tasks=rows)
        assert ("loop" in picks.values()) is looped, (widths, picks)
        assert picks == dict(one_by_one.last_routing.picks)
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and (got - want).abs().nan_to_num().max() <= 1e-5
