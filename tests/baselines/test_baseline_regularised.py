"""Head-only, full fine-tuning, EWC and LwF: parameter counts and what one step changes."""

import pytest
import torch

from recast.baselines import EWCConfig, make_method

VIT_PARAMS = 300_096  # timm test_vit, img_size=32, num_classes=0


def test_head_only_trains_exactly_the_head(vit, tasks, fit_one_batch, snapshot, changed):
    m = make_method("finetune_head", vit)
    before = snapshot(m)
    fit_one_batch(m, tasks[0])
    assert sum(p.numel() for p in m.trainable_parameters()) == 64 * 2 + 2
    assert changed(before, m) == {"net.heads.a.weight", "net.heads.a.bias"}


def test_head_only_keeps_batchnorm_statistics(resnet, tasks, fit_one_batch, snapshot, changed):
    m = make_method("finetune_head", resnet)
    before = snapshot(m)
    fit_one_batch(m, tasks[0])
    assert sum(p.numel() for p in m.trainable_parameters()) == 96 * 2 + 2
    assert changed(before, m) == {"net.heads.a.weight", "net.heads.a.bias"}


def test_full_finetune_starts_every_task_from_the_initial_backbone(vit, tasks, fit_one_batch):
    m = make_method("finetune_full", vit)
    initial = {k: v.clone() for k, v in m.net.backbone.state_dict().items()}
    fit_one_batch(m, tasks[0])
    m.before_task(tasks[1])
    assert sum(p.numel() for p in m.trainable_parameters()) == VIT_PARAMS + 64 * 3 + 3
    b_state, a_state = m.task_backbones["b"].state_dict(), m.task_backbones["a"].state_dict()
    assert all(torch.equal(b_state[k], v) for k, v in initial.items())
    assert not all(torch.equal(a_state[k], v) for k, v in initial.items())
    assert m.shared_state() == {}


def test_ewc_penalty_zero_at_anchor_positive_after_step(vit, tasks, fit_one_batch):
    m = make_method("ewc", vit, EWCConfig(lam=100.0))
    assert float(m.penalty().detach()) == 0.0
    fit_one_batch(m, tasks[0])
    m.after_task(tasks[0], tasks[0].train)
    fisher = torch.cat([f.flatten() for f in m.fisher.values()])
    assert len(m.fisher) == len(list(vit.parameters())) and fisher.min() >= 0 and fisher.max() > 0
    assert float(m.penalty().detach()) == 0.0
    head_a = m.net.heads["a"].weight.detach().clone()
    fit_one_batch(m, tasks[1])
    expected = 100.0 * sum(float((m.fisher[n] * (p.detach() - m.anchor[n]) ** 2).sum())
                                 for n, p in vit.named_parameters())
    assert float(m.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    assert float(m.penalty().detach()) > 0
    assert torch.equal(m.net.heads["a"].weight, head_a)  # old heads are not trained
    assert sum(p.numel() for p in m.trainable_parameters()) == VIT_PARAMS + 64 * 3 + 3


def test_ewc_online_fisher_accumulates(vit, tasks, fit_one_batch):
    m = make_method("ewc", vit, {"gamma": 0.5, "fisher_max_batches": 1})
    fit_one_batch(m, tasks[0])
    m.after_task(tasks[0], tasks[0].train)
    first = {n: f.clone() for n, f in m.fisher.items()}
    fit_one_batch(m, tasks[1])
    new = m.estimate_fisher(tasks[1], tasks[1].train)
    m.after_task(tasks[1], tasks[1].train)
    name = "blocks.0.mlp.fc1.weight"
    assert torch.allclose(m.fisher[name], 0.5 * first[name] + new[name])


def test_lwf_distillation_is_teacher_entropy_when_outputs_unchanged(vit, tasks, fit_one_batch):
    m = make_method("lwf", vit, {"lam": 1.0, "temperature": 2.0})
    fit_one_batch(m, tasks[0])
    x = next(iter(tasks[1].train))[0]
    assert float(m.distillation_loss(x).detach()) == 0.0  # no teacher before the second task
    m.before_task(tasks[1])
    m.eval()
    with torch.no_grad():
        soft = torch.softmax(m.teacher(x, "a") / 2.0, dim=1)
        entropy = float(-(soft * soft.log()).sum(1).mean())
    assert entropy > 0.1  # the soft cross-entropy's minimum, reached when the outputs agree
    assert float(m.distillation_loss(x).detach()) == pytest.approx(entropy, abs=1e-6)
    teacher = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    fit_one_batch(m, tasks[1], start=False)
    m.eval()
    assert float(m.distillation_loss(x).detach()) > entropy + 1e-6
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher.items())
    assert sum(p.numel() for p in m.trainable_parameters()) == VIT_PARAMS + 130 + 195


def test_lwf_trains_old_heads(vit, tasks, fit_one_batch):
    m = make_method("lwf", vit)
    fit_one_batch(m, tasks[0])
    head_a = m.net.heads["a"].weight.detach().clone()
    fit_one_batch(m, tasks[1], lr=0.5)
    assert not torch.equal(m.net.heads["a"].weight, head_a)
