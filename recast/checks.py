"""Argument checks shared by the library's configs; each raises ValueError naming the value."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is a number (not a bool) > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
