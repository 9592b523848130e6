"""Injection (match targets, wrap in place), accounting, state and merging of adapters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from recast.adapters.base import AdapterWrapper
from recast.adapters.config import AdapterConfig
from recast.adapters.lowrank import RoSALinear
from recast.adapters.masks import PiggybackConv2d, PiggybackLinear
from recast.adapters.registry import Target, adapter_kind
from recast.targets import matches_pattern as _matches


def logical_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(original name, real name, module) of every module, adapter wrappers standing for their base.

    The original name drops the ``.base`` hop of each wrapper, so ``blocks.0.attn.qkv`` names a
    LoRA wrapper around a RecastLinear just as it named the plain nn.Linear before; the wrapped
    base itself is not listed.
    """
    bases = {f"{n}.base" if n else "base" for n, m in model.named_modules() if isinstance(m, AdapterWrapper)}
    out = []
    for real, module in model.named_modules():
        if not real or real in bases:
            continue
        parts = real.split(".")
        kept = [p for i, p in enumerate(parts) if ".".join(parts[: i + 1]) not in bases]
        out.append((".".join(kept), real, module))
    return out


def add_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Wrap the modules of ``model`` matched by ``cfg`` in place; returns their original names.

    Works on a plain model and on a RecastModel's ``rc.model`` alike (a RecastLinear is wrapped,
    so the adapter's delta adds to the task's generated weight: paper eq. 6). Freezes nothing.

    The kind is the one registered for ``type(cfg)`` (see ``recast.adapters.registry``).

    Raises:
        ValueError: an unregistered kind (the known kinds are listed), nothing matches (the
            patterns are named), a match this kind cannot wrap (unless ``skip_unsupported``),
            or nested matches.
    """
    kind = adapter_kind(cfg)
    chosen: list[tuple[str, str, nn.Module]] = []
    for logical, real, module in logical_modules(model):
        if not any(_matches(logical, p, cfg.regex) for p in cfg.targets):
            continue
        if any(_matches(logical, p, cfg.regex) for p in cfg.exclude):
            continue
        if not kind.accepts(module):
            if cfg.skip_unsupported:
                continue
            raise ValueError(f"target '{logical}' matched by {list(cfg.targets)} is a {type(module).__name__}; "
                             f"'{cfg.kind}' wraps {kind.accepts_description} modules")
        chosen.append((logical, real, module))
    if not chosen:
        names = [n for n, _, _ in logical_modules(model)]
        raise ValueError(f"no module of {type(model).__name__} matches targets={list(cfg.targets)} "
                         f"(exclude={list(cfg.exclude)}, regex={cfg.regex}, kind={cfg.kind!r}); example names: {names[:8]}")
    reals = [r for _, r, _ in chosen]
    for r in reals:
        inner = [o for o in reals if o.startswith(r + ".")]
        if inner:
            raise ValueError(f"targets {list(cfg.targets)} match both '{r}' and modules inside it {inner[:3]}; narrow them")
    targets = []
    for logical, real, module in chosen:
        parent_name, _, child = real.rpartition(".")
        targets.append(Target(logical, model.get_submodule(parent_name) if parent_name else model, child, module))
    builder = kind(cfg, targets)
    gen = torch.Generator().manual_seed(cfg.seed)
    for target in targets:
        setattr(target.parent, target.child, builder.wrap(target, gen))
    return [t.name for t in targets]


def adapter_modules(model: nn.Module) -> list[tuple[str, AdapterWrapper]]:
    """(real name, wrapper) of every adapter in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterWrapper)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' own parameters (not their bases'), each once."""
    seen: dict[int, nn.Parameter] = {}
    for _, wrapper in adapter_modules(model):
        for _, p in wrapper.own_named_parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def count_adapter_parameters(model: nn.Module) -> int:
    """Trainable adapter scalars per task (a Piggyback mask counts one real per weight)."""
    return sum(p.numel() for p in adapter_parameters(model))


def adapter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable adapter scalars per adapter class (e.g. ``{"LoRALinear": 6144}``)."""
    counts: dict[str, int] = {}
    for _, wrapper in adapter_modules(model):
        own = sum(t.numel() for _, t in wrapper.own_named_parameters())
        counts[type(wrapper).__name__] = counts.get(type(wrapper).__name__, 0) + own
    return counts


def adapter_payload_bytes(model: nn.Module) -> int:
    """Bytes of the per-task adapter payload as stored: every tensor of ``adapter_state`` at its
    dtype's size (Piggyback masks are stored bit-packed: one bit per weight)."""
    return sum(t.numel() * t.element_size() for t in adapter_state(model).values())


def _stored_tensors(wrapper: AdapterWrapper) -> list[tuple[str, torch.Tensor]]:
    """A wrapper's tensors as a task stores them: its own tensors, a Piggyback mask as ``mask_bits``."""
    if isinstance(wrapper, (PiggybackLinear, PiggybackConv2d)):
        return [("mask_bits", wrapper.mask_bits()) if n == "mask" else (n, t) for n, t in wrapper.own_named_tensors()]
    return wrapper.own_named_tensors()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor as stored (parameters and buffers, e.g. RoSA's support; Piggyback's
    bit-packed ``mask_bits``), keyed by real name; a dict for ``safetensors.torch.save_file``."""
    state = {}
    for name, wrapper in adapter_modules(model):
        for n, t in _stored_tensors(wrapper):
            state[f"{name}.{n}" if name else n] = t.detach()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``adapter_state``-style tensors into the adapters of ``model`` (same structure).

    Raises:
        ValueError: keys or shapes differ (missing/unexpected keys are named).
    """
    mine, owners = {}, {}
    for name, wrapper in adapter_modules(model):
        for n, t in _stored_tensors(wrapper):
            key = f"{name}.{n}" if name else n
            mine[key], owners[key] = t, wrapper
    if set(mine) != set(state):
        missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        raise ValueError(f"adapter state does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for key, target in mine.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(f"adapter tensor '{key}' has shape {tuple(state[key].shape)}, model expects {tuple(target.shape)}")
            if isinstance(owners[key], (PiggybackLinear, PiggybackConv2d)) and key.rpartition(".")[2] == "mask_bits":
                owners[key].load_mask_bits(state[key])
            else:
                target.copy_(state[key])


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every mergeable adapter (LoRA, MeLo, DoRA, RoSA, Piggyback) into a plain layer, in
    place, innermost first; AdaptFormer and CLR stay as modules. Returns ``model``.

    Raises:
        ValueError: an adapter wraps a RecastLinear/RecastConv2d (materialize the task first).
    """
    jobs = []
    for name, wrapper in adapter_modules(model):
        if wrapper.mergeable:
            parent_name, _, child = name.rpartition(".")
            jobs.append((model.get_submodule(parent_name) if parent_name else None, child, wrapper))
    if any(parent is None for parent, _, _ in jobs):
        raise ValueError("the model itself is an adapter; merge its parent module instead")
    for parent, child, wrapper in reversed(jobs):  # pre-order reversed: inner wrappers first
        setattr(parent, child, wrapper.merged())
    return model


def select_rosa_support(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> int:
    """Move every RoSA support to the entries of largest |dL/dW| (the RoSA paper's gradient mask).

    Args:
        loss_fn: computes a scalar loss from the model, e.g. on a few training batches.

    Returns:
        The number of RoSA modules updated.
    """
    wrappers = [m for _, m in adapter_modules(model) if isinstance(m, RoSALinear) and m.num_sparse]
    probes = []
    for w in wrappers:
        ref = w.sparse_values
        w._probe = torch.zeros(w.out_features, w.in_features, device=ref.device, dtype=ref.dtype, requires_grad=True)
        probes.append(w._probe)
    try:
        grads = torch.autograd.grad(loss_fn(model), probes, allow_unused=True) if probes else []
    finally:
        for w in wrappers:
            w._probe = None
    for w, g in zip(wrappers, grads):
        if g is not None:
            w.set_support(g)
    return len(wrappers)
