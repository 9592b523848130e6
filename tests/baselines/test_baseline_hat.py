"""HAT: gates, parameter counts and protection of units used by earlier tasks."""

import pytest
import torch

from recast.baselines import HAT, HATConfig, TrainConfig, make_method
from recast.baselines.hat import gate_sites

GATED_VIT = 6 * (64 * 192 + 192 + 192 * 64)  # fc1 weight + bias, fc2 weight per block


def use_first_half(m: HAT, task: str) -> None:
    """Make ``task`` use exactly the first half of every site's units."""
    with torch.no_grad():
        for e in m.embeddings[task]:
            half = e.numel() // 2
            e[:half], e[half:] = 6.0, -6.0


def test_hat_parameter_counts_include_task_embeddings(vit, tasks):
    m = make_method("hat", vit)
    m.before_task(tasks[0])
    assert [s.units for s in m.sites] == [192] * 6
    assert sum(p.numel() for p in m.trainable_parameters()) == 300_096 + 6 * 192 + 130
    m.after_task(tasks[0], tasks[0].train)
    m.before_task(tasks[1])
    assert sum(p.numel() for p in m.trainable_parameters()) == GATED_VIT + 6 * 192 + 195
    assert not vit.blocks[0].attn.qkv.weight.requires_grad  # ungated: frozen after the first task


def test_hat_resnet_sites_are_block_batchnorms(resnet):
    sites, params = gate_sites(resnet)
    # test_resnet: BasicBlock, BasicBlock, Bottleneck, BasicBlock -> 2 + 2 + 3 + 2 sites
    assert [s.units for s in sites] == [32, 32, 48, 48, 48, 48, 192, 96, 96]
    conv2 = next(g for g in params if g.param is resnet.layer1[0].conv2.weight)
    assert conv2.axes == [(0, 1), (1, 0)]
    with pytest.raises(TypeError, match="Linear"):
        gate_sites(torch.nn.Linear(2, 2))


def test_hat_gates_scale_and_regulariser(vit, tasks):
    m = make_method("hat", vit, HATConfig(s_max=100.0))
    m.before_task(tasks[0])
    m.num_batches = 5
    m.batch_index = 0
    assert m.current_scale() == pytest.approx(0.01)
    m.batch_index = 4  # the authors' schedule stops one batch short of s_max
    assert m.current_scale() == pytest.approx(0.01 + (100.0 - 0.01) * 4 / 5)
    half = [torch.full((192,), 0.5)] * 6
    assert float(m.mask_regulariser(half)) == pytest.approx(0.5)
    use_first_half(m, "a")
    m.after_task(tasks[0], tasks[0].train)
    assert float(m.cumulative[0].sum()) == 96.0
    ones = [torch.ones(192)] * 6  # a new task reusing every unit pays only for the free ones
    assert float(m.mask_regulariser(ones)) == pytest.approx(1.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_hat_blocks_updates_of_units_used_before(vit, tasks, fit_one_batch, optimizer):
    m = make_method("hat", vit)
    m.before_task(tasks[0])
    use_first_half(m, "a")
    m.after_task(tasks[0], tasks[0].train)
    x = next(iter(tasks[0].test))[0]
    m.eval()
    with torch.no_grad():
        logits_a = m(x, "a")
    fc1, fc2 = vit.blocks[2].mlp.fc1.weight, vit.blocks[2].mlp.fc2.weight
    fc1_before, fc2_before = fc1.detach().clone(), fc2.detach().clone()
    qkv = vit.blocks[2].attn.qkv.weight.detach().clone()
    fit_one_batch(m, tasks[1], lr=0.1, optimizer=optimizer, weight_decay=0.1)
    assert torch.equal(fc1[:96], fc1_before[:96]) and not torch.equal(fc1[96:], fc1_before[96:])
    assert torch.equal(fc2[:, :96], fc2_before[:, :96])
    assert not torch.equal(fc2[:, 96:], fc2_before[:, 96:])
    assert torch.equal(vit.blocks[2].attn.qkv.weight, qkv)
    assert all(float(e.detach().abs().max()) <= 6.0 for e in m.embeddings["b"])
    with torch.no_grad():
        assert torch.equal(m(x, "a"), logits_a)  # task a's units and gates are untouched


def test_hat_resnet_protects_connections_and_batchnorm(resnet, tasks, fit_one_batch):
    m = make_method("hat", resnet)
    m.before_task(tasks[0])
    use_first_half(m, "a")
    m.after_task(tasks[0], tasks[0].train)
    block = resnet.layer1[0]
    conv2 = block.conv2.weight.detach().clone()
    running = block.bn2.running_mean.clone()
    fit_one_batch(m, tasks[1], lr=0.1, optimizer="adamw", weight_decay=0.1)
    w = block.conv2.weight
    assert torch.equal(w[:16, :16], conv2[:16, :16])  # both ends used by task a
    assert not torch.equal(w[16:], conv2[16:])  # free output channels learn
    assert not torch.equal(w[:16, 16:], conv2[:16, 16:])  # used output, free input: not blocked
    assert torch.equal(block.bn2.running_mean, running)


def test_hat_forgets_nothing_in_a_run(vit, tasks):
    from recast.baselines import run_sequential
    m = make_method("hat", vit)
    r = run_sequential(m, tasks, TrainConfig(epochs=2, lr=5e-3), progress=False)
    assert r.acc_matrix[1][0] == r.acc_matrix[0][0] and r.forgetting[0] == 0.0
    assert r.task_bytes[0] == (64 * 2 + 2 + 6 * 192) * 4
