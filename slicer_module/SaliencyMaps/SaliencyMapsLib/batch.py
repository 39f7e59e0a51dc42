"""What a batch explains: one method on every volume, or every method on one volume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchItem", "items_for_methods", "items_for_volumes"]


@dataclass(frozen=True)
class BatchItem:
    """One explanation: a volume node, a model and a method with its parameters."""

    volume: Any
    model: str
    method: str
    params: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.volume.GetName()} / {self.model} / {self.method}"


def items_for_volumes(volumes: Sequence, model: str, method: str, params: dict | None = None) -> list[BatchItem]:
    """One method on every volume."""
    return [BatchItem(volume, model, method, dict(params or {})) for volume in volumes]


def items_for_methods(volume, model: str, methods: Sequence[str], params: dict | None = None) -> list[BatchItem]:
    """Every method on one volume (``params``: method -> its parameters)."""
    return [BatchItem(volume, model, method, dict((params or {}).get(method, {}))) for method in methods]
