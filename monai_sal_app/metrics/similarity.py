"""Map similarity: how alike two saliency maps of the same image are (definitions and references:
docs/METHODS.md#map-similarity).

Used by the trust checks (``evaluation``) to compare a map with the map of a randomized,
retrained or other model. Every function compares two batches of maps image by image:

- ``a``, ``b``: arrays of the same shape ``(N, H, W)`` or ``(N, D, H, W)`` (a channel axis of 1,
  ``(N, 1, *spatial)`` as ``explain`` returns, is dropped), any real unit; NaN or +-inf ->
  ``ValueError``. Returns float64 ``(N,)``.
- A constant map has no ranking and no structure: the correlations and SSIM of a pair in which
  either map is constant are reported as 0 (never NaN); :func:`constant_maps` flags those maps so
  that a caller can say so.

numpy and scipy. No torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import uniform_filter

from monai_sal_app.arguments import check_integer
from monai_sal_app.metrics.stats import mean_ci

__all__ = [
    "DISPLAYS",
    "SIMILARITY_METRICS",
    "RetentionReference",
    "SSIMReference",
    "constant_maps",
    "hog_features",
    "hog_spearman",
    "map_hog_features",
    "pearson",
    "random_pair_baseline",
    "ranks",
    "retention_share",
    "similarity",
    "spearman",
    "spearman_abs",
    "ssim",
]


def _batch(maps, name: str = "maps") -> np.ndarray:
    """``maps`` as float64 (N, *spatial) with 2 or 3 spatial dims; ValueError otherwise."""
    array = np.asarray(maps, dtype=np.float64)
    if array.ndim in (4, 5) and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim not in (3, 4) or array.shape[0] == 0:
        raise ValueError(f"{name} must be a batch (N, H, W) or (N, D, H, W) with N >= 1, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _batch(a, "a"), _batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"maps to compare must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def constant_maps(maps) -> np.ndarray:
    """Boolean (N,): True where a map of the batch (N, *spatial) has a single value everywhere."""
    flat = _batch(maps).reshape(len(maps), -1)
    return flat.max(axis=1) == flat.min(axis=1)


def _correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of (N, P) arrays; 0 for a row where either side is constant."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    numerator = (x * y).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denominator > 0, numerator / denominator, 0.0)
    return np.clip(r, -1.0, 1.0)


def ranks(x: np.ndarray) -> np.ndarray:
    """Row-wise ranks (1..P) of (N, P) values, ties averaged: equal to ``scipy.stats.rankdata(x,
    axis=1)``; Spearman = Pearson of these. One sort per row, each run of equal values given the
    mean of its positions (a few times faster than rankdata on the 10^5-10^6 voxels of a 3D map)."""
    x = np.asarray(x)
    order = np.argsort(x, axis=1)
    ordered = np.take_along_axis(x, order, axis=1)
    n = x.shape[1]
    out = np.empty(x.shape, dtype=np.float64)
    starts = np.empty(n, dtype=bool)
    for row in range(x.shape[0]):
        starts[0] = True
        np.not_equal(ordered[row, 1:], ordered[row, :-1], out=starts[1:])
        first = np.flatnonzero(starts)
        counts = np.diff(np.append(first, n))
        out[row, order[row]] = np.repeat(first + (counts + 1) / 2, counts)
    return out


def pearson(a, b) -> np.ndarray:
    """Pearson correlation of the two maps' values, per image (N,), in [-1, 1]."""
    a, b = _pair(a, b)
    return _correlation(a.reshape(len(a), -1), b.reshape(len(b), -1))


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation of the signed maps, per image (N,), in [-1, 1] (ties get average ranks)."""
    a, b = _pair(a, b)
    return _correlation(ranks(a.reshape(len(a), -1)), ranks(b.reshape(len(b), -1)))


def spearman_abs(a, b) -> np.ndarray:
    """Spearman rank correlation of |map| (the ranking of importance regardless of sign), per image (N,)."""
    a, b = _pair(a, b)
    return spearman(np.abs(a), np.abs(b))


def _minmax(maps: np.ndarray) -> np.ndarray:
    """Each map of (N, *spatial) scaled to [0, 1]; a constant map becomes zeros."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1)
    span = flat.max(axis=1) - low
    scaled = (flat - low[:, None]) / np.where(span > 0, span, 1.0)[:, None]
    return scaled.reshape(maps.shape)


def ssim(a, b, win_size: int = 7) -> np.ndarray:
    """Structural similarity of the min-max maps (data range 1), per image (N,), 2D or 3D.

    The same computation as ``skimage.metrics.structural_similarity(x, y, data_range=1)`` with its
    defaults (a ``win_size``-wide uniform window, K1 = 0.01, K2 = 0.03, sample covariance, the mean
    over the image without a border of ``(win_size - 1) // 2``), for the whole batch at once.
    A pair with a constant map scores 0. Every spatial side must be at least ``win_size``.
    """
    a, b = _pair(a, b)
    return SSIMReference(a, win_size).compare(b)


class SSIMReference:
    """Maps ``a`` (N, *spatial) ready to be compared by SSIM with other maps of the same images,
    their own window statistics computed once (:func:`ssim` is ``SSIMReference(a).compare(b)``)."""

    def __init__(self, maps, win_size: int = 7) -> None:
        maps = _batch(maps, "a")
        spatial = maps.shape[1:]
        if win_size < 3 or win_size % 2 == 0:
            raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
        if min(spatial) < win_size:
            raise ValueError(f"SSIM needs maps of at least {win_size} pixels per side, got {spatial}")
        self.shape, self.win_size = maps.shape, win_size
        pad = (win_size - 1) // 2
        # the windows that lie inside the image: the only ones SSIM averages
        self.inner = (slice(None),) + tuple(slice(pad, side - pad) for side in spatial)
        n_window = win_size ** len(spatial)
        self.covariance_norm = n_window / (n_window - 1)
        self.x = _minmax(maps)
        self.ux, self.vx = self._moments(self.x)
        self.constant = constant_maps(maps)

    def _mean(self, z: np.ndarray) -> np.ndarray:
        """Mean over each window of ``z``, at the inner windows."""
        return uniform_filter(z, size=(1,) + (self.win_size,) * (z.ndim - 1))[self.inner]

    def _moments(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = self._mean(z)
        return mean, self.covariance_norm * (self._mean(z * z) - mean * mean)

    def compare(self, maps) -> np.ndarray:
        """SSIM (N,) of each reference map with the map of the same image in ``maps``."""
        maps = _batch(maps, "b")
        if maps.shape != self.shape:
            raise ValueError(f"maps to compare must have the same shape, got {self.shape} and {maps.shape}")
        y = _minmax(maps)
        uy, vy = self._moments(y)
        vxy = self.covariance_norm * (self._mean(self.x * y) - self.ux * uy)
        c1, c2 = 0.01**2, 0.03**2
        s = ((2 * self.ux * uy + c1) * (2 * vxy + c2)) / ((self.ux * self.ux + uy * uy + c1) * (self.vx + vy + c2))
        values = s.reshape(len(s), -1).mean(axis=1)
        return np.where(self.constant | constant_maps(maps), 0.0, values)


_HOG_CHUNK_PIXELS = 2**22  # pixels described at once by hog_spearman (a few hundred MB of temporaries)


def hog_features(images, orientations: int = 9, pixels_per_cell: int = 8, cells_per_block: int = 2) -> np.ndarray:
    """Histograms of oriented gradients of a stack of 2D images (M, H, W) at once: (M, F) float64.

    The features ``skimage.feature.hog(image, orientations, (pixels_per_cell,) * 2,
    (cells_per_block,) * 2, block_norm="L2-Hys", feature_vector=True)`` gives for each image, in its
    order: central-difference gradients (0 on the border rows and columns), each pixel's magnitude
    added to the bin of its unsigned orientation (degrees in [0, 180), ``orientations`` equal bins)
    in its cell of ``pixels_per_cell`` squared pixels (whole cells from the top left; a remainder is
    left out), the sums divided by the cell's pixel count, then every ``cells_per_block`` squared
    block of cells L2-Hys normalised (eps 1e-5, clipped at 0.2). The cell sums are formed as
    scikit-image forms them (same order, same single precision), so the histograms equal its own;
    one pass over the whole stack instead of one call per image.
    """
    images = np.asarray(images, dtype=np.float64)
    count, height, width = images.shape
    cell, block = pixels_per_cell, cells_per_block
    cells_down, cells_across = height // cell, width // cell
    inside = (slice(None), slice(0, cells_down * cell), slice(0, cells_across * cell))
    gradient_rows = np.empty_like(images)
    gradient_rows[:, [0, -1], :] = 0.0
    np.subtract(images[:, 2:, :], images[:, :-2, :], out=gradient_rows[:, 1:-1, :])
    gradient_columns = np.empty_like(images)
    gradient_columns[:, :, [0, -1]] = 0.0
    np.subtract(images[:, :, 2:], images[:, :, :-2], out=gradient_columns[:, :, 1:-1])
    gradient_rows, gradient_columns = gradient_rows[inside], gradient_columns[inside]
    magnitude = np.hypot(gradient_columns, gradient_rows)
    orientation = np.arctan2(gradient_rows, gradient_columns) * (180 / np.pi) % 180
    # As scikit-image bins and sums: bin k holds [k, k + 1) * (180 / orientations) with the edges in
    # single precision (an orientation at 180 after rounding is in none: the extra bin, dropped);
    # each cell's sum in single precision, its pixels added row by row.
    edges = (np.float32(180.0 / orientations) * np.arange(orientations + 1, dtype=np.float32)).astype(np.float64)
    bins = np.searchsorted(edges, orientation, side="right") - 1
    bins[bins < 0] = orientations
    # (M, cells down, cell row, cells across, cell column): pixel (r, c) of cell (i, j) at [:, i, r, j, c]
    by_cell = (count, cells_down, cell, cells_across, cell)
    magnitude, bins = magnitude.reshape(by_cell), bins.reshape(by_cell)
    totals = np.zeros(count * cells_down * cells_across * (orientations + 1), dtype=np.float32)
    cell_starts = np.arange(count * cells_down * cells_across) * (orientations + 1)
    for row in range(cell):
        for column in range(cell):
            index = cell_starts + bins[:, :, row, :, column].ravel()
            totals[index] = totals[index] + magnitude[:, :, row, :, column].ravel()
    totals = totals.reshape(count, cells_down, cells_across, orientations + 1)[..., :orientations]
    histograms = (totals / np.float32(cell * cell)).astype(np.float64)
    blocks = np.lib.stride_tricks.sliding_window_view(histograms, (block, block), axis=(1, 2))
    blocks = blocks.transpose(0, 1, 2, 4, 5, 3).reshape(count, cells_down - block + 1, cells_across - block + 1, -1)
    eps = 1e-5
    normalised = blocks / np.sqrt((blocks**2).sum(axis=-1, keepdims=True) + eps**2)
    normalised = np.minimum(normalised, 0.2)
    normalised = normalised / np.sqrt((normalised**2).sum(axis=-1, keepdims=True) + eps**2)
    return normalised.reshape(count, -1)


def map_hog_features(maps, orientations: int = 9, pixels_per_cell: int = 8, cells_per_block: int = 2) -> np.ndarray:
    """HOG features of each min-max map of a batch (N, H, W) or (N, D, H, W): (N, F) float64.

    HOG is a 2D descriptor: a 3D map is described slice by slice along its first axis (D), the
    slices' :func:`hog_features` concatenated. A constant map's features are all 0. Every (slice)
    side must hold at least ``cells_per_block`` cells of ``pixels_per_cell`` pixels.
    """
    maps = _batch(maps)
    height, width = maps.shape[-2:]
    if min(height, width) < pixels_per_cell * cells_per_block:
        raise ValueError(
            f"HOG with {cells_per_block} cells of {pixels_per_cell} px per block needs maps (slices) of at least "
            f"{pixels_per_cell * cells_per_block} px per side, got {height} x {width}"
        )
    slices = _minmax(maps).reshape(-1, height, width)  # (N * D, H, W) in 3D
    step = max(1, _HOG_CHUNK_PIXELS // (height * width))  # a bounded stack at a time
    described = [
        hog_features(slices[start : start + step], orientations, pixels_per_cell, cells_per_block)
        for start in range(0, len(slices), step)
    ]
    return np.concatenate(described).reshape(len(maps), -1)


def hog_spearman(a, b, orientations: int = 9, pixels_per_cell: int = 8, cells_per_block: int = 2) -> np.ndarray:
    """Spearman rank correlation of the HOG features of the min-max maps (:func:`map_hog_features`,
    scikit-image's ``hog`` with L2-Hys block normalisation), per image (N,).

    HOG compares the maps' local edge structure rather than their values; a 3D map is described
    slice by slice along its first axis. A pair with a constant map scores 0.
    """
    a, b = _pair(a, b)
    settings = (orientations, pixels_per_cell, cells_per_block)
    values = _correlation(ranks(map_hog_features(a, *settings)), ranks(map_hog_features(b, *settings)))
    return np.where(constant_maps(a) | constant_maps(b), 0.0, values)


SIMILARITY_METRICS: dict[str, Callable[..., np.ndarray]] = {
    "spearman_abs": spearman_abs,
    "spearman": spearman,
    "ssim": ssim,
    "hog_spearman": hog_spearman,
    "pearson": pearson,
}


def similarity(a, b, metric: str = "spearman_abs") -> np.ndarray:
    """``metric`` (a name of :data:`SIMILARITY_METRICS`) of each pair of maps, (N,)."""
    if metric not in SIMILARITY_METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}; choose from {', '.join(SIMILARITY_METRICS)}")
    return SIMILARITY_METRICS[metric](a, b)


def random_pair_baseline(maps, metric: str = "spearman_abs", n_pairs: int = 50, seed: int = 0, groups=None) -> dict:
    """The similarity two maps have by chance: ``metric`` between the maps of random pairs of
    different images of one batch (N, *spatial), N >= 2.

    ``n_pairs`` ordered pairs (i, j), i != j, are drawn uniformly with replacement from a generator
    seeded with ``seed``. With ``groups`` (N,) (e.g. the class each map explains), both images of a
    pair come from the same group: i uniformly among the images that have a partner in their
    group, j uniformly among i's partners. Returns ``{"metric", "mean", "ci_low", "ci_high",
    "n_pairs", "values"}`` with the Student-t 95% CI of the mean (``metrics.stats.mean_ci``).
    """
    maps = _batch(maps)
    if len(maps) < 2:
        raise ValueError(f"a random-pair baseline needs maps of at least 2 images, got {len(maps)}")
    check_integer(n_pairs, "n_pairs", 2)
    rng = np.random.default_rng(seed)
    if groups is None:
        first = rng.integers(0, len(maps), size=n_pairs)
        second = (first + rng.integers(1, len(maps), size=n_pairs)) % len(maps)  # never the same image
    else:
        partners = _peers(_groups(groups, len(maps)))
        has_partner = np.flatnonzero(partners.any(axis=1))
        if has_partner.size == 0:
            raise ValueError("no group holds two images: no pair to draw")
        first = has_partner[rng.integers(0, has_partner.size, size=n_pairs)]
        counts = partners.sum(axis=1)[first]
        picks = (rng.random(n_pairs) * counts).astype(np.int64)
        second = np.array([np.flatnonzero(partners[i])[k] for i, k in zip(first, picks)])
    # Every metric here is symmetric, so each distinct pair is scored once (with few images most
    # draws repeat a pair) and its value repeated for every draw of it, in either order.
    drawn = np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1)
    pairs, inverse = np.unique(drawn, axis=0, return_inverse=True)
    values = similarity(maps[pairs[:, 0]], maps[pairs[:, 1]], metric)[inverse.ravel()]
    mean, low, high = mean_ci(values)
    return {"metric": metric, "mean": mean, "ci_low": low, "ci_high": high, "n_pairs": int(n_pairs), "values": values}


# ----------------------------------------------------------------------------- retention share

DISPLAYS = ("abs", "signed")  # how a viewer shows a map: its magnitude, or its signed values


def _groups(classes, n: int) -> np.ndarray:
    groups = np.asarray(classes).reshape(-1)
    if groups.size != n:
        raise ValueError(f"{groups.size} classes for {n} maps")
    return groups


def _peers(groups: np.ndarray) -> np.ndarray:
    """(N, N) bool: [i, j] True when j != i explains the same class as i."""
    return (groups[:, None] == groups[None, :]) & ~np.eye(groups.size, dtype=bool)


def _unit_ranks(maps: np.ndarray, display: str) -> np.ndarray:
    """(N, P) ranks of each map as displayed (|map| for "abs"), centred and scaled to unit norm, so
    that the dot product of two rows is their Spearman correlation; a constant map's row is 0."""
    flat = maps.reshape(len(maps), -1)
    centred = ranks(np.abs(flat) if display == "abs" else flat)
    centred -= centred.mean(axis=1, keepdims=True)
    norm = np.sqrt((centred * centred).sum(axis=1, keepdims=True))
    return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)


def _masked_row_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of each row of ``values`` (N, N) over the columns where ``mask`` is True; NaN for none."""
    counts = mask.sum(axis=1)
    totals = np.where(mask, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


class RetentionReference:
    """Reference maps (a trained model's, N images) ready to measure how much of their
    image-specific part other maps of the same images keep (:meth:`shares`).

    For image i, with s the Spearman correlation of maps as displayed (``display``: "abs" ranks
    |map|, "signed" the map) and j running over the other images explained for the same class
    (``classes`` (N,)): the retention share of changed maps C against reference maps R is

        (s(R_i, C_i) - mean_j s(R_i, C_j)) / (1 - mean_j s(R_i, R_j))

    The numerator is how much closer R_i is to its own changed map than to the changed maps of
    other images of its class (what the change left that belongs to image i); the denominator is
    the part of R_i not shared with the other images' reference maps (1 minus the class template).
    1 when nothing changed (C = R); about 0 when C keeps nothing image-specific, even when C keeps a
    template common to all images; negative values are noise around 0. Unitless.

    A blank (constant) map has no ranking: an image whose reference or changed map is blank, or
    that has no other image of its class with a map that is not blank, gets NaN, never a score.
    """

    def __init__(self, reference, classes, display: str = "abs") -> None:
        if display not in DISPLAYS:
            raise ValueError(f"display must be one of {DISPLAYS}, got {display!r}")
        maps = _batch(reference, "reference")
        self.display = display
        self.shape = maps.shape
        self.classes = _groups(classes, len(maps))
        self.blank = constant_maps(maps)
        self.keys = _unit_ranks(maps, display)
        self.peers = _peers(self.classes) & ~self.blank[None, :]
        #: (N,) mean similarity of each reference map to the other reference maps of its class
        self.template = _masked_row_mean(self.keys @ self.keys.T, self.peers)

    def similarity(self, changed) -> tuple[np.ndarray, np.ndarray]:
        """``(cross, blank)``: (N, N) Spearman correlations, ``cross[i, j]`` between reference map i
        and changed map j as displayed, and (N,) whether each changed map is blank."""
        maps = _batch(changed, "changed")
        if maps.shape != self.shape:
            raise ValueError(f"changed maps must have the reference's shape {self.shape}, got {maps.shape}")
        return self.keys @ _unit_ranks(maps, self.display).T, constant_maps(maps)

    def shares(self, changed) -> tuple[np.ndarray, np.ndarray]:
        """``(share, blank)``: (N,) retention share per image (NaN where it cannot be scored) and
        (N,) whether each changed map is blank."""
        cross, blank = self.similarity(changed)
        return self.shares_from(cross, blank), blank

    def shares_from(self, cross: np.ndarray, blank: np.ndarray) -> np.ndarray:
        """(N,) retention shares from :meth:`similarity`'s ``(cross, blank)``."""
        null = _masked_row_mean(cross, self.peers & ~blank[None, :])
        specific = 1.0 - self.template
        scorable = ~self.blank & ~blank & np.isfinite(null) & (specific > 1e-9)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(scorable, (np.diagonal(cross) - null) / np.where(scorable, specific, 1.0), np.nan)


def retention_share(reference, changed, classes, display: str = "abs") -> np.ndarray:
    """(N,) share of each reference map's image-specific part that the changed map of the same
    image keeps (:class:`RetentionReference`); NaN where it cannot be scored."""
    return RetentionReference(reference, classes, display).shares(changed)[0]
