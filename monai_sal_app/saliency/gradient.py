"""Vanilla gradient: d logit_target / d input (Simonyan et al. 2014), and gradient x input.

Written here rather than taken from captum's ``Saliency`` because it is one autograd call and
it is the building block of several other methods (gradient x input, SmoothGrad, IG); it is
cross-checked against captum in the tests.

Definitions and references: docs/METHODS.md#gradient and docs/METHODS.md#gradient-x-input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from monai_sal_app.saliency.core import auto_batch_size, chunks, register, target_scores


def input_gradients(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """d logit_target / d input for every image, shape (N, C, *spatial), in chunks of ``batch_size``.

    Each image's logit depends only on that image (eval mode), so the gradient of the summed
    target logits of a chunk is the per-image gradient.
    """
    grads = []
    for sl in chunks(images.shape[0], batch_size):
        x = images[sl].detach().clone().requires_grad_(True)
        score = target_scores(model(x), target[sl]).sum()
        (g,) = torch.autograd.grad(score, x)
        grads.append(g)
    return torch.cat(grads)


@register("gradient", "gradient of the target logit with respect to the input, summed over channels", signed=True)
def gradient(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Signed input gradient summed over input channels, (N, 1, *spatial)."""
    return input_gradients(model, images, target, batch_size).sum(dim=1, keepdim=True)


def summed_pass_gradients(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    passes_per_image: int,
    make_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    contribution: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int | None = None,
) -> torch.Tensor:
    """Per image, the sum over its passes of ``contribution`` of each pass's input gradient.

    The engine of every multi-pass gradient method (SmoothGrad, IG, SmoothGrad-IG). The N x P
    rows (image i, pass j), numbered ``r = i * P + j``, are built chunk by chunk, so at most
    ``batch_size`` rows exist at once; ``batch_size=None`` picks it with :func:`auto_batch_size`.

    Args:
        images: (N, C, *spatial), used for N, the automatic chunk size and the output shape.
        target: (N,) long.
        passes_per_image: P.
        make_rows: ``(image_idx, pass_idx) -> (R, C, *spatial)`` network inputs of R rows.
        contribution: ``(image_idx, pass_idx, grads) -> (R, C, *spatial)`` what each row adds
            to its image's sum, from ``grads`` = d logit_target / d row.

    Returns:
        (N, C, *spatial) sums, accumulated image by image (no atomic adds, so deterministic);
        they depend on ``batch_size`` only through float rounding.
    """
    if batch_size is None:
        batch_size = auto_batch_size(model, images, passes_per_image)
    out = torch.zeros_like(images)
    for sl in chunks(images.shape[0] * passes_per_image, batch_size):
        rows = torch.arange(sl.start, sl.stop, device=images.device)
        image_idx, pass_idx = rows // passes_per_image, rows % passes_per_image
        grads = input_gradients(model, make_rows(image_idx, pass_idx), target[image_idx])
        added = contribution(image_idx, pass_idx, grads)
        present, counts = torch.unique_consecutive(image_idx, return_counts=True)
        for i, part in zip(present.tolist(), added.split(counts.tolist())):
            out[i] += part.sum(0)
    return out


@register("gradient_x_input", "input gradient times the input, summed over channels", signed=True)
def gradient_x_input(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """sum_c x_c * d logit_target / d x_c, (N, 1, *spatial) (Shrikumar et al. 2016).

    ``batch_size`` images per pass; None picks it from the free memory (:func:`auto_batch_size`).
    """
    if batch_size is None:
        batch_size = auto_batch_size(model, images, 1)
    return (images * input_gradients(model, images, target, batch_size)).sum(dim=1, keepdim=True)
