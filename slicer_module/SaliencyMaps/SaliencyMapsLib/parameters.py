"""A method's parameters as a form: the fields to show (from the defaults and bounds ``/info``
lists, and the values saved with the scene) and the parameters to send (those that differ from
the defaults)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "chosen_parameters", "form_fields"]

LARGEST = 10**9  # the largest number a field takes when the method gives no bound


@dataclass(frozen=True)
class Field:
    """One row of the form. ``kind``: "bool", "int", "float", "text" (a string parameter) or
    "json" (a parameter whose default is None, i.e. automatic, or a list); ``value``: what the
    field shows (a bool, a number, or text); ``maximum``: its bound (an int for an "int" field, as
    QSpinBox takes it)."""

    name: str
    kind: str
    value: Any
    maximum: float
    tooltip: str


def _kind(default) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    return "text" if isinstance(default, str) else "json"


def form_fields(spec: dict, saved: dict | None = None) -> list[Field]:
    """The fields of a method's ``/info`` entry (``defaults``, ``bounds``), showing the ``saved``
    values where there are some, else the defaults."""
    bounds = spec.get("bounds", {})
    fields = []
    for name, default in spec["defaults"].items():
        kind, value = _kind(default), (saved or {}).get(name, default)
        if kind == "json":
            value = json.dumps(value)
        maximum = int(bounds.get(name, LARGEST)) if kind == "int" else float(bounds.get(name, LARGEST))
        tooltip = f"default {default!r}" + (f", at most {bounds[name]}" if name in bounds else "")
        fields.append(Field(name, kind, value, maximum, tooltip))
    return fields


def chosen_parameters(defaults: dict, shown: dict[str, Any]) -> dict:
    """The parameters whose value in the form (``shown``: name -> the field's bool, number or
    text) differs from the default. ValueError naming the parameter for text that is not JSON
    where JSON is expected."""
    chosen = {}
    for name, default in defaults.items():
        value = shown[name]
        if _kind(default) == "json":
            try:
                value = json.loads(value) if value.strip() else None
            except ValueError:
                raise ValueError(f"parameter {name}: {value!r} is not JSON (e.g. null or [1, 2])") from None
        if value != default:
            chosen[name] = value
    return chosen
