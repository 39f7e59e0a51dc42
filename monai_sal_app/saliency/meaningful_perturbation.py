"""Meaningful perturbation (Fong & Vedaldi 2017, "Interpretable Explanations of Black Boxes by
Meaningful Perturbation") in 2D and 3D.

A smooth mask m in [0, 1] (1 keeps a pixel, 0 replaces it by a blurred copy of the image) is
optimised so that the perturbed image ``blur(x) * (1 - m) + x * m`` loses the target class while
deleting as little as possible:

    loss = p_target(perturbed) + l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m)
    TV_beta(m) = sum over axes of mean |m(u + e_axis) - m(u)| ** tv_beta

with the paper's values: 300 Adam steps at learning rate 0.1, ``l1_coeff`` 1e-4, ``tv_coeff``
1e-2, ``tv_beta`` 3, the mask's parameters held at 1/8 of the image resolution (rounded up) and
upsampled (bi/trilinear) to the image, Gaussian blur sigma 10 pixels and jitter of up to 4
pixels. The mask starts at 1 (nothing deleted) and is clipped to [0, 1] after every step.

Choices and units (documented because the paper leaves them to the implementation):

* The score is the target's softmax probability, as in the paper (a sigmoid of the single logit
  for a one-output model). A probability saturates: for a prediction at p ~ 1 the gradient is
  small, which Adam's per-element scaling largely compensates.
* The L1 and TV terms are means over the upsampled mask, on the image's own grid, so their
  weight does not depend on the image size. On the 1/8 grid instead, the same TV coefficient
  acts on differences 8 times larger (64 times the gradient at beta 3) and, against the weak
  L1 term, spreads the deletion over most of the image (a mean map of ~0.7 instead of ~0.2 on
  the blob model of the tests, both with the evidence on top).
* ``blur_sigma`` and ``jitter`` are in pixels of a 224-pixel side (the paper's ImageNet input)
  and scale with each axis: an axis of size s uses sigma ``blur_sigma * s / 224`` and shifts up
  to ``round(jitter * s / 224)`` voxels, so the perturbation is the same relative to the image.
* Jitter: at every step each perturbed image is shifted by a random integer offset per axis
  (edges replicated) before the forward pass; offsets are drawn from ``seed``, so a run is
  reproducible. ``jitter_copies`` > 1 sends that many differently shifted copies of each image
  through the network in the same pass and uses their mean score: a lower-variance gradient per
  step for the same number of sequential steps, at rows the hardware runs more cheaply together
  than one by one (the paper's choice, and the default, is one copy).
* All images of a chunk (``batch_size``) are optimised together, each with its own mask and
  target: the summed loss gives every mask its own gradient and Adam is per element, so the
  masks do not interact (only the jitter draws depend on the image's position in the chunk).
  Steps depend on each other, so a pass holds at most ``batch_size * jitter_copies`` rows.

Written here rather than taken from a library: captum and MONAI have no meaningful perturbation,
and the available ports are 2D, single-image scripts.

The saliency map is ``1 - m``: high where deleting the content takes the prediction away.

Definition and reference: docs/METHODS.md#meaningful-perturbation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.models.filters import gaussian_blur
from monai_sal_app.saliency.core import auto_batch_size, check_stop, chunks, register, target_scores

__all__ = ["gaussian_blur", "meaningful_perturbation", "perturb"]

# The paper's ImageNet input side: blur sigma and jitter are given in its pixels.
REFERENCE_SIDE = 224
MASK_DOWNSAMPLE = 8


def perturb(images: torch.Tensor, blurred: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``blurred * (1 - keep) + images * keep``; ``keep`` (N, 1, *spatial) in [0, 1]."""
    return blurred + (images - blurred) * keep


def _scaled(value: float, size: int) -> float:
    return value * size / REFERENCE_SIDE


def _jitter(images: torch.Tensor, max_shift: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random integer offset in [-max_shift, max_shift] per axis."""
    if not any(max_shift):
        return images
    spatial = images.shape[2:]
    pad = []
    for s in reversed(max_shift):
        pad += [s, s]
    padded = F.pad(images, pad, mode="replicate")
    shifted = []
    for i in range(images.shape[0]):
        starts = [int(torch.randint(0, 2 * s + 1, (1,), generator=generator)) for s in max_shift]
        window = tuple(slice(st, st + size) for st, size in zip(starts, spatial))
        shifted.append(padded[(i, slice(None)) + window])
    return torch.stack(shifted)


def _target_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each image's target, (N,); sigmoid for a single-logit model."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return target_scores(logits.softmax(1), target)


def _total_variation(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per image sum over axes of mean |finite difference| ** beta, (N,)."""
    tv = torch.zeros(mask.shape[0], device=mask.device, dtype=mask.dtype)
    for axis in range(2, mask.ndim):
        if mask.shape[axis] > 1:
            tv = tv + mask.diff(dim=axis).abs().pow(beta).flatten(1).mean(1)
    return tv


@register(
    "meaningful_perturbation",
    "meaningful perturbation: optimised smooth blur mask that deletes the class; map = 1 - mask",
    bounds={"steps": 5000, "jitter_copies": 16, "blur_sigma": 50, "jitter": 224},
    passes=lambda p, shape: p["steps"] * p["jitter_copies"],
    cheaper="lower steps or jitter_copies",
)
def meaningful_perturbation(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    steps: int = 300,
    lr: float = 0.1,
    l1_coeff: float = 1e-4,
    tv_coeff: float = 1e-2,
    tv_beta: float = 3.0,
    blur_sigma: float = 10.0,
    jitter: int = 4,
    seed: int = 0,
    jitter_copies: int = 1,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Deletion maps ``1 - m`` (N, 1, *spatial) in [0, 1] (see the module docstring).

    Args:
        steps: Adam steps. lr: Adam learning rate.
        l1_coeff, tv_coeff, tv_beta: weights of mean|1 - m| and of TV_beta(m), and the TV exponent.
        blur_sigma: Gaussian sigma of the deleted-content image, in pixels of a 224-pixel side.
        jitter: maximum random shift per step, in pixels of a 224-pixel side (0: none).
        seed: seed of the jitter draws.
        jitter_copies: differently jittered copies of each image per step (mean score).
        batch_size: images optimised together (None: as many as :func:`auto_batch_size` puts
            in one pass of ``jitter_copies`` rows per image).
    """
    check_integer(steps, "steps")
    if lr <= 0 or l1_coeff < 0 or tv_coeff < 0 or tv_beta <= 0 or blur_sigma < 0 or jitter < 0:
        raise ValueError(
            "need lr > 0, l1_coeff >= 0, tv_coeff >= 0, tv_beta > 0, blur_sigma >= 0, jitter >= 0; got "
            f"lr={lr}, l1_coeff={l1_coeff}, tv_coeff={tv_coeff}, tv_beta={tv_beta}, blur_sigma={blur_sigma}, jitter={jitter}"
        )
    copies = check_integer(jitter_copies, "jitter_copies")
    if batch_size is None:
        batch_size = max(1, auto_batch_size(model, images, copies) // copies)
    spatial = tuple(images.shape[2:])
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    mask_shape = tuple(math.ceil(s / MASK_DOWNSAMPLE) for s in spatial)
    sigmas = tuple(_scaled(blur_sigma, s) for s in spatial)
    max_shift = tuple(int(round(_scaled(jitter, s))) for s in spatial)
    generator = torch.Generator().manual_seed(int(seed))
    maps = []
    for sl in chunks(images.shape[0], batch_size):
        x, t = images[sl], target[sl]
        t_rows = t.repeat_interleave(copies)
        blurred = gaussian_blur(x, sigmas)
        mask = torch.ones((x.shape[0], 1, *mask_shape), device=x.device, dtype=x.dtype, requires_grad=True)
        optimizer = torch.optim.Adam([mask], lr=lr)
        for _ in range(int(steps)):
            check_stop()
            keep = F.interpolate(mask, size=spatial, mode=mode, align_corners=False)
            perturbed = perturb(x, blurred, keep).repeat_interleave(copies, dim=0)
            perturbed = _jitter(perturbed, max_shift, generator)
            score = _target_probability(model(perturbed), t_rows).view(-1, copies).mean(1)
            loss = (
                score + l1_coeff * (1 - keep).abs().flatten(1).mean(1) + tv_coeff * _total_variation(keep, tv_beta)
            ).sum()
            # autograd.grad rather than backward(): nothing accumulates in the model's .grad
            (mask.grad,) = torch.autograd.grad(loss, [mask])
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
        with torch.no_grad():
            maps.append(1.0 - F.interpolate(mask, size=spatial, mode=mode, align_corners=False))
    return torch.cat(maps).detach()
