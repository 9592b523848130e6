"""The paper's "VAE" reconstructor, an ablation of Neural Mimicry (paper section 3, Table 6).

Per bank, a small encoder maps each reference weight of the group (flattened) to that layer's
K coefficient sets; the bank is the decoder: W = (1/K) sum_k sum_i c^(k)_i T_i (eqs. 1-2).
Encoder and templates are trained together to reconstruct the group's reference weights.
After training, each layer's coefficients are the encoder's output on its own reference weight,
so the RecastModel generates exactly the decoder's reconstruction.

As in the authors' code (``reconstruction-vit-vae``), the encoder is deterministic (no sampling,
no KL term): Linear(D, h), LeakyReLU, Linear(h, h), LeakyReLU, Linear(h, K*n) with h = 8;
SmoothL1 (or MSE) between reconstruction and reference, mean over all entries of the group;
RMSprop, cosine annealing over the steps, grad-norm clipping; each bank is trained on its own;
the state of highest mean weight cosine is kept. The authors check it on the state before each
update; here the state after the last update is a candidate too.
Paper (Table 6, ViT-S MLP): ImageNet top-1 73.8 (VAE + MSE) and 73.0 (VAE + SmoothL1) against
74.6 for the original and for Neural Mimicry; reconstruction similarity 98.5 % / 98.6 %.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recast.config import MimicryConfig
from recast.model import RecastModel


def _linear(in_features: int, out_features: int, gen: torch.Generator, like: torch.Tensor) -> nn.Linear:
    """nn.Linear with torch's default init drawn from ``gen`` (no global RNG)."""
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=gen)
        bound = 1.0 / math.sqrt(in_features)
        layer.bias.uniform_(-bound, bound, generator=gen)
    return layer.to(device=like.device, dtype=like.dtype)


class CoefficientEncoder(nn.Module):
    """Flattened reference weight (D,) -> K coefficient sets (K, n), through two hidden layers."""

    def __init__(self, dim: int, coef_sets: int, num_templates: int, hidden: int, gen: torch.Generator,
                 like: torch.Tensor):
        super().__init__()
        self.coef_sets, self.num_templates = coef_sets, num_templates
        self.net = nn.Sequential(
            _linear(dim, hidden, gen, like), nn.LeakyReLU(),
            _linear(hidden, hidden, gen, like), nn.LeakyReLU(),
            _linear(hidden, coef_sets * num_templates, gen, like),
        )

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        out = self.net(weights)  # (m, D) -> (m, K*n)
        return out.view(-1, self.coef_sets, self.num_templates)  # (m, K*n) -> (m, K, n)


def _loss(cfg: MimicryConfig, recon: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if cfg.loss == "mse":
        return F.mse_loss(recon, ref)
    return F.smooth_l1_loss(recon, ref, beta=1.0)


def vae(rc: RecastModel, cfg: MimicryConfig) -> tuple[float, int]:
    """Train one encoder + bank per bank of ``rc``; write templates and base coefficients.

    Templates start from the paper's kaiming init (drawn from ``cfg.seed``), encoders from
    torch's default Linear init drawn from the same generator.

    Returns:
        (sum over banks of the kept state's loss, steps per bank).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = dict(rc.recast_layers())
    base = rc.config.base_task
    total = 0.0
    for plan in rc.plan.banks:
        bank = rc.banks[plan.key]
        with torch.no_grad():
            bank.reset_parameters(gen)
        templates = bank.templates.detach().clone().flatten(1).requires_grad_(True)  # (n, D)
        ref = torch.stack([rc.reference_weights[name].flatten() for name in plan.modules]).to(templates)  # (m, D)
        encoder = CoefficientEncoder(ref.shape[1], rc.config.coef_sets, plan.templates, cfg.vae_hidden, gen, templates)
        params = [templates, *encoder.parameters()]
        opt = torch.optim.RMSprop(params, lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))

        def decode() -> tuple[torch.Tensor, torch.Tensor]:
            coefs = encoder(ref)  # (m, K, n)
            return coefs, coefs.mean(dim=1) @ templates  # (m, n) @ (n, D) -> (m, D)

        def cosine(recon: torch.Tensor) -> float:
            return float(F.cosine_similarity(recon.detach().double(), ref.double(), dim=1).mean())

        best = (-math.inf, math.inf, None)  # (mean cosine, loss, (templates, coefficients))
        for step in range(cfg.steps + 1):
            coefs, recon = decode()
            loss = _loss(cfg, recon, ref)
            cos = cosine(recon)
            if cos > best[0]:
                best = (cos, float(loss.detach()), (templates.detach().clone(), coefs.detach().clone()))
            if step == cfg.steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
        if best[2] is None:
            raise RuntimeError(f"vae mimicry of bank '{plan.key}': the weight cosine was never finite")
        kept_t, kept_c = best[2]
        with torch.no_grad():
            bank.templates.copy_(kept_t.view_as(bank.templates))
            for row, name in enumerate(plan.modules):
                layers[name].coefs[base].copy_(kept_c[row])
        total += best[1]
    return total, cfg.steps
