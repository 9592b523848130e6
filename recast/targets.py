"""Target matching (PEFT-style), layer-index parsing and the grouping plan (paper eqs. 1-2)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from recast.config import RecastConfig

LayerKey = tuple[str, int] | tuple[str, int, str]
"""(stack, index[, role]): ``blocks.3.mlp.fc1`` -> ("blocks", 3); ``layer2.1.conv1`` -> ("layer2", 1).
A custom function may add the role explicitly when it cannot be read off the name."""

LayerKeyFn = Callable[[str], "LayerKey | None"]
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


def default_layer_key(name: str) -> LayerKey | None:
    """Parse (stack, layer index) from a module name.

    The index is the last purely numeric path component that is not the final one, so
    ``blocks.3.mlp.fc1`` -> ("blocks", 3), ``layer2.1.conv1`` -> ("layer2", 1),
    ``encoder.layer.5.attention.self.query`` -> ("encoder.layer", 5) and
    ``stages.1.blocks.2.conv_dw`` -> ("stages.1.blocks", 2). Returns None when no such part.
    """
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i]), int(parts[i])
    return None


def role_of(name: str, key: LayerKey | None) -> str:
    """The module's role inside its layer: the name after ``stack.index.`` (``mlp.fc1``)."""
    if key is None:
        return name
    if len(key) == 3:
        return key[2]
    prefix = f"{key[0]}.{key[1]}." if key[0] else f"{key[1]}."
    return name[len(prefix):] if name.startswith(prefix) else name


def matches_pattern(name: str, pattern: str, regex: bool = False) -> bool:
    """PEFT-style match: exact name, ``.suffix`` / trailing path, or ``re.fullmatch`` if ``regex``."""
    if regex:
        return re.fullmatch(pattern, name) is not None
    if pattern.startswith("."):
        return name.endswith(pattern)
    return name == pattern or name.endswith("." + pattern)


def match_modules(
    model: nn.Module,
    targets: Sequence[str],
    exclude: Sequence[str] = (),
    regex: bool = False,
    types: tuple[type, ...] = SUPPORTED_TYPES,
) -> list[str]:
    """Names of the modules of ``model`` matched by ``targets`` and not by ``exclude``.

    Raises:
        ValueError: nothing matches (the patterns are named), or a matched module is not one
            of ``types``.
    """
    names = []
    for name, module in model.named_modules():
        if not name or not any(matches_pattern(name, p, regex) for p in targets):
            continue
        if any(matches_pattern(name, p, regex) for p in exclude):
            continue
        if not isinstance(module, types):
            allowed = ", ".join(t.__name__ for t in types)
            raise ValueError(
                f"target '{name}' matched by {list(targets)} is a {type(module).__name__}; "
                f"only {allowed} can be targeted"
            )
        names.append(name)
    if not names:
        raise ValueError(
            f"no module of {type(model).__name__} matches targets={list(targets)} "
            f"(exclude={list(exclude)}, regex={regex}); example names: "
            f"{[n for n, _ in model.named_modules() if n][:8]}"
        )
    return names


@dataclass(frozen=True)
class ModulePlan:
    """Where one targeted module goes: its bank and its position inside the group."""

    name: str
    stack: str
    layer: int
    role: str
    bank: str
    group: int
    position: int


@dataclass(frozen=True)
class BankPlan:
    """One template bank: n templates of ``shape`` shared by the modules of one group/role."""

    key: str
    stack: str
    role: str
    group: int
    templates: int
    shape: tuple[int, ...]
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """The full grouping plan of a model under a RecastConfig."""

    modules: tuple[ModulePlan, ...]
    banks: tuple[BankPlan, ...]
    coef_sets: int

    @property
    def coefficients_per_task(self) -> int:
        """Stored coefficients per task: sum over modules of K * n."""
        n_of = {b.key: b.templates for b in self.banks}
        return sum(self.coef_sets * n_of[m.bank] for m in self.modules)

    @property
    def effective_coefficients_per_task(self) -> int:
        """Coefficients after averaging the K sets (eq. 2 is linear): sum of n."""
        return self.coefficients_per_task // self.coef_sets


def bank_key(stack: str, role: str, group: int) -> str:
    """ModuleDict-safe bank key (dots replaced)."""
    stack_part = stack.replace(".", "_") or "root"
    return f"{stack_part}__{role.replace('.', '_')}__g{group}"


def build_plan(model: nn.Module, config: RecastConfig, layer_key: LayerKeyFn | None = None,
               check: Callable[[str, nn.Module], None] | None = None) -> Plan:
    """Match targets, parse layer indices and split each stack into G groups.

    Args:
        check: called on each planned module (name, module) before its weight is read; it
            raises to refuse a module (``recast.layers.check_templatable``).

    Raises:
        ValueError: no match, unparseable layer index, G not dividing a stack's depth,
            or modules of different weight shapes in one bank.
    """
    layer_key = layer_key or default_layer_key
    names = match_modules(model, config.targets, config.exclude, config.regex)
    modules = dict(model.named_modules())
    parsed: list[tuple[str, str, int, str]] = []
    for name in names:
        key = layer_key(name)
        if key is None:
            raise ValueError(
                f"cannot parse a layer index from module name '{name}'; pass layer_key=fn "
                "returning (stack, index) or (stack, index, role) for your model"
            )
        if key[1] < config.min_layer:
            continue
        role = key[2] if len(key) == 3 else role_of(name, key)
        parsed.append((name, key[0], key[1], role))
    if not parsed:
        raise ValueError(f"all matches of {list(config.targets)} have layer index < min_layer={config.min_layer}")

    # Depth per (stack, role): the distinct targeted layer indices, renumbered 0..L-1.
    layers: dict[tuple[str, str], list[int]] = {}
    for _, stack, idx, role in parsed:
        layers.setdefault((stack, role), []).append(idx)
    if check is not None:
        for name, *_ in parsed:
            check(name, modules[name])
    module_plans, members = [], {}
    for name, stack, idx, role in parsed:
        ordered = sorted(set(layers[(stack, role)]))
        depth = len(ordered)
        if depth % config.groups != 0:
            raise ValueError(
                f"groups={config.groups} does not divide the targeted depth {depth} of "
                f"'{stack}.*.{role}' (layers {ordered}); choose a divisor of {depth}"
            )
        per_group = depth // config.groups
        pos = ordered.index(idx)
        group, position = pos // per_group, pos % per_group
        key = bank_key(stack, role, group)
        module_plans.append(ModulePlan(name, stack, idx, role, key, group, position))
        members.setdefault(key, []).append(name)

    banks = []
    for key, mods in members.items():
        first = next(m for m in module_plans if m.bank == key)
        shapes = {tuple(modules[m].weight.shape) for m in mods}
        if len(shapes) != 1:
            raise ValueError(f"bank '{key}' would share templates between weights of shapes {sorted(shapes)}: {mods}")
        n = len(mods) if config.templates == "group_size" else config.templates
        banks.append(BankPlan(key, first.stack, first.role, first.group, n, shapes.pop(), tuple(mods)))
    return Plan(tuple(module_plans), tuple(banks), config.coef_sets)


def template_fan_mode(config: RecastConfig, role: str) -> Literal["fan_in", "fan_out"]:
    """Kaiming fan of a bank's templates: ``fan_out`` for roles in ``config.fan_out_roles``
    (exact or suffix match, as in ``matches_pattern``), ``fan_in`` otherwise."""
    return "fan_out" if any(matches_pattern(role, r) for r in config.fan_out_roles) else "fan_in"
