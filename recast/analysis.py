"""Analyses of a RECAST model: template diversity and intra-group coefficient similarity.

Choices the paper leaves open, fixed here:
- Scale ambiguity (T -> aT, c -> c/a): every template is divided by its Frobenius norm first.
- Diversity distance: mean over template pairs of the (non-squared) Frobenius distance of the
  normalised templates; it lies in [0, 2], sqrt(2) for orthogonal templates.
- Singular-value entropy: a template (conv: reshaped to (out, in*kh*kw)) has singular values
  sigma; p = sigma / sum(sigma) (sigma, not sigma^2); H = -sum p ln p (natural log), also
  reported normalised by ln(rank) so 1 means a flat spectrum.
- Coefficient similarity: for one task, a layer's coefficients of one role are flattened
  (K*n numbers, all K sets); cosine between every pair of layers in a group.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from recast.model import RecastModel


@torch.no_grad()
def template_diversity(rc: RecastModel) -> dict[str, dict[str, float]]:
    """Per bank: ``frobenius`` (mean pairwise distance), ``sv_entropy`` and ``sv_entropy_norm``."""
    out = {}
    for key, bank in rc.banks.items():
        t = bank.templates.detach().double()
        flat = t.flatten(1)
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n, D), unit Frobenius
        pairs = list(itertools.combinations(range(flat.shape[0]), 2))
        dist = sum(float((flat[i] - flat[j]).norm()) for i, j in pairs) / len(pairs) if pairs else 0.0
        entropies, normed = [], []
        for tpl in t:
            mat = tpl.reshape(tpl.shape[0], -1)  # conv (out, in, kh, kw) -> (out, in*kh*kw)
            s = torch.linalg.svdvals(mat)
            p = s / s.sum().clamp_min(1e-300)
            p = p[p > 0]
            h = float(-(p * p.log()).sum())
            entropies.append(h)
            normed.append(h / math.log(len(s)) if len(s) > 1 else 0.0)
        out[key] = {"frobenius": dist, "sv_entropy": sum(entropies) / len(entropies),
                    "sv_entropy_norm": sum(normed) / len(normed)}
    return out


@torch.no_grad()
def coefficient_similarity(rc: RecastModel, task: str | None = None) -> dict[str, dict[str, float]]:
    """Per bank: cosine of flattened coefficients for each pair of its layers, and their mean."""
    task = task or rc.config.base_task
    layers = dict(rc.recast_layers())
    members: dict[str, list[tuple[int, str]]] = {}
    for mp in rc.plan.modules:
        members.setdefault(mp.bank, []).append((mp.layer, mp.name))
    out = {}
    for key, mods in members.items():
        mods.sort()
        vals = {}
        for (la, a), (lb, b) in itertools.combinations(mods, 2):
            ca, cb = layers[a].coefs[task].flatten().double(), layers[b].coefs[task].flatten().double()
            vals[f"{la}-{lb}"] = float(F.cosine_similarity(ca, cb, dim=0))
        if vals:
            vals["mean"] = sum(vals.values()) / len(vals)
        out[key] = vals
    return out
