import math

import pytest
import torch

import recast
from recast import RecastConfig, preset


def test_template_diversity_orthogonal_and_scale_invariant(tiny_vit):
    rc = recast.apply(tiny_vit, RecastConfig(targets=("mlp.fc1",), groups=1, templates=2))
    bank = next(iter(rc.banks.values()))
    with torch.no_grad():
        bank.templates.zero_()
        bank.templates[0, 0, 0] = 5.0  # rank-1 template, scaled
        bank.templates[1, 1, 1] = 0.1
    d = recast.template_diversity(rc)[next(iter(rc.banks))]
    assert d["frobenius"] == pytest.approx(math.sqrt(2))  # orthogonal after normalisation
    assert d["sv_entropy"] == pytest.approx(0.0, abs=1e-9)  # one singular value
    with torch.no_grad():
        bank.templates[0] = torch.eye(192, 64)
    assert recast.template_diversity(rc)[next(iter(rc.banks))]["sv_entropy"] == pytest.approx(math.log(64) / 2)


def test_coefficient_similarity(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=2))
    with torch.no_grad():
        for _, layer in rc.recast_layers():
            layer.coefs["pretrained"].fill_(1.0)
    sim = recast.coefficient_similarity(rc)
    assert len(sim) == 4
    for vals in sim.values():
        assert len(vals) == 4  # 3 pairs of 3 layers + mean
        assert vals["mean"] == pytest.approx(1.0)
