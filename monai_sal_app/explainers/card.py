"""Explainer checkpoints: a plain ``state_dict`` (``E.pt``) plus its card (``E.json``).

A trained explainer belongs to one classifier: its card records that classifier's weights
fingerprint (``models.checkpoint.weights_fingerprint``), labels and input size, and
:func:`check_explainer_for` refuses to use it with any other. JSON form::

    {"kind": "mask_generator", "spatial_dims": 2, "in_channels": 1, "num_classes": 2,
     "input_size": [64, 64], "settings": {...}, "classifier": {"fingerprint": "9f2c...",
     "file": "chest.pt", "labels": ["normal", "opacity"]}, "data": {...}, "training": {...},
     "metrics": {...}, "history": [...], "created": "...", "monai_sal_version": "0.1.0"}
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.explainers.kinds import EXPLAINER_KINDS, build_explainer
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.checkpoint import CheckpointError, atomic_write, card_path, weights_fingerprint
from monai_sal_app.version import __version__

__all__ = [
    "ExplainerCard",
    "ExplainerMismatch",
    "check_explainer_for",
    "classifier_record",
    "load_explainer",
    "save_explainer",
]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class ExplainerMismatch(ValueError):
    """The explainer was trained for another classifier (or records none)."""


@dataclasses.dataclass(frozen=True)
class ExplainerCard:
    """What a trained explainer is and which classifier it explains.

    ``kind``: one of :data:`EXPLAINER_KINDS`; ``settings``: its network and loss settings (enough to
    rebuild it); ``spatial_dims``, ``in_channels``, ``num_classes``, ``input_size``: those of the
    classifier; ``classifier``: ``{"fingerprint", "file", "labels"}``; ``data``, ``training``,
    ``metrics``, ``history``: how it was trained and how well it did.
    """

    kind: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    input_size: tuple[int, ...]
    classifier: dict
    settings: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    training: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)
    history: tuple[dict, ...] = ()
    created: str = dataclasses.field(default_factory=_now)
    monai_sal_version: str = __version__

    def __post_init__(self) -> None:
        def refuse(field: str, message: str):
            raise ValueError(f"explainer card field {field!r}: {message}")

        if self.kind not in EXPLAINER_KINDS:
            refuse("kind", f"unknown {self.kind!r}; one of {', '.join(EXPLAINER_KINDS)}")
        if self.spatial_dims not in (2, 3):
            refuse("spatial_dims", f"must be 2 or 3, got {self.spatial_dims!r}")
        for name in ("in_channels", "num_classes"):
            try:
                check_integer(getattr(self, name), name)
            except ValueError:
                refuse(name, f"must be an integer >= 1, got {getattr(self, name)!r}")
        size = self.input_size
        if (
            not isinstance(size, (list, tuple))
            or len(size) != self.spatial_dims
            or not all(isinstance(side, int) and side > 0 for side in size)
        ):
            refuse("input_size", f"must list {self.spatial_dims} positive sides, got {size!r}")
        object.__setattr__(self, "input_size", tuple(size))
        record = self.classifier
        if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
            refuse("classifier", "must record the classifier's weights fingerprint")
        for name in ("settings", "data", "training", "metrics"):
            if not isinstance(getattr(self, name), dict):
                refuse(name, "must be a JSON object")
        object.__setattr__(self, "history", tuple(dict(h) for h in self.history))

    @classmethod
    def from_dict(cls, data: Any) -> ExplainerCard:
        if not isinstance(data, dict):
            raise ValueError(f"an explainer card must be a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"explainer card field {unknown[0]!r}: unknown (known: {', '.join(sorted(fields))})")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"explainer card: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        data["history"] = list(self.history)
        return data

    def replace(self, **changes: Any) -> ExplainerCard:
        return dataclasses.replace(self, **changes)


def classifier_record(classifier: nn.Module, card: ModelCard, file: str | os.PathLike | None = None) -> dict:
    """The ``classifier`` entry of an explainer card: fingerprint, checkpoint file name, labels."""
    return {
        "fingerprint": weights_fingerprint(classifier),
        "file": Path(file).name if file else "",
        "labels": list(card.labels),
    }


def check_explainer_for(explainer_card: ExplainerCard, fingerprint: str) -> None:
    """:class:`ExplainerMismatch` unless ``explainer_card`` was trained for the classifier whose
    weights fingerprint (``models.checkpoint.weights_fingerprint``) is ``fingerprint``."""
    if explainer_card.classifier.get("fingerprint") != fingerprint:
        trained_for = explainer_card.classifier.get("file") or "another classifier"
        raise ExplainerMismatch(
            f"this {explainer_card.kind} was trained for {trained_for} (weights fingerprint "
            f"{explainer_card.classifier['fingerprint'][:12]}), not for this classifier's weights"
        )


def save_explainer(explainer: nn.Module, path: str | os.PathLike, card: ExplainerCard) -> Path:
    """``explainer``'s state_dict at ``path`` and ``card`` beside it (``.json``), each written atomically."""
    path = Path(path)
    text = json.dumps(card.to_dict(), indent=2)
    state = {name: tensor.detach().cpu() for name, tensor in explainer.state_dict().items()}
    expected = {name: tuple(t.shape) for name, t in build_explainer(card).state_dict().items()}
    if expected != {name: tuple(t.shape) for name, t in state.items()}:
        raise ValueError(f"the explainer card ({card.kind}, {card.settings}) does not describe this explainer")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(card_path(path), lambda f: f.write(text.encode("utf-8")))
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_explainer(
    path: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[nn.Module, ExplainerCard]:
    """(explainer in eval mode, its card) from ``path``; FileNotFoundError or CheckpointError naming the problem.

    The returned module carries its card as ``explainer.card`` (``explain`` checks it against the
    classifier it is asked to explain)."""
    path = Path(path)
    json_path = card_path(path)
    for needed in (path, json_path):
        if not needed.is_file():
            raise FileNotFoundError(f"explainer checkpoint not found: {needed}")
    try:
        card = ExplainerCard.from_dict(json.loads(json_path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(f"{json_path}: {error}") from error
    explainer = build_explainer(card)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        explainer.load_state_dict(state, strict=True)
    except Exception as error:  # torch.load and load_state_dict raise many types for foreign files
        raise CheckpointError(f"{path}: weights do not match the {card.kind} card ({type(error).__name__})") from error
    explainer.card = card
    return explainer.to(device or "cpu").eval(), card
