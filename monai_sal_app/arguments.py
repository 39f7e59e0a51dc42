"""Checks of argument values that every layer shares, so that each says the same thing in the same
words: :func:`check_integer` for counts, sizes and steps."""

from __future__ import annotations

import numbers

__all__ = ["check_integer"]


def check_integer(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, or ValueError ``"<name> must be an integer >= <minimum>, got <value>"``
    unless it is a whole number (an int, a numpy integer or an integral float; never a bool) of at
    least ``minimum``."""
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
