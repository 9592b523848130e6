import pytest
import torch
import torch.nn.functional as F

import recast
from recast import MimicryConfig, RecastConfig, preset


def test_closed_form_exact_when_n_covers_group(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_att_mlp", groups=3, templates=2))  # 2 layers per group
    rep = recast.mimic(rc, batch=torch.randn(4, 3, 32, 32))
    assert rep.min_weight_cosine > 0.999999
    assert rep.min_feature_cosine > 0.999999
    assert set(rep.feature_cosine) == {f"blocks.{i}" for i in range(6)}
    # coefficients rescaled: mean norm of coefficient vectors per bank is 1
    layers = dict(rc.recast_layers())
    norms = torch.stack([layers[n].coefs["pretrained"][0].norm() for n in rc.plan.banks[0].modules])
    assert float(norms.detach().mean()) == pytest.approx(1.0, abs=1e-5)


def test_closed_form_is_best_rank_n_fit(tiny_vit):
    rc = recast.apply(tiny_vit, RecastConfig(targets=("mlp.fc1",), groups=1, templates=2, coef_sets=2))
    recast.mimic(rc)
    names = rc.plan.banks[0].modules
    ref = torch.stack([rc.reference_weights[n].flatten() for n in names]).double()  # (6, D)
    s = torch.linalg.svdvals(ref)
    optimal = s[2:].pow(2).sum().sqrt()  # Eckart-Young residual of the best rank-2 fit
    layers = dict(rc.recast_layers())
    got = torch.stack([layers[n].task_weight("pretrained").detach().flatten() for n in names]).double()
    assert float((got - ref).norm()) == pytest.approx(float(optimal), rel=1e-4)


def _gradient(model, config, **cfg):
    """A fresh RecastModel of ``model`` after gradient mimicry with ``cfg`` (no noise unless given)."""
    rc = recast.apply(model, config)
    rep = recast.mimic(rc, MimicryConfig(**{"method": "gradient", "noise_std": 0.0, "progress": False, **cfg}))
    return rc, rep


def _templates(rc, role=""):
    return torch.cat([b.templates.detach().flatten() for k, b in rc.banks.items() if role in k])


def test_gradient_mimicry_paper_procedure_reduces_loss(tiny_vit):
    cfg = preset("recast_mlp", groups=3)
    _, start = _gradient(tiny_vit, cfg, steps=0, noise_std=1e-4)  # the paper's random init, unchanged
    _, rep = _gradient(tiny_vit, cfg, steps=150, step_size=100, noise_std=1e-4)
    assert rep.steps == 150 and start.steps == 0
    assert rep.final_loss < start.final_loss / 100  # measured: 0.165 -> 4.5e-4
    assert rep.mean_weight_cosine > 0.9 > start.mean_weight_cosine + 0.5  # measured: 0.95 from about 0


def test_gradient_mimicry_on_resnet_with_paper_role_weights(tiny_resnet):
    cfg = preset("recast_resnet")
    paper = {"lr": 0.2, "step_size": 500, "role_weights": {"conv1": 3.5, "conv2": 2.5}}  # no noise (paper ResNet)
    _, start = _gradient(tiny_resnet, cfg, steps=0, **paper)
    _, rep = _gradient(tiny_resnet, cfg, steps=50, **paper)
    assert rep.final_loss < start.final_loss / 10
    assert rep.mean_weight_cosine > 0.9 and abs(start.mean_weight_cosine) < 0.1


def test_mimicry_loss_is_role_weighted_smooth_l1_mean_per_module(tiny_vit):
    """The loss at the random init, by hand: sum over modules of w_role * mean SmoothL1(beta 1)."""
    cfg = preset("recast_mlp", groups=3)
    rc, rep = _gradient(tiny_vit, cfg, steps=0, default_weight=2.0, role_weights={"fc2": 0.5})
    expected = 0.0
    for name, layer in rc.recast_layers():
        w = 0.5 if name.endswith("fc2") else 2.0
        diff = F.smooth_l1_loss(layer.task_weight("pretrained"), rc.reference_weights[name], beta=1.0)
        expected += w * float(diff.detach())
    assert rep.final_loss == pytest.approx(expected, rel=1e-5)
    _, mse = _gradient(tiny_vit, cfg, steps=0, loss="mse")
    expected = sum(2.0 * float(F.mse_loss(layer.task_weight("pretrained").detach(), rc.reference_weights[name]))
                   for name, layer in rc.recast_layers())
    assert mse.final_loss == pytest.approx(expected, rel=1e-5)


def test_zero_role_weight_leaves_that_role_untouched(tiny_vit):
    cfg = preset("recast_mlp", groups=3)
    init, _ = _gradient(tiny_vit, cfg, steps=0)
    rc, _ = _gradient(tiny_vit, cfg, steps=3, lr=1e-3, role_weights={"fc2": 0.0})
    assert torch.equal(_templates(rc, "fc2"), _templates(init, "fc2"))
    assert not torch.equal(_templates(rc, "fc1"), _templates(init, "fc1"))


def test_first_step_is_rmsprop(tiny_vit):
    """RMSprop (alpha 0.99) moves every parameter by lr / sqrt(1 - 0.99) = 10 lr in its first
    step (Adam: lr; SGD: lr * gradient, here about 1e-5 lr)."""
    cfg = preset("recast_mlp", groups=3)
    init, start = _gradient(tiny_vit, cfg, steps=0)
    rc, rep = _gradient(tiny_vit, cfg, steps=1, lr=1e-3, grad_clip=None, eval_every=1)
    assert rep.final_loss < start.final_loss  # the stepped state is the kept one
    moved = (_templates(rc) - _templates(init)).abs() / 1e-3
    assert 9.5 < float(moved.median()) <= 10.0 + 1e-4 and float(moved.max()) <= 10.0 + 1e-4  # measured: 9.88


def test_step_lr_schedule(tiny_vit):
    """StepLR(step_size=2, gamma=0): the learning rate is 0 from the third step on."""
    cfg = preset("recast_mlp", groups=3)
    runs = {steps: _templates(_gradient(tiny_vit, cfg, steps=steps, lr=1e-3, step_size=2, gamma=0.0,
                                        eval_every=1)[0]) for steps in (1, 2, 5)}
    assert not torch.equal(runs[1], runs[2])
    assert torch.equal(runs[2], runs[5])


def test_noise_changes_the_trajectory_and_is_seeded(tiny_vit):
    cfg = preset("recast_mlp", groups=3)
    quiet = _templates(_gradient(tiny_vit, cfg, steps=5)[0])
    noisy = [_templates(_gradient(tiny_vit, cfg, steps=5, noise_std=1e-2)[0]) for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1])  # the noise comes from the config's seed
    assert not torch.allclose(noisy[0], quiet, atol=1e-6)


def test_refine_keeps_closed_form_quality(tiny_vit):
    rc = recast.apply(tiny_vit, RecastConfig(targets=("mlp.fc1",), groups=1, templates=3))
    closed = recast.mimic(rc).mean_weight_cosine
    rc2 = recast.apply(tiny_vit, RecastConfig(targets=("mlp.fc1",), groups=1, templates=3))
    refined = recast.mimic(rc2, MimicryConfig(method="refine", steps=20, lr=1e-4, loss="mse", progress=False))
    assert refined.mean_weight_cosine >= closed - 1e-6  # best state is kept, never worse


def test_mimicry_is_deterministic(tiny_vit):
    reps = []
    for _ in range(2):
        rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))
        recast.mimic(rc, MimicryConfig(method="gradient", steps=10, progress=False, seed=3))
        reps.append(torch.cat([b.templates.flatten() for b in rc.banks.values()]))
    assert torch.equal(reps[0], reps[1])


def test_bad_mimicry_config():
    with pytest.raises(ValueError, match="method"):
        MimicryConfig(method="svd")
    with pytest.raises(ValueError, match="steps"):
        MimicryConfig(steps=-1)


def test_refine_with_paper_lr_never_ends_worse(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))  # exact closed form (n = 2 layers/group)
    rep = recast.mimic(rc, MimicryConfig(method="refine", steps=5, lr=0.1, progress=False))
    assert rep.min_weight_cosine > 0.999999  # the exact starting state is kept as the best


def test_gradient_starts_from_random_init_even_after_closed_form(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))
    recast.mimic(rc)
    before = {n: layer.coefs["pretrained"].detach().clone() for n, layer in rc.recast_layers()}
    recast.mimic(rc, MimicryConfig(method="gradient", steps=1, lr=1e-6, progress=False))
    after = dict(rc.recast_layers())
    for n, c in before.items():
        got = after[n].coefs["pretrained"].detach()
        assert not torch.allclose(got, c, atol=1e-3)
        assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-3)  # unit-vector sets


def test_sparser_best_state_checks_follow_the_same_trajectory(tiny_vit):
    losses = {}
    for every in (1, 7, 40):  # 40 > steps: only the last step is checked
        rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))
        rep = recast.mimic(rc, MimicryConfig(method="gradient", steps=30, step_size=100, eval_every=every, progress=False))
        losses[every] = rep.final_loss
    # the noise-free check draws no noise, so the steps are identical: every check sees a subset
    # of the states the every-step check sees, and the last state is always among them
    assert losses[1] <= losses[7] <= losses[40] * (1 + 1e-6)
    with pytest.raises(ValueError, match="eval_every"):
        MimicryConfig(eval_every=0)


def test_gradient_mimicry_records_its_loss_every_eval_every_steps(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))
    rep = recast.mimic(rc, MimicryConfig(method="gradient", steps=10, step_size=100, eval_every=4, progress=False))
    assert [h["step"] for h in rep.loss_history] == [4, 8, 10]  # and the last step
    assert rep.final_loss == pytest.approx(min(h["loss"] for h in rep.loss_history))
    assert rep.as_dict()["loss_history"] == rep.loss_history
    closed = recast.mimic(recast.apply(tiny_vit, preset("recast_mlp", groups=3)))
    assert closed.loss_history == []
