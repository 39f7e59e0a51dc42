"""Maps from trained explainers (``monai_sal_app.explainers``): one forward pass of a network trained
to explain one classifier.

``explainer=`` is the trained module (as ``explainers.train`` returns it, with its card) or the path
of its checkpoint; an explainer trained for other weights than the model's is refused.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from monai_sal_app.explainers.card import ExplainerCard, check_explainer_for, load_explainer
from monai_sal_app.explainers.similarity_adversarial import explanation_map
from monai_sal_app.models.checkpoint import weights_fingerprint
from monai_sal_app.saliency.core import check_target_range, chunks, model_device, model_guard, register
from monai_sal_app.saliency.gradcam import upsample_to

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (tensor versions, fingerprint)


def _fingerprint(model: nn.Module) -> str:
    """``models.checkpoint.weights_fingerprint`` of ``model``, recomputed only after its tensors changed."""

    state = model.state_dict()
    versions = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in state.items())
    cached = _FINGERPRINTS.get(model)
    if cached is None or cached[0] != versions:
        cached = (versions, weights_fingerprint(model))
        _FINGERPRINTS[model] = cached
    return cached[1]


def resolve_explainer(explainer, kind: str, model: nn.Module) -> nn.Module:
    """The ``kind`` explainer module for ``model`` from ``explainer`` (module or checkpoint path);
    ValueError when it is missing, of another kind, or trained for other weights."""

    command = f"monai-sal train-explainer {kind.replace('_', '-')}"
    if explainer is None:
        raise ValueError(f"method {kind!r} needs explainer=: a trained {kind} (its module or checkpoint; {command})")
    if isinstance(explainer, (str, os.PathLike)):
        explainer, _ = load_explainer(explainer, device=model_device(model))
    card = getattr(explainer, "card", None)
    if not isinstance(explainer, nn.Module) or not isinstance(card, ExplainerCard):
        raise ValueError(f"explainer must be a trained {kind} module (with its card) or a checkpoint path")
    if card.kind != kind:
        raise ValueError(f"explainer is a {card.kind}, not a {kind}")
    check_explainer_for(card, _fingerprint(model))
    if model_device(explainer) != model_device(model):
        raise ValueError(f"the explainer is on {model_device(explainer)}, the model on {model_device(model)}")
    return explainer


@register(
    "mask_generator",
    "the real-time mask generator's mask for the target class, one forward pass (needs explainer=)",
    explainer="mask_generator",
)
def mask_generator(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, explainer=None, batch_size: int | None = None
) -> torch.Tensor:
    """Masks (N, 1, *spatial) in [0, 1], upsampled from the generator's 1/4 grid to the input grid."""
    generator = resolve_explainer(explainer, "mask_generator", model)
    check_target_range(target, generator.card.num_classes)
    maps = []
    with model_guard(generator), torch.no_grad():
        for sl in chunks(images.shape[0], batch_size):
            maps.append(upsample_to(generator(images[sl], target[sl]), images.shape[2:]))
    return torch.cat(maps)


@register(
    "similarity_adversarial",
    "|x_sim - x_adv| of the similarity-adversarial generator, optionally averaged over flips and rotations "
    "(needs explainer=)",
    explainer="similarity_adversarial",
    passes=lambda p, shape: (16 if len(shape) == 3 else 8) if p["tta"] is True else 1,
    cheaper="set tta to false",
)
def similarity_adversarial(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    explainer=None,
    tta: bool = False,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Maps (N, 1, *spatial) >= 0 on the input grid. They explain the model's decision on each image
    (the generator changes it to another class); ``target`` is only checked against the classes.
    ``tta``: average over the dihedral transforms of the image plane and their inverses."""

    if not isinstance(tta, bool):
        raise TypeError(f"tta must be a bool, got {tta!r}")
    generator = resolve_explainer(explainer, "similarity_adversarial", model)
    check_target_range(target, generator.card.num_classes)
    maps = []
    with model_guard(generator), torch.no_grad():
        for sl in chunks(images.shape[0], batch_size):
            maps.append(explanation_map(generator, images[sl], tta=tta))
    return torch.cat(maps)
