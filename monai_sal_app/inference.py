"""Explain one image array with a saved classifier: the path shared by the CLI and the server.

``explain_array`` brings the image to the model's input (``models.inputs.preprocess``, the one
definition training uses too, so a model sees at inference exactly what it saw in training), runs
the model and the method, and maps the saliency back to the image's own grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.inputs import preprocess, resize_to
from monai_sal_app.models.train import predict_probabilities
from monai_sal_app.saliency import explain

__all__ = ["Explanation", "explain_array"]


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
    """Classify and explain one image array (*spatial) with a model and its card.

    ``target`` None explains the predicted class (see :meth:`ModelCard.predict`). Errors are ``ValueError`` with a message
    suitable for a user (wrong dimensionality, constant image, unknown method or parameter).
    """
    params = dict(params or {})
    start = time.perf_counter()
    x = preprocess(array, card.input_size)
    probabilities = predict_probabilities(model, x)[0]
    predicted = time.perf_counter()
    prediction = int(card.predict(probabilities))
    explained_target = prediction if target is None else int(target)
    maps = explain(model, x, method, target=explained_target, **params)
    done = time.perf_counter()
    saliency = resize_to(maps.cpu(), np.asarray(array).shape)[0, 0].numpy().astype(np.float32)
    return Explanation(
        probabilities=[float(p) for p in probabilities],
        prediction=prediction,
        target=explained_target,
        method=method,
        params=params,
        saliency=saliency,
        seconds={"predict": predicted - start, "explain": done - predicted, "total": time.perf_counter() - start},
    )
