"""Integrated Gradients (Sundararajan et al. 2017) and SmoothGrad over IG, 2D and 3D.

IG_c(x) = (x_c - b_c) * integral_0^1 g_c(b + a (x - b)) da, with g = d logit_target / d input and
b a baseline image. The integral is the trapezoid rule on ``steps`` evenly spaced alphas that
include both ends, a_s = s / (steps - 1) for s = 0..steps-1:

    integral ~= sum_s w_s g(a_s),  w_s = 1 / (steps - 1), halved for s = 0 and s = steps - 1,

so the weights sum to 1 and completeness (sum of the map = f(x) - f(b)) holds up to the
quadrature error. captum's ``method="riemann_trapezoid"`` uses the same alphas and the same
relative weights but with step 1 / steps instead of 1 / (steps - 1) (its weights sum to
(steps - 1) / steps), so our maps equal captum's times steps / (steps - 1); the tests check that.

Written here rather than taken from captum so that the IG steps of all images (and, for
SmoothGrad-IG, of all their noisy copies) go through the network together in chunks built on the
fly, with the chunk size chosen from free memory; captum expands every step of every image at
once (or needs ``internal_batch_size`` per call).

Baselines (``baseline=``; the names the fidelity check uses for its replacements too): ``"zero"``; ``"constant"`` (every voxel ``baseline_value``);
``"min"`` (every voxel the image's own minimum over all channels and voxels); ``"blur"``
(the image under a Gaussian blur of ``blur_sigma`` pixels along every spatial axis, see
``models.filters.gaussian_blur``: scipy's ``gaussian_filter`` with ``mode="nearest"``).

Definitions and references: docs/METHODS.md#integrated-gradients and docs/METHODS.md#smoothgrad-ig.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.models.filters import gaussian_blur
from monai_sal_app.saliency.core import register
from monai_sal_app.saliency.gradient import summed_pass_gradients
from monai_sal_app.saliency.smoothgrad import check_noise_params, noise_levels, noise_patterns

BASELINES = ("zero", "constant", "min", "blur")


def make_baseline(
    images: torch.Tensor, baseline: str = "zero", baseline_value: float = 0.0, blur_sigma: float = 10.0
) -> torch.Tensor:
    """The IG baseline of each image, same shape as ``images`` (N, C, *spatial)."""
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "constant":
        if isinstance(baseline_value, bool) or not isinstance(baseline_value, (int, float)):
            raise TypeError(f"baseline_value must be a number, got {baseline_value!r}")
        return torch.full_like(images, float(baseline_value))
    if baseline == "min":
        lowest = images.reshape(images.shape[0], -1).min(dim=1).values
        return lowest.view(-1, *([1] * (images.ndim - 1))).expand_as(images).clone()
    if baseline == "blur":
        if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not blur_sigma > 0:
            raise ValueError(f"blur_sigma must be a number of pixels > 0, got {blur_sigma!r}")
        return gaussian_blur(images, (float(blur_sigma),) * (images.ndim - 2))
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def trapezoid_alphas_and_weights(steps: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` evenly spaced alphas in [0, 1] including both ends, and their trapezoid weights
    (1 / (steps - 1), halved at both ends; they sum to 1), in ``like``'s dtype and device."""
    check_integer(steps, "steps", 2)  # the path includes both ends
    alphas = torch.linspace(0, 1, steps, dtype=like.dtype, device=like.device)
    weights = torch.full((steps,), 1.0 / (steps - 1), dtype=like.dtype, device=like.device)
    weights[0] = weights[-1] = 0.5 / (steps - 1)
    return alphas, weights


def _broadcast(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.view(-1, *([1] * (ndim - 1)))


@register(
    "integrated_gradients",
    "path integral of the gradient from a baseline to the image, times (image - baseline)",
    bounds={"steps": 1000, "blur_sigma": 1000},
    passes=lambda p, shape: p["steps"],
    cheaper="lower steps",
    signed=True,
)
def integrated_gradients(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    steps: int = 50,
    baseline: str = "zero",
    baseline_value: float = 0.0,
    blur_sigma: float = 10.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """IG maps (N, 1, *spatial), signed, summed over channels; they sum to about f(x) - f(baseline).

    Args:
        steps: points on the straight path, both ends included (trapezoid rule, >= 2).
        baseline: "zero", "constant", "min" or "blur" (see the module docstring).
        baseline_value: the value of the "constant" baseline.
        blur_sigma: Gaussian sigma in pixels of the "blur" baseline.
        batch_size: path points per forward/backward pass; None picks it from free memory.
    """
    alphas, weights = trapezoid_alphas_and_weights(steps, images)
    base = make_baseline(images, baseline, baseline_value, blur_sigma)
    delta = images - base

    def make_rows(image_idx: torch.Tensor, step_idx: torch.Tensor) -> torch.Tensor:
        return base[image_idx] + _broadcast(alphas[step_idx], images.ndim) * delta[image_idx]

    def contribution(image_idx: torch.Tensor, step_idx: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads * _broadcast(weights[step_idx], grads.ndim)

    path_mean = summed_pass_gradients(model, images, target, steps, make_rows, contribution, batch_size)
    return (delta * path_mean).sum(dim=1, keepdim=True)


@register(
    "smoothgrad_ig",
    "Integrated Gradients averaged over noisy copies of the image (SmoothGrad over IG)",
    bounds={"n_samples": 100, "steps": 1000, "blur_sigma": 1000},
    passes=lambda p, shape: p["n_samples"] * p["steps"],
    cheaper="lower n_samples or steps",
    signed=True,
)
def smoothgrad_ig(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    n_samples: int = 10,
    steps: int = 20,
    sigma: float = 0.15,
    baseline: str = "zero",
    baseline_value: float = 0.0,
    blur_sigma: float = 10.0,
    seed: int = 0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """mean_k IG(x + s z_k) over K noisy copies, (N, 1, *spatial), signed.

    The noise is SmoothGrad's (see ``saliency.smoothgrad``: s = sigma * (max - min) of the image,
    patterns from ``seed``); the baseline is computed once from the clean image and shared by
    its noisy copies (as captum's ``NoiseTunnel(IntegratedGradients)`` does). ``batch_size``
    counts path points of noisy copies per pass; None picks it from free memory.
    """
    check_noise_params(n_samples, sigma, seed)
    alphas, weights = trapezoid_alphas_and_weights(steps, images)
    base = make_baseline(images, baseline, baseline_value, blur_sigma)
    z = noise_patterns(images, n_samples, seed)
    s = noise_levels(images, sigma)

    def noisy_delta(image_idx: torch.Tensor, pass_idx: torch.Tensor) -> torch.Tensor:
        sample_idx = pass_idx // steps
        return images[image_idx] + s[image_idx] * z[sample_idx] - base[image_idx]

    def make_rows(image_idx: torch.Tensor, pass_idx: torch.Tensor) -> torch.Tensor:
        alpha = _broadcast(alphas[pass_idx % steps], images.ndim)
        return base[image_idx] + alpha * noisy_delta(image_idx, pass_idx)

    def contribution(image_idx: torch.Tensor, pass_idx: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads * _broadcast(weights[pass_idx % steps], grads.ndim) * noisy_delta(image_idx, pass_idx)

    total = summed_pass_gradients(model, images, target, n_samples * steps, make_rows, contribution, batch_size)
    return (total / n_samples).sum(dim=1, keepdim=True)
