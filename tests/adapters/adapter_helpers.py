"""Helpers shared by the adapter tests (a uniquely named module, not conftest, so imports
resolve the same whether tests/ or tests/adapters/ is collected)."""

import torch


def perturb(params, scale=0.05, seed=3):
    """Make every adapter delta non-zero (B, up, masks...) so merge tests are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))
