"""The model card: what a checkpoint's network is, how it sees an image and how it decides.

Every classifier checkpoint is a plain ``state_dict`` (``model.pt``) plus this card (``model.json``).
One :class:`ModelCard` is written by training, read by ``load_classifier``, and used by the CLI and
the server; it is validated whenever it is made or read, so a card with a missing or wrong field
(say an ``input_size`` of the wrong length) is refused with an error that names the field, instead
of failing later on every request.

JSON form (``ModelCard.to_dict``)::

    {"architecture": "conv5fc3", "spatial_dims": 2, "in_channels": 1, "num_classes": 2,
     "labels": ["normal", "opacity"], "input_size": [128, 128], "arch_kwargs": {}, "head": null,
     "decision_threshold": 0.42, "preprocessing": "...", "loss": "ce", "augmentations": ["noise"],
     "data": {...}, "training": {...}, "metrics": {...}, "history": [...], "description": "",
     "created": "2026-11-30T09:00:00+00:00", "monai_sal_version": "0.1.0"}
"""

from __future__ import annotations

import dataclasses
import datetime
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from monai_sal_app.arguments import check_integer
from monai_sal_app.models.factory import ARCHITECTURES, head_options
from monai_sal_app.version import __version__

__all__ = ["PREPROCESSING", "SOURCE_ARCHITECTURES", "CardError", "ModelCard", "predict_classes"]

PREPROCESSING = "per-image min-max to [0, 1], bi/trilinear resize to input_size"
# The "architecture" of a network that its source builds, not models.factory (models.sources).
SOURCE_ARCHITECTURES = ("bundle", "torchscript", "factory")


class CardError(ValueError):
    """A model card field is missing or invalid; ``field`` names it (None for the card as a whole)."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        super().__init__(f"model card field {field!r}: {message}" if field else f"model card: {message}")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(field: str, value: Any) -> int:
    try:
        return check_integer(value, field)
    except ValueError:
        raise CardError(field, f"must be an integer >= 1, got {value!r}") from None


def _strings(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CardError(field, f"must be a list of strings, got {value!r}")
    return tuple(value)


def _mapping(field: str, value: Any) -> dict:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise CardError(field, f"must be a JSON object with string keys, got {type(value).__name__}")
    return dict(value)


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """A classifier checkpoint's description (see the module docstring for the JSON form).

    - ``architecture``: a name of ``models.factory.ARCHITECTURES``, or of
      :data:`SOURCE_ARCHITECTURES` for a network its source builds (``models.sources``: a MONAI
      bundle, a TorchScript file, a factory function); ``arch_kwargs``: the keyword
      arguments it was built with; ``spatial_dims``: 2 or 3; ``in_channels``: image channels.
    - ``head``: None for the network's own classifier, or a WILDCAT head on its last feature block,
      ``{"name": "wildcat", "kmax", "kmin", "alpha", "maps"}`` (see ``models.wildcat``).
    - ``labels``: one name per class (``num_classes`` of them, at least 2, distinct).
    - ``input_size``: the network's input grid, one side in pixels/voxels per spatial axis;
      images are min-max normalised and resized to it (``preprocessing``).
    - ``decision_threshold``: two-class models only: class 1 is predicted when its softmax
      probability is at least this value (chosen on validation data); None predicts the argmax.
    - ``loss``, ``augmentations``, ``data``, ``training``, ``metrics``, ``history``, ``description``:
      how it was trained and how well it did (free-form JSON, shown in the server's ``/info``).
    """

    architecture: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    labels: tuple[str, ...]
    input_size: tuple[int, ...]
    arch_kwargs: dict = dataclasses.field(default_factory=dict)
    head: dict | None = None
    decision_threshold: float | None = None
    preprocessing: str = PREPROCESSING
    loss: str | None = None
    augmentations: tuple[str, ...] = ()
    data: dict = dataclasses.field(default_factory=dict)
    training: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)
    history: tuple[dict, ...] = ()
    description: str = ""
    created: str = dataclasses.field(default_factory=_now)
    monai_sal_version: str = __version__

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.architecture not in (*ARCHITECTURES, *SOURCE_ARCHITECTURES):
            raise CardError("architecture", f"unknown {self.architecture!r}; one of {', '.join(ARCHITECTURES)}")
        if self.spatial_dims not in (2, 3) or not _is_int(self.spatial_dims):
            raise CardError("spatial_dims", f"must be 2 or 3, got {self.spatial_dims!r}")
        put("spatial_dims", int(self.spatial_dims))
        put("in_channels", _positive_int("in_channels", self.in_channels))
        put("num_classes", _positive_int("num_classes", self.num_classes))
        if self.num_classes < 2:
            raise CardError("num_classes", f"a classifier needs at least 2 classes, got {self.num_classes}")
        labels = _strings("labels", self.labels)
        if len(labels) != self.num_classes:
            raise CardError("labels", f"{len(labels)} names for num_classes={self.num_classes}")
        if len(set(labels)) != len(labels) or not all(label.strip() for label in labels):
            raise CardError("labels", f"must be distinct, non-empty names, got {list(labels)}")
        put("labels", labels)
        size = self.input_size
        if isinstance(size, str) or not isinstance(size, (list, tuple)) or len(size) != self.spatial_dims:
            raise CardError("input_size", f"must list {self.spatial_dims} sides (one per spatial axis), got {size!r}")
        put("input_size", tuple(_positive_int("input_size", side) for side in size))
        put("arch_kwargs", _mapping("arch_kwargs", self.arch_kwargs))
        if self.head is not None:
            head = _mapping("head", self.head)
            try:
                put("head", head_options(head))
            except ValueError as error:
                raise CardError("head", str(error)) from None
        threshold = self.decision_threshold
        if threshold is not None:
            if self.num_classes != 2:
                raise CardError("decision_threshold", f"only two-class models have one (this has {self.num_classes})")
            if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not 0 < threshold < 1:
                raise CardError("decision_threshold", f"must be a probability in (0, 1), got {threshold!r}")
            put("decision_threshold", float(threshold))
        for name in ("preprocessing", "description", "created", "monai_sal_version"):
            if not isinstance(getattr(self, name), str):
                raise CardError(name, f"must be a string, got {getattr(self, name)!r}")
        if self.loss is not None and not isinstance(self.loss, str):
            raise CardError("loss", f"must be a loss name or null, got {self.loss!r}")
        put("augmentations", _strings("augmentations", self.augmentations))
        for name in ("data", "training", "metrics"):
            put(name, _mapping(name, getattr(self, name)))
        history = self.history
        if not isinstance(history, (list, tuple)) or not all(isinstance(h, Mapping) for h in history):
            raise CardError("history", "must be a list of JSON objects (one per epoch)")
        put("history", tuple(dict(h) for h in history))

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Validate a card read from JSON; :class:`CardError` names the first bad, missing or unknown field."""
        if not isinstance(data, Mapping):
            raise CardError(None, f"must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise CardError(unknown[0], f"unknown field (known: {', '.join(fields)})")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        for name in required:
            if name not in data:
                raise CardError(name, "missing")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data (tuples become lists)."""
        data = dataclasses.asdict(self)
        for name in ("labels", "input_size", "augmentations", "history"):
            data[name] = list(data[name])
        return data

    def replace(self, **changes: Any) -> ModelCard:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def predict(self, probabilities: np.ndarray) -> np.ndarray:
        """Predicted class indices for softmax probabilities (N, K) (or (K,) for one image -> a 0-d array)."""
        return predict_classes(probabilities, self.decision_threshold)


def predict_classes(probabilities: Any, decision_threshold: float | None = None) -> np.ndarray:
    """Class indices from softmax probabilities (..., K): the argmax, or for K = 2 with a threshold
    t, class 1 where P(class 1) >= t. Returns int64 of shape (...)."""
    p = np.asarray(probabilities.detach().cpu() if hasattr(probabilities, "detach") else probabilities, dtype=float)
    if p.ndim == 0 or p.shape[-1] < 2:
        raise ValueError(f"probabilities must have a class axis of at least 2, got shape {p.shape}")
    if decision_threshold is None:
        return p.argmax(axis=-1)
    if p.shape[-1] != 2:
        raise ValueError(f"a decision threshold needs two classes, got {p.shape[-1]}")
    return (p[..., 1] >= decision_threshold).astype(np.int64)
