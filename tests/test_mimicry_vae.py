"""The paper's VAE reconstructor ablation (MimicryConfig(method="vae"))."""

import pytest
import torch

import recast
from recast import MimicryConfig, RecastConfig


def _rc(tiny_vit):
    return recast.apply(tiny_vit, RecastConfig(targets=("mlp.fc1",), groups=3, templates=2, coef_sets=2))


def test_vae_reconstructs_far_better_than_the_random_init(tiny_vit):
    rc = _rc(tiny_vit)
    start = recast.mimic(rc, MimicryConfig(method="gradient", steps=0, progress=False, seed=2))  # the random init
    assert abs(start.mean_weight_cosine) < 0.05
    rep = recast.mimic(_rc(tiny_vit), MimicryConfig(method="vae", steps=60, lr=1e-2, loss="mse", seed=2, progress=False))
    assert rep.method == "vae" and rep.steps == 60 and rep.final_loss > 0
    assert rep.mean_weight_cosine > start.mean_weight_cosine + 0.25


def test_vae_coefficients_are_the_encoder_output_and_generate_the_reconstruction(tiny_vit):
    rc = _rc(tiny_vit)
    rep = recast.mimic(rc, MimicryConfig(method="vae", steps=5, lr=1e-2, seed=0, progress=False))
    # the loss of the kept decoder output, recomputed from the model's generated weights: the
    # encoder's coefficients and the trained templates were both written back
    layers = dict(rc.recast_layers())
    loss = 0.0
    for bank in rc.plan.banks:
        got = torch.stack([layers[n].task_weight("pretrained").detach().flatten() for n in bank.modules])
        ref = torch.stack([rc.reference_weights[n].flatten() for n in bank.modules])
        loss += float(torch.nn.functional.smooth_l1_loss(got, ref))
    assert rep.final_loss == pytest.approx(loss, rel=1e-5)
    assert all(layer.coefs["pretrained"].shape == (2, 2) for layer in layers.values())


def test_vae_is_deterministic_under_a_seed(tiny_vit):
    def run(seed):
        rc = _rc(tiny_vit)
        recast.mimic(rc, MimicryConfig(method="vae", steps=10, lr=1e-2, seed=seed, progress=False))
        coefs = torch.cat([layer.coefs["pretrained"].detach().flatten() for _, layer in rc.recast_layers()])
        return torch.cat([b.templates.detach().flatten() for b in rc.banks.values()] + [coefs])

    first = run(3)
    assert torch.equal(first, run(3))
    assert not torch.equal(first, run(4))


def test_vae_config_validation():
    with pytest.raises(ValueError, match="vae_hidden"):
        MimicryConfig(method="vae", vae_hidden=0)
    with pytest.raises(ValueError, match="best_state"):
        MimicryConfig(best_state="lowest")
