"""Image filters on tensors that methods, checks and explainers share (batched, 2D and 3D, on the
images' device)."""

from __future__ import annotations

import torch

__all__ = ["gaussian_blur", "gaussian_blur_matrix"]


def gaussian_blur_matrix(length: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """(length, length) matrix B with (B @ line) = a Gaussian blur of a 1D line of ``length`` voxels.

    Sampled kernel exp(-t^2 / (2 sigma^2)) on t = -r..r, r = int(4 sigma + 0.5), normalised; voxels
    beyond the ends repeat the end voxel (scipy's ``gaussian_filter(mode="nearest", truncate=4)``).
    A matrix rather than a padded convolution so that a sigma much larger than the image costs
    nothing extra.
    """
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=like.device)
    kernel = torch.exp(-0.5 * (offsets.to(like.dtype) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    sources = (torch.arange(length, device=like.device).view(-1, 1) + offsets).clamp(0, length - 1)
    matrix = torch.zeros((length, length), dtype=like.dtype, device=like.device)
    return matrix.scatter_add_(1, sources, kernel.expand(length, -1).contiguous())


def gaussian_blur(images: torch.Tensor, sigmas: tuple[float, ...]) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, *spatial) with one sigma (pixels) per spatial axis.

    Kernels are truncated at 4 sigma and borders repeat the edge voxel, as scipy's
    ``gaussian_filter(mode="nearest")``; a sigma of 0 leaves that axis unchanged.
    """
    spatial_dims = images.ndim - 2
    if len(sigmas) != spatial_dims:
        raise ValueError(f"need {spatial_dims} sigmas for a {spatial_dims}D image, got {sigmas}")
    out = images
    for axis, sigma in enumerate(sigmas, start=2):
        if sigma > 0:
            matrix = gaussian_blur_matrix(images.shape[axis], float(sigma), images)
            out = (out.movedim(axis, -1) @ matrix.T).movedim(-1, axis)
    return out
