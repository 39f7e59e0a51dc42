"""Classifier checkpoints: a plain ``state_dict`` (``model.pt``) plus a model card (``model.json``).

The card says how to rebuild the network and what it was trained on::

    {"architecture", "spatial_dims", "in_channels", "num_classes", "labels": [names],
     "input_size": [..], "loss", "augmentations", "data": {...}, "metrics": {...},
     "arch_kwargs": {...}, "created": ISO time, "monai_sal_version"}

The weights are loaded with ``torch.load(weights_only=True)`` (no pickled code) and
``load_state_dict(strict=True)``: a checkpoint that does not match its card is an error, so a
model with random weights is never returned.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from monai_sal_app import __version__
from monai_sal_app.models.device import default_device
from monai_sal_app.models.factory import build_classifier

REQUIRED_CARD_KEYS = ("architecture", "spatial_dims", "in_channels", "num_classes")


class CheckpointError(ValueError):
    """A checkpoint or its model card is unreadable or does not describe the same network."""


def card_path(weights_path: str | os.PathLike) -> Path:
    """The model card next to ``weights_path``: ``model.pt`` -> ``model.json``."""
    weights_path = Path(weights_path)
    card = weights_path.with_suffix(".json")
    if card == weights_path:
        raise ValueError(f"the weights file must not end in .json: {weights_path}")
    return card


def _build_from_card(card: dict) -> nn.Module:
    return build_classifier(
        card["architecture"],
        int(card["spatial_dims"]),
        int(card["in_channels"]),
        int(card["num_classes"]),
        **card.get("arch_kwargs", {}),
    )


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s directory, then rename it to ``path``."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)  # noqa: SIM115 (closed by `with handle` below)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def save_classifier(model: nn.Module, path: str | os.PathLike, card: dict) -> Path:
    """Write ``model``'s state_dict to ``path`` and the completed card next to it; returns ``path``.

    ``card`` needs ``architecture``, ``spatial_dims``, ``in_channels``, ``num_classes`` (and
    ``arch_kwargs`` if the network was built with any); it must describe ``model`` exactly
    (checked by rebuilding it) and be JSON-serialisable. ``created``, ``monai_sal_version`` and
    empty ``arch_kwargs``/``augmentations``/``data``/``metrics`` are filled in when absent;
    ``labels`` defaults to the class indices as strings. Each file is written to a temporary file
    and renamed, so neither is ever half-written under its final name (the card is renamed first).
    """
    path = Path(path)
    json_path = card_path(path)
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}")
    full_card = {
        "labels": [str(i) for i in range(int(card["num_classes"]))],
        "input_size": None,
        "loss": None,
        "augmentations": [],
        "data": {},
        "metrics": {},
        "arch_kwargs": {},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "monai_sal_version": __version__,
        **card,
    }
    if len(full_card["labels"]) != int(full_card["num_classes"]):
        raise ValueError(f"card has {len(full_card['labels'])} labels for num_classes={full_card['num_classes']}")
    card_text = json.dumps(full_card, indent=2)  # fails before anything is written if not serialisable

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    expected = {name: tuple(t.shape) for name, t in _build_from_card(full_card).state_dict().items()}
    actual = {name: tuple(t.shape) for name, t in state.items()}
    if expected != actual:
        raise ValueError(
            f"the model card ({full_card['architecture']}, {full_card['arch_kwargs']}) does not describe this model's state_dict"
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(json_path, lambda f: f.write(card_text.encode("utf-8")))
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def read_card(path: str | os.PathLike) -> dict:
    """The model card of the checkpoint ``path`` (``.pt`` or ``.json``)."""
    json_path = card_path(path) if Path(path).suffix != ".json" else Path(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"model card not found: {json_path}")
    try:
        card = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{json_path}: corrupt model card ({error})") from error
    if not isinstance(card, dict):
        raise CheckpointError(f"{json_path}: model card is not a JSON object")
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise CheckpointError(f"{json_path}: model card lacks {missing}")
    return card


def load_classifier(path: str | os.PathLike, device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the classifier saved at ``path`` and load its weights; returns (model in eval mode on ``device``, card).

    Raises FileNotFoundError if the ``.pt`` or ``.json`` is missing, CheckpointError if either is
    corrupt or the weights do not match the network the card describes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    card = read_card(path)
    device = torch.device(device) if device is not None else default_device()
    try:
        model = _build_from_card(card)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{card_path(path)}: model card does not describe a buildable network ({error})"
        ) from error
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch.load raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable weights ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not match the card's {card['architecture']} ({error})") from error
    return model.to(device).eval(), card
