"""The adapter registry: kind name -> the class that says what the kind wraps and how.

A kind is a subclass of ``AdapterKind`` decorated with ``@register_adapter``; its
``config_class`` (an ``AdapterConfig`` subclass) names the kind through ``config_class.kind``.
``add_adapters`` looks the kind up from the config it is given. The built-in kinds register in
``recast.adapters.kinds``, which ``recast.adapters`` imports. Adding a kind::

    @dataclass(frozen=True)
    class MyConfig(AdapterConfig):
        kind: ClassVar[str] = "mine"
        width: int = 4

    @register_adapter
    class Mine(AdapterKind):
        config_class = MyConfig
        accepts_description = "Linear-like"

        @staticmethod
        def accepts(module): return is_linear_like(module)

        def wrap(self, target, generator): return MyWrapper(target.module, self.cfg.width)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from recast.adapters.config import AdapterConfig, check_fields


@dataclass(frozen=True)
class Target:
    """One matched module and where it sits.

    Attributes:
        name: original name (``blocks.0.attn.qkv``, without the ``.base`` hops of wrappers).
        parent: the module holding it; child: its attribute name in ``parent``.
        module: the module to wrap.
    """

    name: str
    parent: nn.Module
    child: str
    module: nn.Module


class AdapterKind:
    """One adapter kind: which modules it accepts and how it wraps each of them.

    ``add_adapters`` builds one instance per call with the config and every matched target
    (kinds that split a budget over the matches, such as RoSA's ``num_sparse``, see them all),
    then calls ``wrap`` on each target in order and puts the result in its place.

    Attributes:
        config_class: the kind's config dataclass; ``config_class.kind`` is the registry key.
        accepts_description: what ``accepts`` admits, in words (used in error messages).
    """

    config_class: ClassVar[type[AdapterConfig]]
    accepts_description: ClassVar[str]

    def __init__(self, cfg: AdapterConfig, targets: Sequence[Target]) -> None:
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """Whether this kind can wrap ``module``."""
        raise NotImplementedError

    def wrap(self, target: Target, generator: torch.Generator) -> nn.Module:
        """The adapter module that replaces ``target.module`` (it may edit ``target.parent``)."""
        raise NotImplementedError


ADAPTERS: dict[str, type[AdapterKind]] = {}


def register_adapter(cls: type[AdapterKind]) -> type[AdapterKind]:
    """Class decorator: register ``cls`` under ``cls.config_class.kind``.

    Raises:
        ValueError: the kind is already registered to another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, AdapterKind)):
        raise TypeError(f"register_adapter decorates AdapterKind subclasses, got {cls!r}")
    config_class = cls.config_class
    if not (isinstance(config_class, type) and issubclass(config_class, AdapterConfig)
            and isinstance(getattr(config_class, "kind", None), str)):
        raise TypeError(f"{cls.__name__}.config_class must be an AdapterConfig subclass with a 'kind' string")
    kind = config_class.kind
    if kind in ADAPTERS and ADAPTERS[kind] is not cls:
        raise ValueError(f"adapter kind {kind!r} is already registered to {ADAPTERS[kind].__name__}")
    ADAPTERS[kind] = cls
    return cls


def adapter_kind(kind: str | AdapterConfig) -> type[AdapterKind]:
    """The registered class of ``kind`` (a kind name or a config).

    Raises:
        ValueError: unknown kind, or a config class that is not the one registered for its kind
            (the known kinds are listed).
    """
    name = kind if isinstance(kind, str) else getattr(type(kind), "kind", None)
    cls = ADAPTERS.get(name) if isinstance(name, str) else None
    if cls is None:
        shown = repr(kind) if isinstance(kind, str) else f"{type(kind).__name__} (kind {name!r})"
        raise ValueError(f"unknown adapter kind {shown}; known kinds: {sorted(ADAPTERS)}")
    if not isinstance(kind, str) and type(kind) is not cls.config_class:
        raise ValueError(f"adapter kind {name!r} is registered with {cls.config_class.__name__}, "
                         f"got a {type(kind).__name__}; known kinds: {sorted(ADAPTERS)}")
    return cls


def adapter_config(kind: str, **fields: Any) -> AdapterConfig:
    """Build the config of ``kind`` from keyword fields (e.g. ``adapter_config("lora", targets="attn.qkv", rank=8)``).

    Raises:
        ValueError: unknown kind (the known kinds are listed) or a bad field value.
        TypeError: a field that ``kind`` does not have (named, with the kind's fields).
    """
    config_class = adapter_kind(kind).config_class
    check_fields(config_class, fields, f"adapter_config({kind!r})")
    return config_class(**fields)
