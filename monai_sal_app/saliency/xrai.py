"""XRAI (Kapishnikov et al. 2019, "XRAI: Better Attributions Through Regions") in 2D and 3D.

XRAI over-segments the image at several scales, then greedily builds a saliency map region by
region: at each step it adds the segment whose not-yet-covered pixels have the highest mean
attribution ("gain"), and every pixel takes the gain of the step that covered it.

Written here because no well-kept library does it for PyTorch in 3D. The 2D path reproduces
Google PAIR's reference implementation (``saliency.core.xrai``, the authors' code) step by step,
and the tests check that the maps and region rankings are the same:

* Attribution: integrated gradients of the target logit with 100 steps and two constant
  baselines, the image's minimum and its maximum, averaged (PAIR's default baselines). The
  integration rule is PAIR's: alphas ``linspace(0, 1, steps)`` (both ends included) and
  ``IG = (x - baseline) * sum_k grad(baseline + alpha_k (x - baseline)) / steps``. All
  ``N * 2 * steps`` interpolated inputs go through the network in chunks of ``batch_size``.
  Channels are merged by their maximum, as PAIR does for (H, W, C) attributions.
* 2D segments: the image is min-max normalised to [-1, 1], resized to 224 x 224 (cubic), segmented
  by Felzenszwalb's algorithm at scales 50, 100, 150, 250, 500, 1200 (sigma 0.8, min size 150
  pixels of the 224 x 224 grid), each label map is resized back (nearest) and every segment is
  dilated by a disk of 5 pixels on the image's own grid.
* Greedy selection with PAIR's rules: segments adding fewer than ``min_pixel_diff`` (50) new
  pixels are dropped, ties go to the earlier segment (scale order, then label order), the loop
  stops once the covered fraction exceeds ``area_threshold``, and pixels never covered get the
  mean attribution over themselves.
* 3D segments (ours, PAIR is 2D only): SLIC supervoxels (``skimage.segmentation.slic``) of the
  volume min-max normalised to [0, 1], with ``n_segments`` 8, 27, 64, 125, 216 (cubes, because
  SLIC seeds its centres on a regular grid: 16 and 32 both give 27 seeds in a cube), compactness
  0.1 on that intensity scale, pre-smoothing ``sigma`` 0.8, each supervoxel dilated by a ball of
  ``dilation_voxels`` = 1 (PAIR's 5 pixels are ~2% of a 224 side, ~1.4 voxels of a 64 side). The
  same greedy selection follows.
* A constant image (PAIR divides by zero there) is segmented as if it were all zeros.

Speed: PAIR keeps every segment as a full-size boolean image, dilates them one by one, and its
greedy loop recomputes every remaining segment's difference with the covered mask on the full
image at every step. Here segment membership is one sparse (segments x pixels) matrix built
from bounding-box crops, and the greedy loop keeps each segment's count and sum of uncovered
pixels up to date by subtracting what each step covers (see :func:`select_regions` for how the
choice stays exact): the same result as PAIR's, in less time (docs/BENCHMARK_METHODS.md); most
of the remaining time is skimage's six Felzenszwalb runs, which both share.

Definition and references: docs/METHODS.md#xrai.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy import ndimage
from skimage.segmentation import felzenszwalb, slic
from skimage.transform import resize
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.metrics.localization import top_regions_mask
from monai_sal_app.saliency.core import (
    auto_batch_size,
    check_stop,
    chunks,
    get_method,
    model_device,
    model_guard,
    register,
    resolve_target,
    validate_images,
)
from monai_sal_app.saliency.gradient import input_gradients

__all__ = [
    "XRAIRegions",
    "attribution_regions",
    "segment_membership_2d",
    "segment_membership_3d",
    "select_regions",
    "xrai",
    "xrai_regions",
    "xrai_segments",
]

# PAIR segments every 2D image on a 224 x 224 grid, so Felzenszwalb's scale and min size
# (in pixels of that grid) mean the same thing whatever the image size.
SEGMENTATION_SIDE_2D = 224


@dataclass(frozen=True)
class XRAIRegions:
    """The ranked regions of one image's XRAI map.

    Attributes:
        ranks: int array with the image's spatial shape; pixel value k (1-based) means the pixel
            belongs to the k-th most important region. Regions are disjoint and cover the image.
        gains: (R,) float64, attribution density (mean attribution per pixel) of each region,
            in rank order; it is the value the XRAI map takes on the region.
        areas: (R,) float64, each region's fraction of the image, in rank order.
        n_selected: how many regions the greedy selection chose; when it is R - 1, the last
            region is the remainder that no selected segment covered (PAIR appends it too).
    """

    ranks: np.ndarray
    gains: np.ndarray
    areas: np.ndarray
    n_selected: int

    @property
    def cumulative_area(self) -> np.ndarray:
        """(R,) fraction of the image covered by the top 1..R regions."""
        return np.cumsum(self.areas)

    def masks(self) -> np.ndarray:
        """Boolean stack (R, *spatial): one mask per region, most important first."""
        return self.ranks[None] == np.arange(1, len(self.gains) + 1).reshape(-1, *([1] * self.ranks.ndim))

    def top_mask(self, fraction: float) -> np.ndarray:
        """Union of the fewest top regions that together cover at least ``fraction`` of the image.

        ``fraction`` is in [0, 1]; 0 gives an empty mask, 1 the whole image.
        """
        return top_regions_mask(self.ranks, fraction)


def _integrated_gradients_min_max(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, steps: int, batch_size: int | None
) -> torch.Tensor:
    """IG with the constant min and max baselines of each image, averaged; (N, C, *spatial).

    PAIR's rule: alphas ``linspace(0, 1, steps)``, gradients summed and divided by ``steps``.
    The N * 2 * steps interpolated inputs are built chunk by chunk (never all in memory).
    """
    n = images.shape[0]
    flat = images.reshape(n, -1)
    baselines = torch.stack([flat.amin(1), flat.amax(1)], 1)  # (N, 2) constant values
    alphas = torch.linspace(0.0, 1.0, steps, device=images.device, dtype=images.dtype)
    view = (-1,) + (1,) * (images.ndim - 1)
    grad_sums = torch.zeros((n * 2, *images.shape[1:]), device=images.device, dtype=images.dtype)
    if batch_size is None:
        batch_size = auto_batch_size(model, images, 2 * steps)
    for sl in chunks(n * 2 * steps, batch_size):
        index = torch.arange(sl.start, sl.stop, device=images.device)
        path, k = index // steps, index % steps  # path = image * 2 + baseline
        image_index = path // 2
        base = baselines.reshape(-1)[path].view(view)
        inputs = base + alphas[k].view(view) * (images[image_index] - base)
        grads = input_gradients(model, inputs, target[image_index], batch_size=None)
        grad_sums.index_add_(0, path, grads)
    diffs = images.unsqueeze(1) - baselines.view(n, 2, *(1,) * (images.ndim - 1))
    return (diffs * grad_sums.view(n, 2, *images.shape[1:]) / steps).mean(1)


def _dilated_membership(label_maps: Sequence[np.ndarray], radius: int) -> sp.csr_matrix:
    """Sparse (segments x pixels) membership of every label of every map, dilated by ``radius``.

    Dilation by a disk (2D) or ball (3D) of the points at distance <= ``radius`` (skimage's
    ``disk``/``ball`` footprints). Segments are ordered map by map, then by increasing label value
    (PAIR's order). Each segment is dilated inside its bounding box grown by ``radius``, so the
    cost follows the segments' areas rather than (segments x image size).
    """
    shape = label_maps[0].shape
    footprint = (np.mgrid[(slice(-radius, radius + 1),) * len(shape)] ** 2).sum(0) <= radius**2
    # Direct dilation costs (crop size x footprint size); a distance transform costs (crop size)
    # with a larger constant: it wins from about 30 footprint points on.
    use_distance = footprint.sum() > 30
    pixel_index = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    rows: list[np.ndarray] = []
    for labels in label_maps:
        compact = np.unique(labels, return_inverse=True)[1].reshape(shape) + 1  # find_objects skips 0
        for label, box in enumerate(ndimage.find_objects(compact), start=1):
            grown = tuple(slice(max(0, s.start - radius), min(size, s.stop + radius)) for s, size in zip(box, shape))
            segment = compact[grown] == label
            if use_distance:
                segment = ndimage.distance_transform_edt(~segment) <= radius
            elif radius:
                segment = ndimage.binary_dilation(segment, structure=footprint)
            rows.append(pixel_index[grown][segment])
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(rows), pixel_index.size))


def _map_in_threads(fn: Callable, values: Sequence) -> list:
    """``[fn(v) for v in values]``, one thread per CPU core: skimage's segmentations release the
    GIL for much of their work, so the scales' segmentations overlap."""
    values = list(values)
    workers = min(len(values), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(v) for v in values]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, values))


def segment_membership_2d(
    image: np.ndarray,
    scales: Sequence[float] = (50, 100, 150, 250, 500, 1200),
    sigma: float = 0.8,
    min_size: int = 150,
    dilation_px: int = 5,
) -> sp.csr_matrix:
    """PAIR's multi-scale Felzenszwalb segments of a (C, H, W) image as a sparse (S x H*W) matrix.

    The image is min-max normalised to [-1, 1] over all channels (a constant image becomes 0),
    resized to 224 x 224 with cubic interpolation, segmented at each scale, and each label map is
    resized back to (H, W) with nearest neighbour; segments are dilated by a disk of
    ``dilation_px`` pixels on the (H, W) grid. Row order: scale, then label.
    """
    if image.ndim != 3:
        raise ValueError(f"expected one (C, H, W) image, got shape {image.shape}")
    dilation_px = check_integer(dilation_px, "dilation_px", 0)
    hwc = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)
    lo, hi = hwc.min(), hwc.max()
    normalised = (hwc - lo) / (hi - lo) * 2.0 - 1.0 if hi > lo else np.zeros_like(hwc)
    side = SEGMENTATION_SIDE_2D
    resized = resize(normalised, (side, side), order=3, mode="constant", preserve_range=True, anti_aliasing=True)

    def segment(scale: float) -> np.ndarray:
        labels = felzenszwalb(resized, scale=scale, sigma=sigma, min_size=min_size)
        return resize(labels, hwc.shape[:2], order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(
            int
        )

    return _dilated_membership(_map_in_threads(segment, scales), dilation_px)


def segment_membership_3d(
    volume: np.ndarray,
    n_segments: Sequence[int] = (8, 27, 64, 125, 216),
    compactness: float = 0.1,
    sigma: float = 0.8,
    dilation_voxels: int = 1,
) -> sp.csr_matrix:
    """Multi-scale SLIC supervoxels of a (C, D, H, W) volume as a sparse (S x D*H*W) matrix (ours).

    The volume is min-max normalised to [0, 1] over all channels (a constant volume becomes 0);
    SLIC runs once per entry of ``n_segments`` (its approximate supervoxel count) with Gaussian
    pre-smoothing ``sigma`` (voxels) and ``compactness`` (weight of space vs intensity on that
    [0, 1] scale); each supervoxel is dilated by a ball of ``dilation_voxels``. Row order:
    scale, then label.
    """
    if volume.ndim != 4:
        raise ValueError(f"expected one (C, D, H, W) volume, got shape {volume.shape}")
    dilation_voxels = check_integer(dilation_voxels, "dilation_voxels", 0)
    vol = np.asarray(volume, dtype=np.float64)
    lo, hi = vol.min(), vol.max()
    normalised = (vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol)
    if normalised.shape[0] == 1:
        image, channel_axis = normalised[0], None
    else:
        image, channel_axis = np.moveaxis(normalised, 0, -1), -1
    counts = [check_integer(n, "n_segments entry", 1) for n in n_segments]

    def segment(n: int) -> np.ndarray:
        return slic(image, n_segments=n, compactness=compactness, sigma=sigma, start_label=0, channel_axis=channel_axis)

    return _dilated_membership(_map_in_threads(segment, counts), dilation_voxels)


def _gather(indptr: np.ndarray, indices: np.ndarray, major: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated ``indices`` of compressed rows (or columns) ``major``, and their lengths."""
    starts = indptr[major]
    lengths = indptr[major + 1] - starts
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    return indices[offsets], lengths


def select_regions(
    attribution: np.ndarray, membership: sp.csr_matrix, area_threshold: float = 1.0, min_pixel_diff: int = 50
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """XRAI's greedy region selection (PAIR's ``XRAI._xrai``), vectorised.

    Args:
        attribution: (P,) attribution per pixel (flattened image).
        membership: sparse (S, P) matrix, nonzero where pixel p belongs to segment s.
        area_threshold: stop once the covered fraction of the image exceeds this.
        min_pixel_diff: segments adding fewer new pixels than this are dropped.

    Returns:
        ``(xrai_map, step, gains)``: the (P,) XRAI map; the (P,) index of the step that covered
        each pixel (-1 where none did); and the (K,) gain (mean attribution of the newly covered
        pixels) of each of the K steps. Uncovered pixels get their own mean attribution in the map.

    Each segment's count and sum of uncovered attribution are kept up to date by subtracting
    the pixels each step covers, so a step costs (new pixels x segments per pixel). Subtraction
    accumulates rounding error (at most ~1e-16 x ``2 P`` x the segment's sum of |attribution|,
    far below the 1e-8 slack used here), so every segment whose running density is within that
    slack of the best one has its sum recomputed exactly before the choice: the chosen segment
    is always the true first maximum.
    """
    attr = np.asarray(attribution, dtype=np.float64).reshape(-1)
    n_pixels = attr.size
    if membership.shape[1] != n_pixels:
        raise ValueError(f"membership has {membership.shape[1]} pixel columns for {n_pixels} attribution values")
    min_pixel_diff = check_integer(min_pixel_diff, "min_pixel_diff", 1)
    by_segment = sp.csr_matrix(membership, dtype=np.float64, copy=True)
    by_segment.sum_duplicates()
    by_segment.data[:] = 1.0
    by_pixel = by_segment.tocsc()
    n_segments = by_segment.shape[0]

    uncovered_attr = attr.copy()  # attribution of uncovered pixels, 0 once covered
    is_uncovered = np.ones(n_pixels, dtype=bool)
    counts = np.diff(by_segment.indptr)
    sums = by_segment @ attr
    slack_sums = 1e-8 * (by_segment @ np.abs(attr))
    active = np.ones(n_segments, dtype=bool)
    step = np.full(n_pixels, -1, dtype=np.int64)
    xrai_map = np.full(n_pixels, -np.inf)
    gains: list[float] = []
    covered = 0
    while covered / n_pixels <= area_threshold:
        active &= counts >= min_pixel_diff
        if not active.any():
            break
        density = np.full(n_segments, -np.inf)
        density[active] = sums[active] / counts[active]
        slack = np.zeros(n_segments)
        slack[active] = slack_sums[active] / counts[active]
        top = int(np.argmax(density))
        candidates = np.flatnonzero(density + slack >= density[top] - slack[top])
        members, lengths = _gather(by_segment.indptr, by_segment.indices, candidates)
        sums[candidates] = np.add.reduceat(uncovered_attr[members], np.cumsum(lengths) - lengths)
        # first maximum in segment order, like PAIR's strict '>' loop
        best = int(candidates[np.argmax(sums[candidates] / counts[candidates])])
        gain = float(sums[best] / counts[best])
        pixels = by_segment.indices[by_segment.indptr[best] : by_segment.indptr[best + 1]]
        new = pixels[is_uncovered[pixels]]
        is_uncovered[new] = False
        uncovered_attr[new] = 0.0
        step[new] = len(gains)
        xrai_map[new] = gain
        gains.append(gain)
        covered += len(new)
        active[best] = False
        segments_hit, per_pixel = _gather(by_pixel.indptr, by_pixel.indices, new)
        counts -= np.bincount(segments_hit, minlength=n_segments)
        sums -= np.bincount(segments_hit, weights=np.repeat(attr[new], per_pixel), minlength=n_segments)
    rest = step < 0
    if rest.any():
        xrai_map[rest] = attr[rest].mean()
    return xrai_map, step, np.asarray(gains, dtype=np.float64)


def xrai_segments(image: np.ndarray, **params) -> sp.csr_matrix:
    """XRAI's multi-scale segments of one image, (C, H, W) or (C, D, H, W), as a sparse (S x P) matrix:
    :func:`segment_membership_2d` or :func:`segment_membership_3d` with the xrai method's
    parameters. ``params``: any of ``explain(..., "xrai")``'s (the others take its defaults); those
    that do not shape the segments (``steps``, ``area_threshold``, ...) are accepted and unused, so
    one parameter dict serves both."""
    defaults = get_method("xrai").defaults
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for xrai; it takes {sorted(defaults)}")
    p = {**defaults, **params}
    if np.ndim(image) == 3:
        return segment_membership_2d(image, p["scales"], p["sigma"], p["min_size"], p["dilation_px"])
    return segment_membership_3d(image, p["n_segments"], p["compactness"], p["sigma"], p["dilation_voxels"])


def attribution_regions(
    attribution: np.ndarray, membership: sp.csr_matrix, area_threshold: float = 1.0, min_pixel_diff: int = 50
) -> tuple[np.ndarray, XRAIRegions]:
    """XRAI's greedy selection of the segments ``membership`` (S x P, e.g. :func:`xrai_segments`)
    ranked by any attribution, as PAIR's ``base_attribution`` does it: ``(xrai_map, regions)``.

    ``attribution``: one value per pixel/voxel, in the image's spatial shape (P values); XRAI itself
    passes its integrated gradients, any other map (or |map|) works the same way. ``xrai_map``:
    float64 of that shape, each region painted with its gain (mean attribution of the pixels it
    added); ``regions``: the ranked :class:`XRAIRegions`. ``area_threshold``, ``min_pixel_diff``: as
    :func:`select_regions`.
    """
    attr = np.asarray(attribution, dtype=np.float64)
    xrai_map, step, gains = select_regions(attr.reshape(-1), membership, area_threshold, min_pixel_diff)
    return xrai_map.reshape(attr.shape), _ranked_regions(attr.shape, attr.reshape(-1), step, gains)


def _ranked_regions(shape: tuple[int, ...], attr: np.ndarray, step: np.ndarray, gains: np.ndarray) -> XRAIRegions:
    """Regions sorted by decreasing gain (stable, like PAIR), the uncovered remainder last."""
    order = np.argsort(-gains, kind="stable")
    rank_of_step = np.empty(len(gains), dtype=np.int64)
    rank_of_step[order] = np.arange(1, len(gains) + 1)
    ranks = np.where(step >= 0, rank_of_step[np.maximum(step, 0)], len(gains) + 1)
    region_gains = list(gains[order])
    rest = step < 0
    if rest.any():
        region_gains.append(attr[rest].mean())
    areas = np.bincount(ranks, minlength=len(region_gains) + 1)[1:] / step.size
    return XRAIRegions(ranks.reshape(shape), np.asarray(region_gains), areas, len(gains))


def _run_xrai(
    model,
    images,
    target,
    steps,
    batch_size,
    scales,
    sigma,
    min_size,
    dilation_px,
    n_segments,
    compactness,
    dilation_voxels,
    area_threshold,
    min_pixel_diff,
):
    """(maps (N, 1, *spatial) float32 tensor, [XRAIRegions per image])."""
    steps = check_integer(steps, "steps", 1)
    # checked here too so that bad values fail before the integrated gradients are paid for
    for name, value, minimum in [
        ("min_pixel_diff", min_pixel_diff, 1),
        ("dilation_px", dilation_px, 0),
        ("dilation_voxels", dilation_voxels, 0),
    ]:
        check_integer(value, name, minimum)
    if not 0.0 <= float(area_threshold) <= 1.0:
        raise ValueError(f"area_threshold must be in [0, 1], got {area_threshold}")
    attributions = _integrated_gradients_min_max(model, images, target, steps, batch_size)
    merged = attributions.amax(1).detach().cpu().double().numpy()  # channel max, as PAIR
    pixels = images.detach().cpu().double().numpy()
    maps, regions = [], []
    segmentation = {
        "scales": scales,
        "sigma": sigma,
        "min_size": min_size,
        "dilation_px": dilation_px,
        "n_segments": n_segments,
        "compactness": compactness,
        "dilation_voxels": dilation_voxels,
    }
    for attr, image in zip(merged, pixels):
        check_stop()
        membership = xrai_segments(image, **segmentation)
        xrai_map, image_regions = attribution_regions(attr, membership, area_threshold, min_pixel_diff)
        maps.append(xrai_map)
        regions.append(image_regions)
    out = torch.as_tensor(np.stack(maps)[:, None], dtype=torch.float32, device=images.device)
    return out, regions


@register(
    "xrai",
    "XRAI: multi-scale segments ranked greedily by integrated-gradients density (2D PAIR, 3D SLIC)",
    bounds={
        "steps": 1000,
        "scales": 10000,
        "min_size": 224 * 224,
        "dilation_px": 50,
        "n_segments": 10000,
        "dilation_voxels": 10,
    },
    passes=lambda p, shape: 2 * p["steps"],  # IG from two baselines
    cheaper="lower steps",
)
def xrai(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    steps: int = 100,
    batch_size: int | None = None,
    scales: Sequence[float] = (50, 100, 150, 250, 500, 1200),
    sigma: float = 0.8,
    min_size: int = 150,
    dilation_px: int = 5,
    n_segments: Sequence[int] = (8, 27, 64, 125, 216),
    compactness: float = 0.1,
    dilation_voxels: int = 1,
    area_threshold: float = 1.0,
    min_pixel_diff: int = 50,
) -> torch.Tensor:
    """XRAI maps (N, 1, *spatial): each pixel holds the attribution density of its region.

    Args:
        steps: IG steps per baseline (two baselines: the image's min and max).
        batch_size: interpolated inputs per forward/backward pass (None: :func:`auto_batch_size`).
        scales, sigma, min_size, dilation_px: 2D Felzenszwalb segmentation (PAIR's values;
            ``min_size`` in pixels of the 224 x 224 segmentation grid, ``dilation_px`` in pixels
            of the image). ``sigma`` is also SLIC's pre-smoothing in 3D.
        n_segments, compactness, dilation_voxels: 3D SLIC supervoxels (approximate counts per
            scale, compactness on intensities normalised to [0, 1], dilation ball radius).
        area_threshold: fraction of the image the greedy selection covers before stopping.
        min_pixel_diff: segments adding fewer new pixels (voxels) than this are dropped.
    """
    maps, _ = _run_xrai(
        model,
        images,
        target,
        steps,
        batch_size,
        scales,
        sigma,
        min_size,
        dilation_px,
        n_segments,
        compactness,
        dilation_voxels,
        area_threshold,
        min_pixel_diff,
    )
    return maps


def xrai_regions(model: nn.Module, images: torch.Tensor, target=None, **params) -> list[XRAIRegions]:
    """The ranked XRAI regions of each image (for region-based scores such as XRAI-region Dice).

    Same input checks, target rules, parameters and model guard as ``explain(..., "xrai")``;
    returns one :class:`XRAIRegions` per image, whose ``gains`` painted on ``ranks`` equal the
    XRAI map.
    """
    defaults = get_method("xrai").defaults
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for xrai; it takes {sorted(defaults)}")
    validate_images(model, images)
    x = images.detach().to(device=model_device(model), dtype=torch.float32)
    with model_guard(model), torch.enable_grad():
        t = resolve_target(model, x, target)
        _, regions = _run_xrai(model, x, t, **{**defaults, **params})
    return regions
