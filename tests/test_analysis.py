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


def test_coefficient_similarity_known_cosines(tiny_vit):
    """Three layers per group with coefficient sets of known cosines (flattened over K):
    A=[[1,0],[0,1]] and B=[[0,1],[1,0]] are orthogonal (their means over K are equal, so a
    mean-over-K cosine would say 1); C=[[3,0],[0,-1]] has cosine 2/sqrt(20) with A, 0 with B."""
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=2))
    rc.add_task("a", num_classes=3)
    sets = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
            torch.tensor([[3.0, 0.0], [0.0, -1.0]])]
    layers = dict(rc.recast_layers())
    with torch.no_grad():
        for mp in rc.plan.modules:
            layers[mp.name].coefs["a"].copy_(sets[mp.position])
    ac = 2 / math.sqrt(20)
    sim = recast.coefficient_similarity(rc, "a")
    assert set(sim) == {b.key for b in rc.plan.banks} and len(sim) == 4
    for bank in rc.plan.banks:
        first = 3 * bank.group  # layers of group g: 3g, 3g+1, 3g+2
        expected = {f"{first}-{first + 1}": 0.0, f"{first}-{first + 2}": ac, f"{first + 1}-{first + 2}": 0.0,
                    "mean": ac / 3}
        assert sim[bank.key] == pytest.approx(expected, abs=1e-12)
    base = recast.coefficient_similarity(rc)  # the base task keeps its random unit sets
    assert all(abs(v["mean"] - ac / 3) > 1e-3 for v in base.values())
