"""Occlusion (Zeiler and Fergus 2014), 2D and 3D.

A window slides over the image; each position is replaced by ``baseline_value`` (all channels)
and the drop in the target's softmax probability, p(x) - p(x occluded), is recorded. A voxel's
value is the mean drop over the windows that cover it, as in captum's ``Occlusion``.

Window positions follow captum exactly: along an axis of length L with window w and stride t
there are ceil((L - w) / t) + 1 positions starting at 0, t, 2t, ...; the last one is cut at the
border, so every voxel is covered at least once.

Default sizes are the papers' (2D window 16 stride 8, 3D window 8 stride 8) at a reference side
of 224 pixels (2D) or 64 voxels (3D), scaled to the image along each axis:
``window = max(1, round(default_window * side / reference))``; without ``stride`` the stride
keeps the defaults' ratio: ``max(1, window // 2)`` in 2D, ``window`` in 3D. So a 224 x 224 image
gets 16/8, a 512 x 512 image 37/18, a 64^3 volume 8/8 and a 128^3 volume 16/16.

Written here rather than taken from captum so that the occluded copies of all images go through
the network together in chunks (``batch_size`` copies per forward pass, chosen from free memory
when None) and the per-voxel average is one separable contraction of the drops with the
windows' 1D indicator vectors instead of one full-size mask per window.

Definition and reference: docs/METHODS.md#occlusion.
"""

from __future__ import annotations

import math
import string

import torch
from torch import nn

from monai_sal_app.saliency.core import auto_batch_size, chunks, register, target_scores

DEFAULT_WINDOW = {2: 16, 3: 8}
REFERENCE_SIDE = {2: 224, 3: 64}
STRIDE_RATIO = {2: 0.5, 3: 1.0}


def _per_axis(value, spatial_dims: int, name: str) -> tuple[int, ...]:
    values = (value,) * spatial_dims if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != spatial_dims or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be an int >= 1 or {spatial_dims} of them (one per spatial axis), got {value!r}")
    return values


def occlusion_geometry(spatial: tuple[int, ...], window=None, stride=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(window, stride) per spatial axis: the given ones, or the scaled defaults (module docstring)."""
    dims = len(spatial)
    if window is None:
        window = tuple(max(1, round(DEFAULT_WINDOW[dims] * side / REFERENCE_SIDE[dims])) for side in spatial)
    window = _per_axis(window, dims, "window")
    if stride is None:
        stride = tuple(max(1, int(w * STRIDE_RATIO[dims])) for w in window)
    stride = _per_axis(stride, dims, "stride")
    for side, w, t in zip(spatial, window, stride):
        if w > side:
            raise ValueError(f"occlusion window {window} does not fit in an image of spatial shape {spatial}")
        if t > w:
            raise ValueError(f"occlusion stride {stride} larger than the window {window} would leave voxels uncovered")
    return window, stride


def window_positions(side: int, window: int, stride: int) -> int:
    """How many windows cover an axis of ``side`` voxels (the last one may overhang the end)."""
    return math.ceil((side - window) / stride) + 1


def window_indicators(side: int, window: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """(positions, side) 0/1 matrix: row p marks the voxels [p * stride, p * stride + window) of an axis."""
    starts = torch.arange(window_positions(side, window, stride), device=like.device).view(-1, 1) * stride
    coords = torch.arange(side, device=like.device).view(1, -1)
    return ((coords >= starts) & (coords < starts + window)).to(like.dtype)


def _target_probability(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return target_scores(torch.softmax(model(x), dim=1), target)


def _occlusion_passes(params: dict, spatial_shape: tuple[int, ...]) -> int:
    """Forward passes per image: one per window position, plus the unoccluded image."""
    window, stride = occlusion_geometry(spatial_shape, params["window"], params["stride"])
    return math.prod(window_positions(*axis) for axis in zip(spatial_shape, window, stride)) + 1


@register(
    "occlusion",
    "drop in the target's softmax probability when a sliding window is set to a baseline value",
    bounds={"passes": 65536},
    passes=_occlusion_passes,
    cheaper="raise window or stride",
    signed=True,
)
def occlusion(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    window: int | list[int] | None = None,
    stride: int | list[int] | None = None,
    baseline_value: float = 0.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Occlusion maps (N, 1, *spatial): per voxel, the mean probability drop of the windows over it.

    Args:
        window: window side in voxels, one int or one per spatial axis; None scales the default.
        stride: step between windows, likewise; None keeps the default window/stride ratio.
        baseline_value: the value written into the occluded window (every channel).
        batch_size: images per forward pass, occluded copies and the unoccluded image alike;
            None picks it with :func:`auto_batch_size` (forward-only passes).
    """
    if isinstance(baseline_value, bool) or not isinstance(baseline_value, (int, float)):
        raise TypeError(f"baseline_value must be a number, got {baseline_value!r}")
    spatial = tuple(images.shape[2:])
    window, stride = occlusion_geometry(spatial, window, stride)
    indicators = [window_indicators(*geom, like=images) for geom in zip(spatial, window, stride)]
    grid = tuple(m.shape[0] for m in indicators)
    n_windows = math.prod(grid)
    # Row r of the work is image r // (n_windows + 1) with window r % (n_windows + 1) - 1 set to the
    # baseline, window -1 being none: the unoccluded images share the chunks with the occluded ones.
    per_image = n_windows + 1
    if batch_size is None:
        batch_size = auto_batch_size(model, images, per_image, forward_only=True)

    n, dims = images.shape[0], len(spatial)
    probabilities = torch.empty(n * per_image, dtype=images.dtype, device=images.device)
    fill = torch.tensor(float(baseline_value), dtype=images.dtype, device=images.device)
    with torch.no_grad():
        for sl in chunks(n * per_image, batch_size):
            rows = torch.arange(sl.start, sl.stop, device=images.device)
            image_idx, window_idx = rows // per_image, rows % per_image - 1
            covered = (window_idx >= 0).view(-1, *[1] * (dims + 1))
            for axis, position in enumerate(torch.unravel_index(window_idx.clamp(min=0), grid)):
                shape = [rows.numel(), 1] + [1] * dims
                shape[2 + axis] = spatial[axis]
                covered = covered & indicators[axis][position].bool().view(shape)
            occluded = torch.where(covered, fill, images[image_idx])
            probabilities[sl] = _target_probability(model, occluded, target[image_idx])
    probabilities = probabilities.view(n, per_image)
    drops = probabilities[:, :1] - probabilities[:, 1:]

    # sum over windows of drop * window mask, and the number of windows per voxel, as
    # contractions of the (N, *grid) drops with the per-axis indicators.
    grid_letters, voxel_letters = string.ascii_lowercase[:dims], string.ascii_uppercase[:dims]
    operands = ",".join(f"{g}{v}" for g, v in zip(grid_letters, voxel_letters))
    summed = torch.einsum(f"n{grid_letters},{operands}->n{voxel_letters}", drops.reshape(n, *grid), *indicators)
    counts = torch.einsum(f"{operands}->{voxel_letters}", *indicators)
    return (summed / counts).unsqueeze(1)
