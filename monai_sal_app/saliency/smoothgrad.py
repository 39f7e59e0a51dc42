"""SmoothGrad (Smilkov et al. 2017): the input gradient averaged over noisy copies of the image.

map_i = sum_c mean_k g_c(x_i + s_i z_k), or with ``squared=True`` sum_c mean_k g_c(.)^2, where
g = d logit_target / d input, s_i = sigma * (max - min) of image i (over all its channels and
voxels) and z_1..z_K are standard normal noise patterns of the image's shape.

Written here rather than taken from captum's ``NoiseTunnel(Saliency)`` so that the noisy copies
of *all* images go through the network together in chunks (captum runs one noise level per
call, so one call per image), and so that the noise is reproducible: the K patterns come from a
``torch.Generator`` seeded with ``seed`` on the images' device and are the same for every image
(scaled by its own s_i), so an image's map does not depend on which batch it was explained in.
Drawn in one call, they are exactly the numbers captum's NoiseTunnel draws for one image after
``torch.manual_seed(seed)`` on the same device; the tests use that to compare with captum.

Definition and reference: docs/METHODS.md#smoothgrad.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.saliency.core import register
from monai_sal_app.saliency.gradient import summed_pass_gradients


def check_noise_params(n_samples: int, sigma: float, seed: int) -> None:
    """``ValueError``/``TypeError`` for a noise setting SmoothGrad cannot use."""
    check_integer(n_samples, "n_samples")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
        raise ValueError(f"sigma must be a number >= 0 (a fraction of the image's value range), got {sigma!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def noise_patterns(images: torch.Tensor, n_samples: int, seed: int) -> torch.Tensor:
    """K standard normal patterns (K, C, *spatial) from a generator seeded with ``seed`` on the
    images' device, in the images' dtype; shared by every image of the batch."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return torch.randn((n_samples, *images.shape[1:]), generator=generator, device=images.device, dtype=images.dtype)


def noise_levels(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """s_i = sigma * (max - min) of each image, shaped (N, 1, ..., 1) to broadcast over it."""
    flat = images.reshape(images.shape[0], -1)
    span = flat.max(dim=1).values - flat.min(dim=1).values
    return (sigma * span).view(-1, *([1] * (images.ndim - 1)))


@register(
    "smoothgrad",
    "input gradient averaged over noisy copies of the image (squared=True: mean of g^2)",
    bounds={"n_samples": 1000},
    passes=lambda p, shape: p["n_samples"],
    cheaper="lower n_samples",
    signed=True,
)
def smoothgrad(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    n_samples: int = 25,
    sigma: float = 0.15,
    squared: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """SmoothGrad maps (N, 1, *spatial), signed (non-negative when ``squared``).

    Args:
        n_samples: K noisy copies per image.
        sigma: noise standard deviation as a fraction of each image's max - min.
        squared: average g^2 instead of g (SmoothGrad-Squared), then sum over channels.
        seed: seed of the noise generator (same seed -> same maps).
        batch_size: noisy copies per forward/backward pass; None picks it from free memory.
    """
    check_noise_params(n_samples, sigma, seed)
    if not isinstance(squared, bool):
        raise TypeError(f"squared must be a bool, got {squared!r}")
    z = noise_patterns(images, n_samples, seed)
    s = noise_levels(images, sigma)

    def make_rows(image_idx: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
        return images[image_idx] + s[image_idx] * z[sample_idx]

    def contribution(image_idx: torch.Tensor, sample_idx: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads * grads if squared else grads

    total = summed_pass_gradients(model, images, target, n_samples, make_rows, contribution, batch_size)
    return (total / n_samples).sum(dim=1, keepdim=True)
