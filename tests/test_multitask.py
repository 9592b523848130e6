"""Mixed-task batches: ``rc(x, tasks=[...])`` gives each row its own task's output and gradients."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recast
from recast import RecastConfig, preset
from recast.adapters import LoRAConfig, add_adapters
from recast.mixed import MixedBatchAdapterError, MixedBatchError, UnknownTaskError, layer_costs, pick_strategy

TOL = 1e-5
CLASSES = {"a": 5, "b": 7, "c": 3}  # heads of different widths; the base head has 10
ROWS = ["a", "b", "pretrained", "a", "c", "b", "c", "a"]


def _perturb(rc, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for task in CLASSES:
            for _, layer in rc.recast_layers():
                layer.coefs[task].add_(scale * torch.randn(layer.coefs[task].shape, generator=g))


def _with_tasks(rc, **set_task_kw):
    g = torch.Generator().manual_seed(5)
    for task, classes in CLASSES.items():
        rc.add_task(task, num_classes=classes)
        rc.set_task(task, **set_task_kw)
        with torch.no_grad():  # make what the task owns its own (biases, norm affine, statistics)
            for kind in rc.owned_kinds(task):
                for key, t in rc._live(kind).items():
                    if t.is_floating_point():
                        t.add_(0.2 * torch.randn(t.shape, generator=g))
                        if key.endswith("running_var"):
                            t.abs_().add_(0.1)
    _perturb(rc)
    rc.set_task("a")
    return rc


def _single(rc, task, x):
    rc.set_task(task)
    return rc(x)


def _assert_rows_match(rc, x, rows, strategy):
    rc.mixed_strategy = strategy
    active = rc.active_task
    with torch.no_grad():
        mixed = rc(x, tasks=rows)
        assert rc.active_task == active
        ref = {t: _single(rc, t, x) for t in set(rows)}
    rc.set_task(active)
    width = max(rc.num_classes(t) for t in rows)
    assert mixed.shape == (len(rows), width)
    for i, t in enumerate(rows):
        c = rc.num_classes(t)
        diff = float((mixed[i, :c] - ref[t][i]).abs().max())
        assert diff <= TOL, f"row {i} (task {t}, {strategy}): max abs diff {diff:.3g}"
        assert torch.isneginf(mixed[i, c:]).all()
    return rc.last_routing.picks


def _vit(tiny_vit, name, **kw):
    rc = recast.apply(tiny_vit, preset(name, groups=3, **kw))
    recast.mimic(rc)
    return rc


def _resnet(tiny_resnet, **kw):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # timm zero-initialises each block's last BN: give them pretrained-like values
        for m in tiny_resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    rc = recast.apply(tiny_resnet, preset("recast_resnet", **kw))
    recast.mimic(rc)
    return rc


@pytest.mark.parametrize("name", [p for p in recast.PRESET_NAMES if p != "recast_resnet"])
def test_vit_presets_rows_equal_single_task(tiny_vit, name):
    rc = _with_tasks(_vit(tiny_vit, name))
    x = torch.randn(len(ROWS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for strategy in ("shared", "grouped", "batched", "auto"):
        picks = _assert_rows_match(rc.eval(), x, ROWS, strategy)
        assert set(picks) == {n for n, _ in rc.recast_layers()}
        assert set(picks.values()) == {"batched" if strategy == "auto" else strategy}
    # auto: 4 distinct tasks in 8 rows, at most 3 of one: 4 x 3 padded rows in one batched
    # product beat n = 2 products of 8 rows (benchmarks/bench_multitask.py measures the pick)


def test_resnet_conv_rows_equal_single_task_and_auto_follows_the_cost_model(tiny_resnet):
    rc = _with_tasks(_resnet(tiny_resnet))
    x = torch.randn(len(ROWS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for strategy in ("shared", "grouped", "batched"):
        _assert_rows_match(rc.eval(), x, ROWS, strategy)
    picks = _assert_rows_match(rc, x, ROWS, "auto")
    layers = dict(rc.recast_layers())
    for name, side in (("layer1.1.conv1", 8), ("layer4.1.conv1", 1)):  # 32 px: /4 after the stem, /32 at layer4
        conv = layers[name]
        macs = conv.out_channels * conv.in_channels * 9
        n = conv.bank.num_templates
        assert picks[name] == pick_strategy(len(ROWS), side * side, macs, n, 4, conv.out_channels, 3), name
    assert picks["layer4.1.conv1"] == "shared"  # one position per row: shared wins at any overhead


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_per_task_biases_and_norms_rows_equal_single_task(request, arch):
    if arch == "vit":
        rc = _vit(request.getfixturevalue("tiny_vit"), "recast_att_mlp")
    else:
        rc = _resnet(request.getfixturevalue("tiny_resnet"))
    rc = _with_tasks(rc, train_biases=True, train_norms=True)
    assert rc.owned_kinds("b") == ["biases", "norms"]
    x = torch.randn(len(ROWS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for strategy in ("shared", "grouped", "batched"):
        _assert_rows_match(rc.eval(), x, ROWS, strategy)


def test_per_task_bn_statistics_rows_equal_single_task_in_eval(tiny_resnet):
    rc = _with_tasks(_resnet(tiny_resnet, bn_stats="per_task"), train_norms=True)
    assert rc.owned_kinds("c") == ["norms", "bn_stats"]
    x = torch.randn(len(ROWS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _assert_rows_match(rc.eval(), x, ROWS, "auto")
    rc.train()
    with pytest.raises(MixedBatchError, match="per-task statistics"):
        rc(x, tasks=ROWS)


class _GroupNormNet(nn.Module):
    """Grouped convs (groups=2) with GroupNorm, a templated stack of three same-shape convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, groups=2) for _ in range(3))
        self.norms = nn.ModuleList(nn.GroupNorm(2, 8) for _ in range(3))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_grouped_conv_and_group_norm_rows_equal_single_task():
    torch.manual_seed(0)
    cfg = RecastConfig(targets=(r"convs\.\d+",), regex=True, groups=1, templates=2, coef_sets=2)
    rc = recast.apply(_GroupNormNet(), cfg, layer_key=lambda n: ("convs", int(n.split(".")[1])), head_name="fc")
    recast.mimic(rc)
    rc = _with_tasks(rc, train_biases=True, train_norms=True)
    x = torch.randn(len(ROWS), 3, 6, 6, generator=torch.Generator().manual_seed(0))
    for strategy in ("shared", "grouped", "batched"):
        _assert_rows_match(rc.eval(), x, ROWS, strategy)


def _grads(rc, params):
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}


@pytest.mark.parametrize("strategy", ["shared", "grouped", "batched", "loop"])
@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_mixed_batch_gives_each_task_its_own_gradients(request, arch, strategy):
    """One mixed batch == each task's rows alone (single-task forward on the sub-batch, summed
    loss): max abs diff <= 1e-5, relative to the gradient's size where that exceeds 1."""
    rc = _vit(request.getfixturevalue("tiny_vit"), "recast_att_mlp") if arch == "vit" else \
        _resnet(request.getfixturevalue("tiny_resnet"))
    rc = _with_tasks(rc)
    rc.mixed_strategy = strategy
    tasks = list(CLASSES)
    params = {f"{t}.{i}": p for t in tasks for i, p in enumerate(rc.task_parameters(t))}
    g = torch.Generator().manual_seed(3)
    rows = [tasks[i % 3] for i in range(9)]
    x = torch.randn(len(rows), 3, 32, 32, generator=g)
    y = torch.tensor([int(torch.randint(0, CLASSES[t], (1,), generator=g)) for t in rows])
    rc.set_task("a")
    for p in params.values():
        p.requires_grad_(True)
    rc.train()  # ViT: no dropout; ResNet: BatchNorm statistics frozen
    rc.zero_grad(set_to_none=True)
    F.cross_entropy(rc(x, tasks=rows), y, reduction="sum").backward()
    mixed = _grads(rc, params)
    rc.zero_grad(set_to_none=True)
    for t in tasks:
        idx = torch.tensor([i for i, r in enumerate(rows) if r == t])
        rc.set_task(t)
        for p in params.values():
            p.requires_grad_(True)
        F.cross_entropy(rc(x[idx]), y[idx], reduction="sum").backward()
    alone = _grads(rc, params)
    for k in params:
        assert float(alone[k].abs().max()) > 0, k  # every task's tensors do get a gradient
        diff, scale = float((mixed[k] - alone[k]).abs().max()), float(alone[k].abs().max())
        assert diff <= TOL * max(1.0, scale), f"{k}: gradient differs by {diff:.3g} (max |grad| {scale:.3g})"


def test_bad_mixed_batches_raise_named_errors(tiny_vit):
    rc = _with_tasks(_vit(tiny_vit, "recast_mlp"))
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(UnknownTaskError, match=r"'zebra'; known: \['pretrained', 'a', 'b', 'c'\]") as info:
        rc(x, tasks=["a", "zebra", "b"])
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is UnknownTaskError and again.known == ["pretrained", "a", "b", "c"]
    with pytest.raises(MixedBatchError, match="2 task names for a batch of 3 rows"):
        rc(x, tasks=["a", "b"])
    with pytest.raises(MixedBatchError, match="0 task names for a batch of 0 rows"):
        rc(x[:0], tasks=[])
    with pytest.raises(MixedBatchError, match="sequence of task names"):
        rc(x, tasks="abc")
    assert rc.active_task == "a" and rc.last_routing is None
    with torch.no_grad():  # all rows of the active task: the ordinary forward
        assert torch.equal(rc(x, tasks=["a"] * 3), rc(x))
    add_adapters(rc.model, LoRAConfig(targets=("mlp.fc1",), rank=2))
    with pytest.raises(MixedBatchAdapterError, match=r"blocks\.0\.mlp\.fc1: LoRALinear") as info:
        rc(x, tasks=["a", "b", "c"])
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is MixedBatchAdapterError and again.adapters == info.value.adapters


def test_cost_model_of_the_strategies():
    vit_s_fc1 = (64, 197, 384 * 1536, 2)  # batch 64, 197 tokens, 384 -> 1536, n = 2
    costs = layer_costs(*vit_s_fc1, 64, 1536, 1)
    assert costs["shared"] == 2 * 64 * 197 * (384 * 1536 + 1536)
    assert costs["grouped"] == 64 * (2 * 384 * 1536 + recast.mixed.GROUP_OVERHEAD_MACS) + 64 * 197 * 384 * 1536
    assert costs["batched"] == 64 * 2 * 384 * 1536 + 64 * 1 * 197 * 384 * 1536
    assert pick_strategy(*vit_s_fc1, 64, 1536, 1) == "batched"
    assert pick_strategy(*vit_s_fc1, 64, 1536, 1, weight_bytes=2**30) == "shared"  # U weights too big
    assert pick_strategy(*vit_s_fc1, 2, 1536, 32, weight_bytes=2**30) == "grouped"  # few tasks
    # a 1x1 map (one position per row), 64 tasks: n products beat 64 weight generations
    assert pick_strategy(64, 1, 512 * 512 * 9, 2, 64, 512, 1) == "shared"
    # 8 tasks of 8 rows each, 1x1: batched needs 8 generations only
    assert pick_strategy(64, 1, 512 * 512 * 9, 2, 8, 512, 8) == "batched"
