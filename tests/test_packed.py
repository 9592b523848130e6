"""Packed tasks (``recast.packed``, ``RecastModel.add_packed_tasks``): many read-only tasks in a
few contiguous tensors answer mixed batches bit for bit as the same tasks added one by one
(``load_task_tensors``), with no per-task module or parameter."""

import copy
import gc
import tracemalloc

import pytest
import timm
import torch

import recast
from recast import preset
from recast.packed import PackedTaskError

TASKS = 50


def _payloads(rc, count: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """``count`` task payloads (random coefficients, heads of 3..9 classes; every 7th task has no
    head of its own: the base head answers)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        own = {f"coefs.{name}": torch.randn(layer.coef_sets, layer.bank.num_templates, generator=g)
               for name, layer in rc.recast_layers()}
        if i % 7:
            classes = 3 + i % 7
            own["head.weight"] = torch.randn(classes, rc.num_features, generator=g) * 0.1
            own["head.bias"] = torch.randn(classes, generator=g) * 0.1
        out[f"t{i}"] = own
    return out


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32).eval()


@pytest.fixture(scope="module")
def models():
    base = recast.apply(_tiny_vit(), preset("recast_att_mlp", groups=3))
    recast.mimic(base)
    payloads = _payloads(base, TASKS)
    one_by_one, packed = copy.deepcopy(base).eval(), copy.deepcopy(base).eval()
    for task, own in payloads.items():
        one_by_one.load_task_tensors(task, own, num_classes=own["head.weight"].shape[0] if "head.weight" in own else None)
    packed.add_packed_tasks(payloads)
    return one_by_one, packed, payloads


@pytest.mark.parametrize("strategy", ["auto", "shared", "grouped", "batched", "loop"])
def test_packed_mixed_forward_is_bit_identical_to_tasks_added_one_by_one(models, strategy):
    one_by_one, packed, payloads = models
    g = torch.Generator().manual_seed(1)
    names = [*payloads, "pretrained"]
    rows = [names[int(i)] for i in torch.randint(len(names), (64,), generator=g)]
    x = torch.randn(len(rows), 3, 32, 32, generator=g)
    for rc in (one_by_one, packed):
        rc.mixed_strategy = strategy
    with torch.no_grad():
        want = one_by_one(x, tasks=rows)
        want_picks = dict(one_by_one.last_routing.picks)
        got = packed(x, tasks=rows)
    assert torch.equal(got, want)  # bit for bit, -inf padding included
    assert dict(packed.last_routing.picks) == want_picks
    assert [packed.num_classes(t) for t in names] == [one_by_one.num_classes(t) for t in names]


def test_packed_tasks_hold_no_per_task_objects_and_give_their_tensors_back(models):
    one_by_one, packed, payloads = models
    assert packed.tasks == one_by_one.tasks
    heads = packed.task_heads
    assert list(heads.heads) == ["pretrained"]  # no head module per task
    assert all(list(layer.coefs) == ["pretrained"] for _, layer in packed.recast_layers())
    own_bytes = sum(t.numel() * t.element_size() for own in payloads.values() for t in own.values())
    packed_bytes = sum(b.numel() * b.element_size() for b in packed.packed.buffers())
    assert packed_bytes - packed.packed.head_spans.numel() * 8 == own_bytes  # the payload tensors, nothing more
    for task in ("t0", "t1", "t49"):
        back = packed.task_tensors(task)
        assert set(back) == set(payloads[task])
        assert all(torch.equal(back[k], v) for k, v in payloads[task].items())
    # Python memory per packed task: a name and an index entry (the 50 tasks' tensors are ~1.5 KB each)
    base = recast.apply(_tiny_vit(), preset("recast_att_mlp", groups=3))
    more = _payloads(base, 400, seed=3)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    base.add_packed_tasks(more)
    per_task = (tracemalloc.get_traced_memory()[0] - before) / len(more)
    tracemalloc.stop()
    assert per_task < 400, per_task  # one_by_one: a module and a parameter per layer, kilobytes per task


def test_packed_tasks_are_read_only_and_named_when_refused(models):
    _, packed, payloads = models
    with pytest.raises(PackedTaskError, match="'t3' is a packed"):
        packed.set_task("t3")
    with pytest.raises(PackedTaskError, match="'t3' is a packed"):
        packed.task_parameters("t3")
    with pytest.raises(PackedTaskError, match="'t3' is a packed"):
        packed.load_task_tensors("t3", payloads["t3"])
    with pytest.raises(ValueError, match="'t3' exists already"):
        packed.add_packed_tasks({"t3": payloads["t3"]})
    bad = {**payloads["t1"], "bias.blocks.0.mlp.fc1": torch.zeros(4)}
    with pytest.raises(PackedTaskError, match=r"\['bias.blocks.0.mlp.fc1'\] cannot be packed"):
        packed.add_packed_tasks({"new": bad})
    assert "new" not in packed.tasks
    plain = packed.materialize("t1")  # export works from the packed rows
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        assert (plain.eval()(x) - packed(x, tasks=["t1", "t1"])).abs().max() <= 1e-5
