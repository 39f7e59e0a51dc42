"""Explain one image array with a saved classifier: the path shared by the CLI and the server.

``explain_array`` brings the image to the model's input (``models.inputs.preprocess``, the one
definition training uses too, so a model sees at inference exactly what it saw in training), runs
the model and the method, and maps the saliency back to the image's own grid.
``explain_prepared`` does the same for an image that a model source prepared
(``models.sources.LoadedModel.prepare``: a bundle's own preprocessing, inverted for the map).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.sources import PreparedImage, array_input
from monai_sal_app.models.train import predict_probabilities
from monai_sal_app.saliency import explain

__all__ = ["Explanation", "explain_array", "explain_prepared"]


@dataclass
class Explanation:
    """The result of explaining one image.

    ``prediction`` is the predicted class (the card's decision rule, ``ModelCard.predict``) and
    ``target`` the class explained. ``saliency`` is the raw map on the image's own grid (same shape
    as the input array), float32. ``seconds`` has "predict", "explain" and "total" wall times.
    """

    probabilities: list[float]
    prediction: int
    target: int
    method: str
    params: dict[str, Any]
    saliency: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)


def explain_array(
    model: nn.Module,
    card: ModelCard,
    array: np.ndarray,
    method: str = "gradcam",
    target: int | None = None,
    params: dict[str, Any] | None = None,
) -> Explanation:
    """Classify and explain one image array (*spatial) with a model and its card (min-max and
    resize to its input, ``models.sources.array_input``).

    ``target`` None explains the predicted class (see :meth:`ModelCard.predict`). Errors are ``ValueError`` with a message
    suitable for a user (wrong dimensionality, constant image, unknown method or parameter).
    """
    start = time.perf_counter()
    return explain_prepared(model, card, array_input(card, array), method, target, params, start)


def explain_prepared(
    model: nn.Module,
    card: ModelCard,
    prepared: PreparedImage,
    method: str = "gradcam",
    target: int | None = None,
    params: dict[str, Any] | None = None,
    start: float | None = None,
) -> Explanation:
    """Classify and explain one image as its model's source prepared it (``LoadedModel.prepare``);
    the map returns to the image's grid through ``prepared.restore``. ``start``: when the work on
    this image began (``perf_counter``), for the "total" time."""
    params = dict(params or {})
    start = time.perf_counter() if start is None else start
    x = prepared.input
    probabilities = predict_probabilities(model, x)[0]
    predicted = time.perf_counter()
    prediction = int(card.predict(probabilities))
    explained_target = prediction if target is None else int(target)
    maps = explain(model, x, method, target=explained_target, **params)
    done = time.perf_counter()
    saliency = np.asarray(prepared.restore(maps.cpu()), dtype=np.float32)
    return Explanation(
        probabilities=[float(p) for p in probabilities],
        prediction=prediction,
        target=explained_target,
        method=method,
        params=params,
        saliency=saliency,
        seconds={"predict": predicted - start, "explain": done - predicted, "total": time.perf_counter() - start},
    )
