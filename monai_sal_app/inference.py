"""Explain one image array with a saved classifier: the path shared by the CLI and the server.

``preprocess`` is the single definition of how an image becomes the model's input (per-image
min-max to [0, 1], then a bi/trilinear resize to the model card's ``input_size``); training uses
it too, so a model sees at inference exactly what it saw in training. ``explain_array`` runs the
model and the method and maps the saliency back to the image's own grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.train import predict_probabilities
from monai_sal_app.saliency import explain

__all__ = ["Explanation", "explain_array", "preprocess", "resize_to"]


def resize_to(tensor: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Bi/trilinear resize of (N, C, *s) to ``spatial`` (no-op when already there)."""
    spatial = tuple(int(s) for s in spatial)
    if tuple(tensor.shape[2:]) == spatial:
        return tensor
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(tensor, size=spatial, mode=mode, align_corners=False)


def preprocess(array: np.ndarray, input_size: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Image (*spatial) -> model input (1, 1, *input_size), float32 in [0, 1].

    Raises ``ValueError`` when the image's dimensionality differs from the model's, or when it
    is constant or not finite (nothing to explain).
    """
    input_size = tuple(int(s) for s in input_size)
    array = np.asarray(array)
    if array.ndim != len(input_size):
        kind = {2: "2D images", 3: "3D volumes"}.get(len(input_size), f"{len(input_size)}D arrays")
        raise ValueError(f"the model takes {kind}, got an array of shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        raise ValueError("image is constant: there is nothing to classify or explain")
    x = torch.from_numpy(((array.astype(np.float32) - lo) / (hi - lo))[None, None].copy())
    return resize_to(x, input_size)


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
