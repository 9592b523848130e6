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
    def held(basis):
        return float(torch.linalg.matrix_norm(basis.T @ cov) ** 2 / torch.linalg.matrix_norm(cov) ** 2)
    assert memory.shape[1] >= 1
    assert held(memory) < 0.8 <= held(m._top_directions(torch.eye(64, dtype=torch.float64), cov)[:, :memory.shape[1] + 1])


def test_linear_energy_holds_the_threshold_of_the_inputs_energy(vit, tasks):
    """``energy="linear"`` (GPM's rule on the inputs' energy, tr C): after the first task the
    memory holds the largest prefix of C's eigenvalues below the threshold, so the old inputs'
    energy outside it is in (1 - threshold, 1 - threshold + lambda_{k+1} / tr C]. The authors'
    rule on the same covariances leaves more of it outside."""
    outside = {}
    for energy in ("squared", "linear"):
        torch.manual_seed(0)
        m = make_method("inflora", vit, {"rank": 2, "threshold": 0.9, "energy": energy})
        m.before_task(tasks[0])
        m.after_task(tasks[0], tasks[0].train)
        cov = m.input_covariances(tasks[0].train)
        outside[energy] = {}
        for name, c in cov.items():
            mem = m.memory[name]
            outside[energy][name] = float(torch.trace(c - mem @ (mem.T @ c)) / torch.trace(c))
            if energy == "linear":
                ratios = torch.linalg.eigvalsh(c).flip(0) / torch.trace(c)
                k = mem.shape[1]
                assert abs(float(1 - ratios[:k].sum()) - outside[energy][name]) < 1e-9  # the top k eigenvectors
                assert 0.1 - 1e-9 < outside[energy][name] <= 0.1 + float(ratios[k]) + 1e-9
    assert all(outside["linear"][n] < outside["squared"][n] for n in outside["linear"])


def test_linear_energy_later_task_on_a_hand_computed_covariance(vit):
    """Eigenvalues (4, 3, 2, 1): at 0.8 the linear rule keeps 2 directions (prefix sums 0.4, 0.7
    below 0.8), the squared rule 1 (16/30 = 0.53; 25/30 = 0.83). A second task with eigenvalues
    (1, 1, 4, 4) on the same axes holds 2/10 already and adds e3, e4 (0.2 -> 0.6 -> 1.0)."""
    eye = torch.eye(4, dtype=torch.float64)
    first, second = torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)), \
        torch.diag(torch.tensor([1.0, 1, 4, 4], dtype=torch.float64))
    kept = {}
    for energy in ("squared", "linear"):
        m = make_method("inflora", vit, {"threshold": 0.8, "threshold_end": 0.8, "energy": energy})
        m.tasks = ["a"]
        m.memory["x"] = m._grown_memory("x", first)
        kept[energy] = m.memory["x"].shape[1]
        if energy == "linear":
            proj = m.memory["x"] @ m.memory["x"].T
            assert torch.allclose(proj, torch.diag(torch.tensor([1.0, 1, 0, 0], dtype=torch.float64)), atol=1e-12)
            m.tasks = ["a", "b"]
            m.memory["x"] = m._grown_memory("x", second)
            assert m.memory["x"].shape[1] == 4
            assert torch.allclose(m.memory["x"] @ m.memory["x"].T, eye, atol=1e-12)
    assert kept == {"squared": 1, "linear": 2}


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
                          ({"threshold": 0.9, "threshold_end": 0.8}, "threshold_end"),
                          ({"energy": "quadratic"}, "energy")]:
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
