import pytest
import torch

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


def test_gradient_mimicry_paper_procedure_reduces_loss(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))
    cfg = MimicryConfig(method="gradient", steps=150, step_size=100, progress=False)
    rep = recast.mimic(rc, cfg)
    assert rep.steps == 150
    assert rep.final_loss > 0
    assert rep.mean_weight_cosine > 0.8  # converging from a random init


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
