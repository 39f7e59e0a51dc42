"""Trainable explainers for a frozen classifier: the real-time mask generator and the
similarity-adversarial generator, their checkpoints (a state_dict plus a card naming the classifier
they explain) and their training (``explainers.train``).

``explain(model, images, method="mask_generator", explainer=E)`` uses one (``E``: the module or its
checkpoint path); ``monai-sal train-explainer`` trains one.
"""

from __future__ import annotations

from monai_sal_app.explainers.card import (
    ExplainerCard,
    ExplainerMismatch,
    check_explainer_for,
    load_explainer,
    save_explainer,
)
from monai_sal_app.explainers.kinds import EXPLAINER_KINDS, build_explainer, explainer_settings

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
