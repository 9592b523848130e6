"""Neural Mimicry: reconstruct pretrained weights as templates x coefficients (data-free).

Three methods (``MimicryConfig.method``):

- ``closed_form``: per bank, stack the group's m reference weights as rows of an (m, D) matrix
  and take its SVD. The n templates are the top right-singular directions; the coefficients
  are U*S. Exact when n >= m, the best rank-n Frobenius fit otherwise (Eckart-Young). Templates
  are rescaled so the mean coefficient-vector norm is 1 (the paper initialises coefficients as
  unit vectors), which keeps tuning learning rates comparable to the paper's. All K sets get
  the same vector (their mean is what eq. 2 uses). Identical sets get identical gradients, so
  they stay identical through any later training: after closed form, K only changes what
  gradient clipping sees.
- ``gradient``: the paper's procedure from its random init (kaiming templates, unit-vector
  coefficients): weighted SmoothL1 (or MSE) between generated and reference weights, Gaussian
  noise on the coefficients, RMSprop + StepLR, grad-norm clipping, best state kept. Here the K
  random sets differ; their mean starts shorter than a unit vector (about 1/sqrt(K) of it) and
  receives noise of std noise_std/sqrt(K). RMSprop, like Adam, moves each set by the same
  step whatever K is, so apart from these and clipping the mean moves as one set would.

Mimicry rewrites the shared banks and the base task's coefficients; ``mimic`` refuses to run
once other tasks exist (they were tuned against the current banks) unless ``force=True``.
- ``refine``: the gradient procedure started from the closed form (use a small lr, e.g. 1e-4:
  the paper's lr 0.1 first step moves far from an exact fit; the best state, the start
  included, is kept, so refine never ends worse than the closed form).
- ``vae``: the paper's reconstructor ablation (``recast.mimicry_vae``): an encoder maps each
  reference weight to its coefficients, the bank decodes them.

Best state of ``gradient``/``refine`` (``MimicryConfig.best_state``): ``"clean"`` (default)
keeps the lowest noise-free loss, the start included; ``"noisy"`` is the authors' rule, the
lowest noisy training loss at every step, scored on the state before that step's update.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recast.config import MimicryConfig
from recast.layers import random_unit_coefficients
from recast.mimicry_vae import vae
from recast.model import RecastModel


@dataclass
class MimicryReport:
    """Outcome of a reconstruction.

    Attributes:
        weight_cosine: per targeted module, cosine between generated and reference weight.
        feature_cosine: per layer container (``blocks.3``), mean per-sample cosine of its
            output between the reconstructed and the reference model on the given batch.
        final_loss: mimicry loss of the kept state (gradient methods; 0 for closed form).
        loss_history: gradient methods: ``{"step", "loss"}`` every ``eval_every`` steps and at
            the last step (the loss that scores the best state); empty for closed form.
    """

    method: str
    seconds: float
    weight_cosine: dict[str, float]
    feature_cosine: dict[str, float] = field(default_factory=dict)
    final_loss: float = 0.0
    steps: int = 0
    loss_history: list[dict[str, float]] = field(default_factory=list)

    @property
    def min_weight_cosine(self) -> float:
        return min(self.weight_cosine.values())

    @property
    def mean_weight_cosine(self) -> float:
        return sum(self.weight_cosine.values()) / len(self.weight_cosine)

    @property
    def min_feature_cosine(self) -> float:
        return min(self.feature_cosine.values()) if self.feature_cosine else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(min_weight_cosine=self.min_weight_cosine, mean_weight_cosine=self.mean_weight_cosine,
                 min_feature_cosine=self.min_feature_cosine)
        return d


def _bank_members(rc: RecastModel) -> dict[str, list[str]]:
    """Module names per bank, ordered by position inside the group."""
    members: dict[str, list[tuple[int, str]]] = {}
    for mp in rc.plan.modules:
        members.setdefault(mp.bank, []).append((mp.position, mp.name))
    return {k: [n for _, n in sorted(v)] for k, v in members.items()}


@torch.no_grad()
def closed_form(rc: RecastModel, seed: int = 0) -> None:
    """Set banks and base-task coefficients to the SVD reconstruction of the reference weights."""
    gen = torch.Generator().manual_seed(seed)
    layers = dict(rc.recast_layers())
    base = rc.config.base_task
    for key, names in _bank_members(rc).items():
        bank = rc.banks[key]
        n = bank.num_templates
        ref = torch.stack([rc.reference_weights[nm].flatten() for nm in names]).double()  # (m, D)
        m = ref.shape[0]
        # SVD through the small (m, m) Gram matrix: ref = U S Vh, Vh = S^-1 U^T ref.
        evals, evecs = torch.linalg.eigh(ref @ ref.T)  # ascending
        order = torch.argsort(evals, descending=True)
        s = evals[order].clamp_min(0).sqrt()
        u = evecs[:, order]
        k = min(n, m)
        keep = s[:k] > s[0] * 1e-12 if s.numel() and s[0] > 0 else torch.zeros(k, dtype=torch.bool)
        templates = torch.zeros(n, ref.shape[1], dtype=torch.float64)
        coefs = torch.zeros(m, n, dtype=torch.float64)
        for i in range(k):
            if keep[i]:
                templates[i] = (u[:, i] @ ref) / s[i]  # unit-norm right-singular vector (D,)
                coefs[:, i] = u[:, i] * s[i]
        # Unused directions (n > rank): random unit templates with zero coefficients.
        for i in range(n):
            if templates[i].norm() == 0:
                t = torch.randn(ref.shape[1], generator=gen, dtype=torch.float64)
                templates[i] = t / t.norm()
        scale = coefs.norm(dim=1).mean().clamp_min(1e-12)  # mean coefficient-vector norm -> 1
        templates *= scale
        coefs /= scale
        bank.templates.copy_(templates.view_as(bank.templates).to(bank.templates.dtype))
        for row, nm in enumerate(names):
            layer = layers[nm]
            layer.coefs[base].copy_(coefs[row].to(layer.coefs[base].dtype).expand(layer.coef_sets, n))


def _loss_fn(cfg: MimicryConfig):
    if cfg.loss == "mse":
        return lambda a, b: F.mse_loss(a, b, reduction="none")
    return lambda a, b: F.smooth_l1_loss(a, b, reduction="none", beta=1.0)


def _role_weight(cfg: MimicryConfig, role: str) -> float:
    for suffix, w in cfg.role_weights.items():
        if role == suffix or role.endswith("." + suffix) or role.endswith(suffix):
            return w
    return cfg.default_weight


def gradient(rc: RecastModel, cfg: MimicryConfig, history: list[dict[str, float]] | None = None) -> tuple[float, int]:
    """The paper's gradient mimicry on the current banks/coefficients; returns (best loss, steps).

    The best loss is noise-free with ``cfg.best_state="clean"`` and the noisy training loss of
    the kept state with ``"noisy"`` (see ``MimicryConfig.best_state``). ``history``, when given,
    receives ``{"step", "loss"}`` every ``eval_every`` steps and at the last step (the noise-free
    loss, or with ``"noisy"`` the noisy loss of that step).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = dict(rc.recast_layers())
    base = rc.config.base_task
    members = _bank_members(rc)
    role = {b.key: b.role for b in rc.plan.banks}
    device = next(iter(rc.banks.values())).templates.device
    refs = {k: torch.stack([rc.reference_weights[n].flatten() for n in names]).to(device) for k, names in members.items()}
    weights = {k: _role_weight(cfg, role[k]) for k in members}
    templates = {k: rc.banks[k].templates.detach().clone().flatten(1).requires_grad_(True) for k in members}  # (n, D)
    coefs = {k: torch.stack([layers[n].coefs[base].detach() for n in names]).clone().requires_grad_(True)
             for k, names in members.items()}  # (m, K, n)
    params = list(templates.values()) + list(coefs.values())
    opt = torch.optim.RMSprop(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    loss_fn = _loss_fn(cfg)

    def total_loss(noise: bool) -> torch.Tensor:
        loss = torch.zeros((), device=device)
        for k in members:
            c = coefs[k]
            if noise and cfg.noise_std > 0:
                c = c + cfg.noise_std * torch.randn(c.shape, generator=gen).to(device)
            w = c.mean(dim=1) @ templates[k]  # (m, K, n) -> (m, n) @ (n, D) -> (m, D)
            loss = loss + weights[k] * loss_fn(w, refs[k]).mean(dim=1).sum()  # mean per module, summed
        return loss

    def snapshot() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return ({k: t.detach().clone() for k, t in templates.items()}, {k: c.detach().clone() for k, c in coefs.items()})

    noisy_best = cfg.best_state == "noisy" and cfg.steps > 0
    with torch.no_grad():  # "clean": the starting state is a candidate too, so refine never ends worse
        best = (float("inf"), None) if noisy_best else (float(total_loss(noise=False)), snapshot())
    bar = tqdm(range(cfg.steps), desc=f"mimicry[{cfg.method}]", disable=not cfg.progress, leave=False)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss = total_loss(noise=True)
        if noisy_best:  # the authors' rule: this step's noisy loss scores the state before the update
            noisy = float(loss.detach())
            if noisy < best[0]:
                best = (noisy, snapshot())
            if history is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                history.append({"step": step + 1, "loss": noisy})
            bar.set_postfix(loss=f"{noisy:.3e}", refresh=False)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if noisy_best or ((step + 1) % cfg.eval_every and step + 1 < cfg.steps):
            continue
        with torch.no_grad():
            clean = float(total_loss(noise=False))
        if history is not None:
            history.append({"step": step + 1, "loss": clean})
        if clean < best[0]:
            best = (clean, snapshot())
        bar.set_postfix(loss=f"{clean:.3e}", refresh=False)
    if best[1] is None:
        raise RuntimeError(f"gradient mimicry: the training loss was never finite in {cfg.steps} steps")
    with torch.no_grad():
        best_t, best_c = best[1]
        for k, names in members.items():
            rc.banks[k].templates.copy_(best_t[k].view_as(rc.banks[k].templates))
            for row, n in enumerate(names):
                layers[n].coefs[base].copy_(best_c[k][row])
    return best[0], cfg.steps


@torch.no_grad()
def weight_cosines(rc: RecastModel, task: str | None = None) -> dict[str, float]:
    """Cosine between each generated weight and its reference weight."""
    task = task or rc.config.base_task
    return {
        name: float(F.cosine_similarity(layer.task_weight(task).flatten().double(),
                                        rc.reference_weights[name].flatten().double(), dim=0))
        for name, layer in rc.recast_layers()
    }


def _layer_containers(rc: RecastModel) -> list[str]:
    """Children ``stack.N`` of every targeted stack; the targeted modules if stacks are virtual."""
    names = []
    for stack in sorted({mp.stack for mp in rc.plan.modules}):
        try:
            module = rc.model.get_submodule(stack) if stack else rc.model
        except AttributeError:
            return [mp.name for mp in rc.plan.modules]
        names += [f"{stack}.{child}" if stack else child for child, _ in module.named_children() if child.isdigit()]
    return names or [mp.name for mp in rc.plan.modules]


@torch.no_grad()
def feature_cosines(reference: nn.Module, candidate: nn.Module, batch: torch.Tensor, layers: list[str]) -> dict[str, float]:
    """Mean per-sample cosine of each listed layer's output between two models (eval, no grad)."""

    def capture(model: nn.Module) -> dict[str, torch.Tensor]:
        outs, hooks = {}, []
        for name in layers:
            mod = model.get_submodule(name)
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o)))
        was_training = model.training
        model.eval()
        try:
            model(batch)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        return outs

    ref, cand = capture(reference), capture(candidate)
    return {
        n: float(F.cosine_similarity(ref[n].flatten(1).double(), cand[n].flatten(1).double(), dim=1).mean())
        for n in layers
    }


def mimic(rc: RecastModel, cfg: MimicryConfig | None = None, batch: torch.Tensor | None = None,
          feature_layers: list[str] | None = None, force: bool = False) -> MimicryReport:
    """Reconstruct the reference weights into ``rc``'s banks and base-task coefficients.

    Args:
        rc: a RecastModel that still holds its reference weights.
        cfg: method and hyperparameters (default: closed form).
        batch: optional input batch for the layer-wise feature cosine.
        feature_layers: modules whose outputs are compared (default: every ``stack.N`` layer).
        force: run even though tasks other than the base task exist (their outputs change).

    Raises:
        RuntimeError: the reference weights were dropped, or other tasks exist and not ``force``.
    """
    cfg = cfg or MimicryConfig()
    if not rc.reference_weights:
        raise RuntimeError("reference weights were dropped: mimicry needs them")
    others = [t for t in rc.tasks if t != rc.config.base_task]
    if others and not force:
        raise RuntimeError(
            f"tasks {others} exist: mimicry rewrites the shared banks they were tuned against, so their "
            "outputs would change; run mimicry before add_task, or pass force=True")
    start = time.perf_counter()
    loss, steps, history = 0.0, 0, []
    if cfg.method in ("closed_form", "refine"):
        closed_form(rc, seed=cfg.seed)
    elif cfg.method == "vae":
        loss, steps = vae(rc, cfg)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():  # the paper's init: kaiming templates, unit-vector coefficient sets
            for bank in rc.banks.values():
                bank.reset_parameters(gen)
            for _, layer in rc.recast_layers():
                layer.coefs[rc.config.base_task].copy_(
                    random_unit_coefficients(layer.coef_sets, layer.bank.num_templates, gen))
    if cfg.method in ("gradient", "refine"):
        loss, steps = gradient(rc, cfg, history)
    seconds = time.perf_counter() - start
    report = MimicryReport(cfg.method, seconds, weight_cosines(rc), final_loss=loss, steps=steps, loss_history=history)
    if batch is not None:
        task = rc.active_task
        rc.set_task(rc.config.base_task, freeze=False)
        try:
            report.feature_cosine = feature_cosines(
                rc.reference_model(), rc.model, batch, feature_layers or _layer_containers(rc))
        finally:
            rc.set_task(task, freeze=False)
            rc.train(rc.training)  # feature_cosines restored rc.model's mode, bypassing rc.train
    return report
