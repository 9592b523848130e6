"""InfLoRA: B-only training, A orthogonal to the feature memory, exact merging, counts."""

import pytest
import torch

from recast.baselines import InfLoRAConfig, InfLoRALinear, TaskSpec, make_method


def _branches(m):
    return {n: mod for n, mod in m.net.backbone.named_modules() if isinstance(mod, InfLoRALinear)}


@pytest.mark.parametrize("rows, per_target", [("kv", 2 * 64), ("all", 3 * 64)])
def test_trainable_count_is_rank_times_rows_per_target(vit, tasks, rows, per_target):
    m = make_method("inflora", vit, {"rank": 3, "rows": rows})
    m.before_task(tasks[0])
    branches = _branches(m)
    assert len(branches) == 6  # the qkv of each test_vit block
    assert all(tuple(b.up.shape) == (per_target, 3) and tuple(b.down.shape) == (3, 64) for b in branches.values())
    assert sum(p.numel() for p in m.trainable_parameters()) == 6 * 3 * per_target + 64 * 2 + 2
    assert all(not p.requires_grad for n, p in m.net.backbone.named_parameters() if not n.endswith(".up"))


def test_only_b_and_the_head_train(vit, tasks, fit_one_batch, snapshot, changed):
    m = make_method("inflora", vit, {"rank": 2})
    m.before_task(tasks[0])
    before = snapshot(m)
    fit_one_batch(m, tasks[0], lr=0.5, start=False)
    moved = changed(before, m)
    assert moved == {f"net.backbone.blocks.{i}.attn.qkv.up" for i in range(6)} | {"net.heads.a.weight", "net.heads.a.bias"}
    kv = _branches(m)["blocks.0.attn.qkv"]
    delta = kv.delta_weight()
    assert delta[:64].abs().max() == 0 and delta[64:].abs().max() > 0  # q rows untouched


def test_a_is_orthogonal_to_the_earlier_tasks_features(vit, tasks, fit_one_batch):
    m = make_method("inflora", vit, {"rank": 4, "threshold": 0.9})
    m.before_task(tasks[0])
    fit_one_batch(m, tasks[0], start=False)
    m.after_task(tasks[0], tasks[0].train)
    memory = m.memory["blocks.2.attn.qkv"]
    assert 0 < memory.shape[1] < 64 - 4
    assert torch.allclose(memory.T @ memory, torch.eye(memory.shape[1], dtype=torch.float64), atol=1e-8)
    m.before_task(tasks[1])
    for name, branch in _branches(m).items():
        down = branch.down.double()
        assert torch.allclose(down @ down.T, torch.eye(4, dtype=torch.float64) / 3, atol=1e-5)  # rows of norm 1/sqrt(3)
        cosine = 3 ** 0.5 * down @ m.memory[name]  # rows and memory columns as unit vectors
        assert cosine.abs().max() < 1e-6, name
    # the memory holds >= 90 % of task a's input energy, so a's own inputs barely excite B A
    cov = m.input_covariances(tasks[0].train)["blocks.2.attn.qkv"]
    down = _branches(m)["blocks.2.attn.qkv"].down.double()
    assert float(torch.trace(3 * down @ cov @ down.T)) < 0.1 * float(torch.trace(cov))


def test_memory_takes_the_directions_below_the_threshold_on_squared_singular_values(vit, tasks):
    """First task (the authors' rule): the r top singular vectors of C with r the number of
    prefix sums of sigma_i^2 / sum sigma^2 below the threshold."""
    m = make_method("inflora", vit, {"rank": 2, "threshold": 0.8})
    m.before_task(tasks[0])
    m.after_task(tasks[0], tasks[0].train)
    cov = m.input_covariances(tasks[0].train)["blocks.1.attn.qkv"]
    memory = m.memory["blocks.1.attn.qkv"]
    held = lambda basis: float(torch.linalg.matrix_norm(basis.T @ cov) ** 2 / torch.linalg.matrix_norm(cov) ** 2)
    assert memory.shape[1] >= 1
    assert held(memory) < 0.8 <= held(m._top_directions(torch.eye(64, dtype=torch.float64), cov)[:, :memory.shape[1] + 1])


def test_threshold_moves_towards_the_end_value_over_the_stream(vit):
    m = make_method("inflora", vit, {"threshold": 0.9, "threshold_end": 1.0})
    assert m.threshold_after(2) == 0.9  # stream length unknown: constant
    m.num_tasks = 4
    assert [m.threshold_after(t) for t in range(4)] == pytest.approx([0.9, 0.925, 0.95, 0.975])


def test_merging_keeps_the_outputs(vit, tasks, fit_one_batch):
    m = make_method("inflora", vit, {"rank": 3})
    m.before_task(tasks[0])
    fit_one_batch(m, tasks[0], lr=0.5, start=False)
    assert any(b.up.abs().max() > 0 for b in _branches(m).values())
    x = next(iter(tasks[0].test))[0]
    m.eval()
    with torch.no_grad():
        branched = m(x, "a")
    m.after_task(tasks[0], tasks[0].train)
    assert not _branches(m)  # merged back into plain Linear layers
    with torch.no_grad():
        merged = m(x, "a")
    assert torch.allclose(branched, merged, atol=1e-5)
    assert set(m.shared_state()) == {f"backbone.{k}" for k in vit.state_dict()}


def test_config_errors_name_the_field(vit, resnet):
    for kwargs, field in [({"rank": 0}, "rank"), ({"threshold": 1.5}, "threshold"), ({"rows": "q"}, "rows"),
                          ({"feature_batches": 0}, "feature_batches"),
                          ({"threshold": 0.9, "threshold_end": 0.8}, "threshold_end")]:
        with pytest.raises(ValueError, match=field):
            InfLoRAConfig(**kwargs)
    with pytest.raises(ValueError, match="attn.qkv"):
        make_method("inflora", resnet)  # no Linear target in a headless ResNet
    with pytest.raises(ValueError, match="divisible by 3"):
        make_method("inflora", vit, {"targets": ("attn.proj",)}).before_task(
            TaskSpec("a", 2, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))], None, []))


def test_a_full_memory_leaves_no_branch_instead_of_failing(vit, tasks):
    m = make_method("inflora", vit, {"rank": 4, "threshold": 1.0})  # the memory must hold all of task a's inputs
    m.before_task(tasks[0])
    m.after_task(tasks[0], tasks[0].train)
    free = {n: 64 - mem.shape[1] for n, mem in m.memory.items()}
    m.before_task(tasks[1])
    assert m.ranks == {n: min(4, f) for n, f in free.items()}
    assert {n: b.down.shape[0] for n, b in _branches(m).items()} == {n: r for n, r in m.ranks.items() if r}
