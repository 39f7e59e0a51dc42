"""Checks of argument values that every layer shares, so that each says the same thing in the same
words: :func:`check_integer` for counts, sizes and steps; and :func:`keyword_defaults`, through which
a registry or the CLI states a function's defaults as the function itself has them."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

__all__ = ["check_integer", "keyword_defaults"]


def check_integer(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, or ValueError ``"<name> must be an integer >= <minimum>, got <value>"``
    unless it is a whole number (an int, a numpy integer or an integral float; never a bool) of at
    least ``minimum``."""
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def keyword_defaults(fn: Callable) -> dict[str, Any]:
    """Parameter name -> default value, for every parameter of ``fn`` that has a default."""
    parameters = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
