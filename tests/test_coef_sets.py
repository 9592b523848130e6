"""What K (coefficient sets per module) can and cannot change (eq. 2 averages the K sets)."""

import pytest
import torch
import torch.nn.functional as F

import recast
from recast import RecastConfig


def _model(tiny_vit, coef_sets: int) -> recast.RecastModel:
    """float64 RECAST-MLP of test_vit, closed-form mimicry, task 't' active (3 classes)."""
    rc = recast.apply(tiny_vit.double(), RecastConfig(targets=("mlp.fc1", "mlp.fc2"), groups=3, templates=2,
                                                      coef_sets=coef_sets))
    recast.mimic(rc)
    torch.manual_seed(7)  # the same head for every K
    rc.add_task("t", num_classes=3)
    rc.set_task("t")
    return rc


def _batches(steps: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(steps)]


def _train(rc: recast.RecastModel, optimizer: str, steps: int = 4, eps: float = 1e-8) -> None:
    params = [p for p in rc.parameters() if p.requires_grad]
    opt = {"adam": lambda: torch.optim.Adam(params, lr=1e-2, eps=eps),
           "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5, eps=eps),
           "sgd": lambda: torch.optim.SGD(params, lr=1e-2)}[optimizer]()
    rc.train()
    for x, y in _batches(steps):
        opt.zero_grad()
        F.cross_entropy(rc(x), y).backward()
        opt.step()


def _means(rc: recast.RecastModel) -> torch.Tensor:
    return torch.cat([layer.coefs["t"].detach().mean(dim=0) for _, layer in rc.recast_layers()])


@torch.no_grad()
def _logits(rc: recast.RecastModel) -> torch.Tensor:
    return rc.eval()(_batches(1)[0][0])


def _spread(rc: recast.RecastModel, scale: float = 0.3) -> None:
    """Move the K sets apart symmetrically: their mean (the weight) is unchanged."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in rc.recast_layers():
            c = layer.coefs["t"]
            d = scale * torch.randn(c.shape[1], generator=g, dtype=c.dtype)
            c[0] += d
            c[1] -= d


def test_closed_form_writes_identical_sets_that_stay_identical(tiny_vit):
    rc = _model(tiny_vit, coef_sets=2)
    layers = dict(rc.recast_layers())
    assert all(torch.equal(layer.coefs["pretrained"][0], layer.coefs["pretrained"][1]) for layer in layers.values())
    for optimizer in ("adamw", "sgd"):
        _train(rc, optimizer)
        for layer in layers.values():
            c = layer.coefs["t"]
            assert not torch.equal(c, layer.coefs["pretrained"])  # trained
            assert torch.equal(c[0], c[1])  # identical gradients: the sets never separate


@pytest.mark.parametrize("optimizer, eps, tol", [
    ("adam", 1e-30, 1e-12), ("adamw", 1e-30, 1e-12),  # no epsilon: equal to float64 rounding
    ("adam", 1e-8, 1e-4), ("adamw", 1e-8, 1e-4),  # torch's default epsilon: equal up to its effect
])
def test_under_adam_k_sets_move_their_mean_as_one_set(tiny_vit, optimizer, eps, tol):
    one, two = _model(tiny_vit, 1), _model(tiny_vit, 2)
    _spread(two)
    torch.testing.assert_close(_means(two), _means(one), rtol=0, atol=1e-15)  # same start
    start = _means(one)
    _train(one, optimizer, eps=eps)
    _train(two, optimizer, eps=eps)
    moved = float((_means(one) - start).abs().max())
    assert moved > 1e-2  # four steps of lr 1e-2 moved the coefficients
    # Adam is invariant to each parameter's gradient scale: 1/K of the gradient per set moves
    # every set, and so the mean, by K=1's step; only epsilon is compared at another scale
    # (K*eps against K=1's eps), which matters for coefficients with tiny gradients
    assert float((_means(two) - _means(one)).abs().max()) < tol * moved
    assert float((_logits(two) - _logits(one)).abs().max()) < tol
    c = dict(two.recast_layers())["blocks.0.mlp.fc1"].coefs["t"].detach()
    assert float((c[0] - c[1]).abs().max()) > 0.1  # the sets stayed apart, only their mean matters


def test_k_changes_the_sgd_step_and_the_clipped_gradient_norm(tiny_vit):
    one, two = _model(tiny_vit, 1), _model(tiny_vit, 2)
    x, y = _batches(1)[0]
    norms = {}
    for k, rc in ((1, one), (2, two)):
        rc.train()
        F.cross_entropy(rc(x), y).backward()
        grads = torch.cat([layer.coefs["t"].grad.flatten() for _, layer in rc.recast_layers()])
        norms[k] = float(grads.norm())
        rc.zero_grad()
    assert norms[2] == pytest.approx(norms[1] / 2 ** 0.5, rel=1e-9)  # what grad-norm clipping sees
    start = _means(one)
    _train(one, "sgd", steps=1)
    _train(two, "sgd", steps=1)
    torch.testing.assert_close(_means(two) - start, (_means(one) - start) / 2, rtol=1e-6, atol=1e-12)
