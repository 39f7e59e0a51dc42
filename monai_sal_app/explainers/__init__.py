"""Trainable explainers for a frozen classifier: the real-time mask generator and the
similarity-adversarial generator, their checkpoints (a state_dict plus a card naming the classifier
they explain) and their training (``explainers.train``).

``explain(model, images, method="mask_generator", explainer=E)`` uses one (``E``: the module or its
checkpoint path); ``monai-sal train-explainer`` trains one.
"""

from __future__ import annotations

from torch import nn

from monai_sal_app.explainers.card import (
    EXPLAINER_KINDS,
    ExplainerCard,
    ExplainerMismatch,
    check_explainer_for,
    load_explainer,
    save_explainer,
)

__all__ = [
    "EXPLAINER_KINDS",
    "ExplainerCard",
    "ExplainerMismatch",
    "build_explainer",
    "check_explainer_for",
    "explainer_settings",
    "load_explainer",
    "save_explainer",
]


def explainer_settings(kind: str, settings: dict | None = None) -> dict:
    """``kind``'s settings with its defaults filled in; ValueError for an unknown kind or setting."""
    defaults = _defaults(kind)
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} setting(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **settings}


def _defaults(kind: str) -> dict:
    if kind == "mask_generator":
        from monai_sal_app.explainers.mask_generator import MASK_GENERATOR_DEFAULTS

        return dict(MASK_GENERATOR_DEFAULTS)
    if kind == "similarity_adversarial":
        from monai_sal_app.explainers.similarity_adversarial import SIMILARITY_ADVERSARIAL_DEFAULTS

        return dict(SIMILARITY_ADVERSARIAL_DEFAULTS)
    raise ValueError(f"unknown explainer {kind!r}; one of {', '.join(EXPLAINER_KINDS)}")


def build_explainer(card: ExplainerCard) -> nn.Module:
    """The untrained explainer network ``card`` describes."""
    settings = explainer_settings(card.kind, card.settings)
    if card.kind == "mask_generator":
        from monai_sal_app.explainers.mask_generator import MaskGenerator

        return MaskGenerator(card.spatial_dims, card.num_classes, card.in_channels, settings["channels"])
    if card.kind == "similarity_adversarial":
        from monai_sal_app.explainers.similarity_adversarial import SimilarityAdversarialGenerator

        return SimilarityAdversarialGenerator(card.spatial_dims, card.in_channels, settings["channels"])
    raise ValueError(f"unknown explainer {card.kind!r}")
