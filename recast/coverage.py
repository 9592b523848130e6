"""Does RECAST reproduce a model exactly? The check behind "any timm or torch model".

With as many templates per bank as the bank has layers, closed-form Neural Mimicry reconstructs
every targeted weight (up to float rounding), so the templated model must compute the original
model's outputs. ``exactness`` templates every Linear/Conv2d outside the classifier (one bank per
weight shape), runs the closed form and compares the outputs on a batch. The outcome is
``"exact"`` (relative error within ``tol``, and perturbing the coefficients by 1 % moves the
output by more than ``tol``: the templated layers do reach it), ``"refused"`` (a named error
before any compute: ``UnsupportedModuleError``, ``HeadDetectionError``), ``"inconclusive"``
(within ``tol``, but the output hardly depends on the templated layers, so the check proves
little) or ``"other"`` (anything else: a wrong output or a crash, i.e. a defect).

``prepare_random`` makes a randomly initialised model a fair test: parameters that a fresh
model holds constant (zero-initialised residual gains, layer scales, BatchNorm affine) are
re-drawn so that every layer reaches the output (constant biases as small noise, so that they
cannot drown it), and BatchNorm statistics are calibrated on random batches.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from recast.config import MimicryConfig, RecastConfig
from recast.layers import UnsupportedModuleError
from recast.mimicry import mimic
from recast.model import HeadDetectionError, apply, find_head_name

Outcome = Literal["exact", "refused", "other", "inconclusive"]
REFUSALS = (UnsupportedModuleError, HeadDetectionError)


@dataclass(frozen=True)
class Exactness:
    """The result of ``exactness``: ``outcome``; ``rel_error`` max |rc - original| / max |original|
    (None unless both ran); ``templated`` the number of templated modules; ``detail`` the error
    (class and message) when not exact."""

    outcome: Outcome
    rel_error: float | None
    templated: int
    detail: str = ""
    sensitivity: float | None = None  # relative output change when the coefficients are perturbed
    dtype: str = "float32"  # of the comparison that decided the outcome


def prepare_random(model: nn.Module, batch_fn: Callable[[int], torch.Tensor], calibration_batches: int = 3,
                   seed: int = 0) -> nn.Module:
    """Re-draw constant parameters and calibrate BatchNorm statistics (in place); returns the
    model in eval mode. ``batch_fn(i)`` gives the i-th calibration batch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):  # constant: zeros, ones, 1e-5 layer scale
                if name.rsplit(".", 1)[-1] == "bias":  # a shift: small, so it cannot drown the signal
                    p.copy_(0.01 * torch.randn(p.shape, generator=gen).to(p))
                else:  # a gain (zero-initialised residual gain, layer scale, norm weight): order one
                    p.copy_(torch.rand(p.shape, generator=gen).to(p) + 0.5)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            if m.track_running_stats and m.running_mean is not None:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        if norms:
            model.train()
            for i in range(calibration_batches):
                model(batch_fn(i))
    return model.eval()


def _shape_key(model: nn.Module) -> Callable[[str], tuple[str, int, str]]:
    """A layer key that puts every module of one weight shape into one bank, in model order."""
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}

    def key(name: str) -> tuple[str, int, str]:
        shape = "x".join(str(s) for s in modules[name].weight.shape)
        return "", order[name], f"{type(modules[name]).__name__}_{shape}"

    return key


def templatable_names(model: nn.Module, head: str | None) -> list[str]:
    """Every nn.Linear/nn.Conv2d (subclasses included) outside the classifier ``head``."""
    inside = (lambda n: n == head or n.startswith(head + ".")) if head else (lambda n: False)
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d)) and not inside(n)]


def exactness(model: nn.Module, batch: torch.Tensor, tol: float = 1e-4, head_name: str | None = None,
              float64_retry: bool = True) -> Exactness:
    """Template every Linear/Conv2d of ``model`` outside its classifier, reconstruct it in closed
    form and compare outputs on ``batch`` (``model`` is not modified).

    A randomly initialised deep network can amplify float32 rounding of the reconstructed weights
    (relative ~1e-7) beyond ``tol``; with ``float64_retry`` a float32 mismatch is checked again in
    float64, where rounding is 1e-16: exact there means the float32 difference was rounding
    (``dtype`` "float64", the float32 error in ``detail``), and a real defect stays a mismatch."""
    result = _exactness(model, batch, tol, head_name)
    if result.outcome != "other" or result.rel_error is None or not float64_retry:
        return result
    try:
        wide = _exactness(copy.deepcopy(model).double(), batch.double(), tol, head_name)
    except Exception as e:  # noqa: BLE001 - reported with the float32 result
        return Exactness("other", result.rel_error, result.templated,
                         f"{result.detail}; float64 check failed: {type(e).__name__}: {e}", result.sensitivity)
    if wide.outcome != "exact":
        return Exactness("other", result.rel_error, result.templated,
                         f"{result.detail}; float64: {wide.outcome} {wide.detail or wide.rel_error}", result.sensitivity)
    return Exactness("exact", wide.rel_error, result.templated,
                     f"float32: relative error {result.rel_error:.3g}, float rounding amplified by the network (a 1 % "
                     f"coefficient change moves its output by {result.sensitivity:.0%}); float64: {wide.rel_error:.2g}",
                     wide.sensitivity, "float64")


def _exactness(model: nn.Module, batch: torch.Tensor, tol: float, head_name: str | None) -> Exactness:
    templated = 0
    try:
        head = head_name if head_name is not None else find_head_name(model)
        names = templatable_names(model, head)
        templated = len(names)
        if not names:
            return Exactness("other", None, 0, "no Linear/Conv2d to template")
        config = RecastConfig(targets=tuple(f"^{re.escape(n)}$" for n in names), regex=True, groups=1,
                              templates="group_size", coef_sets=1)
        rc = apply(model, config, layer_key=_shape_key(model), head_name=head if head is not None else "")
        mimic(rc, MimicryConfig(method="closed_form", progress=False))
        rc.eval()
        with torch.no_grad():
            expected, got = model(batch), rc(batch)
            gen = torch.Generator().manual_seed(0)
            for _, layer in rc.recast_layers():  # do the templated layers reach the output?
                coefs = layer.coefs[rc.config.base_task]
                coefs.add_(0.01 * coefs.abs().mean() * torch.randn(coefs.shape, generator=gen).to(coefs))
            perturbed = rc(batch)
    except REFUSALS as e:
        return Exactness("refused", None, templated, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - every other failure is the outcome "other", reported
        return Exactness("other", None, templated, f"{type(e).__name__}: {e}")
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return Exactness("other", None, templated, "outputs of different types or shapes")
    scale = float(expected.abs().max())
    if not torch.isfinite(expected).all() or scale == 0.0:
        return Exactness("inconclusive", None, templated, "the original output is not finite or all zero")
    rel = float((got - expected).abs().max()) / scale
    moved = float((perturbed - got).abs().max()) / scale
    if rel > tol:
        return Exactness("other", rel, templated, f"outputs differ: relative error {rel:.3g} > {tol:g}", moved)
    if not moved > tol:
        return Exactness("inconclusive", rel, templated, f"the templated layers barely reach the output: perturbing "
                         f"their coefficients by 1 % moved it by {moved:.3g}", moved)
    return Exactness("exact", rel, templated, "", moved)
