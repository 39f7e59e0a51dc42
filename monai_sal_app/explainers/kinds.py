"""The kinds of trained explainer, by name: one registry that says, per kind, what its settings
default to, how its network is built from a card, and what its training minimises.

:data:`KINDS` is to explainers what ``saliency.core``'s registry is to methods: the card, the
checkpoint loader, the training loop and the CLI all look a kind up here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from monai_sal_app.explainers.mask_generator import MASK_GENERATOR_DEFAULTS, MaskGenerator, mask_generator_losses
from monai_sal_app.explainers.similarity_adversarial import (
    SIMILARITY_ADVERSARIAL_DEFAULTS,
    SimilarityAdversarialGenerator,
    similarity_adversarial_losses,
)

__all__ = ["EXPLAINER_KINDS", "KINDS", "ExplainerKind", "build_explainer", "explainer_settings", "get_kind"]


@dataclass(frozen=True)
class ExplainerKind:
    """One kind of explainer. ``defaults``: every setting with its default; ``build(spatial_dims,
    num_classes, in_channels, settings)``: the untrained network; ``losses(explainer, classifier,
    images, target, settings, generator) -> {"total", ...terms}``: what its training minimises."""

    name: str
    defaults: Mapping[str, Any]
    build: Callable[[int, int, int, dict], nn.Module]
    losses: Callable[..., dict]


KINDS: dict[str, ExplainerKind] = {
    "mask_generator": ExplainerKind(
        "mask_generator",
        MASK_GENERATOR_DEFAULTS,
        lambda dims, classes, channels, settings: MaskGenerator(dims, classes, channels, settings["channels"]),
        mask_generator_losses,
    ),
    "similarity_adversarial": ExplainerKind(
        "similarity_adversarial",
        SIMILARITY_ADVERSARIAL_DEFAULTS,
        lambda dims, classes, channels, settings: SimilarityAdversarialGenerator(dims, channels, settings["channels"]),
        similarity_adversarial_losses,
    ),
}
EXPLAINER_KINDS = tuple(KINDS)


def get_kind(kind: str) -> ExplainerKind:
    """The registered ``kind``; ValueError naming the known kinds otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown explainer {kind!r}; one of {', '.join(EXPLAINER_KINDS)}")
    return KINDS[kind]


def explainer_settings(kind: str, settings: dict | None = None) -> dict:
    """``kind``'s settings with its defaults filled in; ValueError for an unknown kind or setting."""
    defaults = dict(get_kind(kind).defaults)
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} setting(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **settings}


def build_explainer(card) -> nn.Module:
    """The untrained explainer network an ``ExplainerCard`` describes (its kind, settings, spatial
    dims, classes and input channels)."""
    settings = explainer_settings(card.kind, card.settings)
    return get_kind(card.kind).build(card.spatial_dims, card.num_classes, card.in_channels, settings)
