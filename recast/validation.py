"""Validation of the library's config dataclasses by pydantic: each field is checked against its
annotation (``Annotated`` constraints included) in strict mode, so an ill-typed or out-of-range
value is a ValueError naming the field, the rule and the value.

The configs stay frozen stdlib dataclasses (``dataclasses.replace``/``fields``/``asdict``,
equality, hashing and subclassing with ``@dataclass`` work as before); pydantic only checks.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt  # pydantic's own constraint types
from pydantic import AllowInfNan, ConfigDict, TypeAdapter, ValidationError


class FiniteNumber(AllowInfNan):
    """Constraint: no NaN or infinity (pydantic's ``AllowInfNan(False)``)."""

    def __init__(self) -> None:
        super().__init__(False)

__all__ = ["AtLeast0", "AtLeast1", "AtLeastOne", "Finite", "Fraction", "NonNegative", "OpenFraction", "Positive",
           "UnitInterval", "validate_fields"]

AtLeast0 = Annotated[int, Ge(0)]  # an int (not a bool) >= 0
AtLeast1 = Annotated[int, Ge(1)]  # an int (not a bool) >= 1
NonNegative = Annotated[float, Ge(0)]  # a number (not a bool) >= 0
Positive = Annotated[float, Gt(0)]  # a number (not a bool) > 0
Fraction = Annotated[float, Ge(0), Le(1)]  # a number in [0, 1]
UnitInterval = Annotated[float, Ge(0), Lt(1)]  # a number in [0, 1)
OpenFraction = Annotated[float, Gt(0), Le(1)]  # a number in (0, 1]
AtLeastOne = Annotated[float, Ge(1)]  # a number (not a bool) >= 1
Finite = Annotated[float, FiniteNumber()]  # a number, not NaN or infinite

_STRICT = ConfigDict(strict=True, allow_inf_nan=True)


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint, config=_STRICT)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def describe(hint: Any) -> str:
    """What a value of ``hint`` must be, in words: ``an integer >= 1``, ``one of ('a', 'b')``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *meta = args
        low = next((m.ge for m in meta if isinstance(m, Ge)), None)
        high = next((m.le for m in meta if isinstance(m, Le)), None)
        above = next((m.gt for m in meta if isinstance(m, Gt)), None)
        below = next((m.lt for m in meta if isinstance(m, Lt)), None)
        words = "a finite number" if any(isinstance(m, FiniteNumber) for m in meta) else describe(base)
        if low is not None and high is not None:
            return f"{words} in [{low}, {high}]"
        if low is not None and below is not None:
            return f"{words} in [{low}, {below})"
        if above is not None and high is not None:
            return f"{words} in ({above}, {high}]"
        return words + (f" >= {low}" if low is not None else "") + (f" > {above}" if above is not None else "")
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else f"one of {args}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None)) + (
            " or None" if type(None) in args else "")
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint is bool:
        return "True or False"
    return f"a {getattr(hint, '__name__', hint)}"


def validate_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of the dataclass ``obj`` against its annotation (pydantic, strict).

    Raises:
        ValueError: ``<prefix><field> must be <rule>, got <value>`` for the first invalid field.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            _adapter(hints[f.name]).validate_python(value)
        except ValidationError:
            raise ValueError(f"{prefix}{f.name} must be {describe(hints[f.name])}, got {value!r}") from None
