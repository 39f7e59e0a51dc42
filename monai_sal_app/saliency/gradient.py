"""Vanilla gradient: d logit_target / d input (Simonyan et al. 2014).

Written here rather than taken from captum's ``Saliency`` because it is one autograd call and
it is the building block of several other methods (gradient x input, SmoothGrad, IG); it is
cross-checked against captum in the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_sal_app.saliency.core import chunks, register, target_scores


def input_gradients(model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
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


@register("gradient", "gradient of the target logit with respect to the input, summed over channels")
def gradient(model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Signed input gradient summed over input channels, (N, 1, *spatial)."""
    return input_gradients(model, images, target, batch_size).sum(dim=1, keepdim=True)
