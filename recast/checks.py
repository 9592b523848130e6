"""Argument checks shared by the library's configs; each raises ValueError naming the value."""

from __future__ import annotations

import math
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


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN or infinite loss; the job stops and nothing of it is kept.

    Built from one message, so it survives pickling (a Ray task's error reaches the driver)."""


def check_finite_loss(loss: float, where: str, epoch: int, step: int) -> None:
    """Raise NonFiniteLossError unless the loss value is finite."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"{where}: the training loss is {loss} at epoch {epoch}, step {step}; "
                                 "nothing is kept. Lower the learning rate or check the inputs")
