"""Classifier checkpoints: a plain ``state_dict`` (``model.pt``) plus its model card (``model.json``).

The card (:class:`~monai_sal_app.models.card.ModelCard`) says how to rebuild the network, how it
sees an image and what it was trained on. Loading validates the card, loads the weights with
``torch.load(weights_only=True)`` (no pickled code) and ``load_state_dict(strict=True)``, and runs
one forward pass on a blank input of the card's ``input_size``: a checkpoint whose card is wrong or
does not match its weights is an error naming the problem, so a model with random weights (or one
that fails on every image) is never returned.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from monai_sal_app.files import atomic_write
from monai_sal_app.models.card import SOURCE_ARCHITECTURES, CardError, ModelCard
from monai_sal_app.models.device import default_device
from monai_sal_app.models.factory import build_classifier


class CheckpointError(ValueError):
    """A checkpoint or its model card is unreadable, invalid, or does not describe the same network."""


def card_path(weights_path: str | os.PathLike) -> Path:
    """The model card next to ``weights_path``: ``model.pt`` -> ``model.json``."""
    weights_path = Path(weights_path)
    card = weights_path.with_suffix(".json")
    if card == weights_path:
        raise ValueError(f"the weights file must not end in .json: {weights_path}")
    return card


def build_network(card: ModelCard) -> nn.Module:
    """The untrained network ``card`` describes (logits (N, num_classes)); ``ValueError`` for a
    network that its source builds (a bundle, TorchScript, a factory: ``models.sources``)."""
    if card.architecture in SOURCE_ARCHITECTURES:
        raise ValueError(f"a {card.architecture} network is built by its source (models.sources), not from a card")
    return build_classifier(
        card.architecture, card.spatial_dims, card.in_channels, card.num_classes, head=card.head, **card.arch_kwargs
    )


def save_classifier(model: nn.Module, path: str | os.PathLike, card: ModelCard) -> Path:
    """Write ``model``'s state_dict to ``path`` and ``card`` next to it (``.json``); returns ``path``.

    ``card`` must describe ``model`` exactly (checked by rebuilding the network and comparing the
    state_dict's names and shapes) and be JSON-serialisable. Each file is written to a temporary
    file and renamed, so neither is ever half-written under its final name (the card goes first).
    """
    if not isinstance(card, ModelCard):
        raise TypeError(f"card must be a ModelCard, got {type(card).__name__}")
    path = Path(path)
    json_path = card_path(path)
    card_text = json.dumps(card.to_dict(), indent=2)  # fails before anything is written if not serialisable

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    expected = {name: tuple(t.shape) for name, t in build_network(card).state_dict().items()}
    actual = {name: tuple(t.shape) for name, t in state.items()}
    if expected != actual:
        raise ValueError(
            f"the model card ({card.architecture}, {card.arch_kwargs}, head {card.head}) does not describe this"
            " model's state_dict"
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(json_path, lambda f: f.write(card_text.encode("utf-8")))
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of ``model``'s state_dict: every entry's name, dtype, shape and values, in name
    order. Two models share it exactly when they hold the same weights and buffers, wherever they
    were loaded from (a trained explainer records its classifier's)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_card(path: str | os.PathLike) -> ModelCard:
    """The validated model card of the checkpoint ``path`` (``.pt`` or ``.json``).

    Raises FileNotFoundError if it is missing, CheckpointError (naming the file and the field)
    if it is not JSON or fails validation.
    """
    json_path = card_path(path) if Path(path).suffix != ".json" else Path(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"model card not found: {json_path}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{json_path}: corrupt model card ({error})") from error
    try:
        return ModelCard.from_dict(data)
    except (CardError, TypeError) as error:
        raise CheckpointError(f"{json_path}: {error}") from error


def load_classifier(path: str | os.PathLike, device: str | torch.device | None = None) -> tuple[nn.Module, ModelCard]:
    """Rebuild the classifier saved at ``path`` and load its weights; returns (model in eval mode on ``device``, card).

    Raises FileNotFoundError if the ``.pt`` or ``.json`` is missing, CheckpointError if either is
    corrupt, the card is invalid, the weights do not match the network the card describes, or
    the network fails on an input of the card's ``input_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    card = read_card(path)
    device = torch.device(device) if device is not None else default_device()
    try:
        model = build_network(card)
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
        raise CheckpointError(f"{path}: weights do not match the card's {card.architecture} ({error})") from error
    model = model.to(device).eval()
    _check_input_size(model, card, card_path(path), device)
    return model, card


def _check_input_size(model: nn.Module, card: ModelCard, json_path: Path, device: torch.device) -> None:
    """One forward pass on zeros (1, in_channels, *input_size): logits (1, num_classes) or CheckpointError."""
    blank = torch.zeros((1, card.in_channels, *card.input_size), device=device)
    try:
        with torch.no_grad():
            logits = model(blank)
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{json_path}: model card field 'input_size': {list(card.input_size)} does not fit the "
            f"{card.architecture} network ({str(error).splitlines()[0]})"
        ) from error
    if tuple(logits.shape) != (1, card.num_classes):
        raise CheckpointError(
            f"{json_path}: the network gives outputs of shape {tuple(logits.shape)}, not (1, {card.num_classes})"
        )
