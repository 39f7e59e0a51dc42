"""Localization metrics: how well a saliency map points at a ground-truth mask.

The one definition of each metric used by the server, the CLI and the Slicer module alike
(definitions and references: docs/METHODS.md#localization-metrics). numpy only: no torch, no
sklearn at import or call time.

Inputs, for every function that takes ``(saliency, mask)``:

- ``saliency``: a real-valued map, 2D ``(H, W)`` or 3D ``(D, H, W)`` (any unit; only the order of
  values matters to ROC AUC and AUPRC, the min-max range to soft Dice). NaN or +-inf -> ``ValueError``.
  Maps are scored in float64 (a float32 map is converted), so thresholds compare the same way
  whatever numpy's casting rules.
- ``mask``: a boolean or 0/1 array of the same shape (any other value -> ``ValueError``).
- Either may carry leading singleton dims, e.g. a ``(1, H, W)`` map from ``explain`` against an
  ``(H, W)`` mask: leading singleton dims are dropped only when the two shapes then match;
  otherwise ``ValueError`` naming both shapes. Nothing is resampled.
- The mask must hold at least one positive and one negative pixel/voxel: ROC AUC is undefined
  otherwise, and every metric here rejects such a mask the same way so that a batch fails loudly
  rather than mixing defined and undefined scores.

Ranking metrics sort the positive and the negative values once (``O(n log n)``) and read every
count from those two sorted arrays with ``searchsorted``, so a 128^3 volume scores in a fraction
of a second (``scripts/benchmark_metrics.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_REGION_FRACTIONS",
    "auprc",
    "auprc_trapezoid",
    "hard_dice",
    "iou_at_percentiles",
    "localization_metrics",
    "mask_metrics",
    "mean_mask_baseline",
    "minmax",
    "partial_auprc",
    "pointwise_average_precision",
    "pointwise_hit",
    "regions_from_map",
    "roc_auc",
    "roc_curve",
    "soft_dice",
    "top_regions_mask",
    "xrai_region_dice",
]

DEFAULT_PERCENTILES: tuple[float, ...] = (80, 85, 90, 95, 98)


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _drop_leading_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    first_kept = 0
    while first_kept < len(shape) - 1 and shape[first_kept] == 1:
        first_kept += 1
    return tuple(shape[first_kept:])


def _as_map(saliency, name: str = "saliency") -> np.ndarray:
    """A finite float64 array (float64 throughout, so thresholds compare alike on any numpy)."""
    values = np.asarray(saliency)
    if values.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {values.dtype}")
    if values.size == 0:
        raise ValueError(f"{name} is empty (shape {values.shape})")
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        what = "NaN" if np.isnan(values).any() else "infinite values"
        raise ValueError(f"{name} contains {what}")
    return values


def _binary(mask) -> np.ndarray:
    """A boolean array of a boolean or 0/1 mask (which may be empty or full)."""
    values = np.asarray(mask)
    if values.dtype.kind not in "biuf":
        raise TypeError(f"mask must be a boolean or 0/1 array, got dtype {values.dtype}")
    if values.dtype != np.bool_:
        is_binary = (values == 0) | (values == 1)
        if not is_binary.all():
            found = np.unique(values[~is_binary])[:5]
            raise ValueError(f"mask must be boolean or contain only 0 and 1; found values {found.tolist()}")
        values = values == 1
    return values


def _same_grid(values: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``values`` and ``labels`` without leading singleton dims; ValueError when their shapes differ."""
    core = _drop_leading_singletons(values.shape)
    if core != _drop_leading_singletons(labels.shape):
        raise ValueError(f"{what} shape {values.shape} does not match mask shape {labels.shape}")
    return values.reshape(core), labels.reshape(core)


def _as_mask(mask) -> np.ndarray:
    """A boolean array with at least one positive and one negative element."""
    values = _binary(mask)
    n_positive = int(np.count_nonzero(values))
    if n_positive == 0:
        raise ValueError("mask is empty (no positive pixel/voxel): ROC AUC is undefined")
    if n_positive == values.size:
        raise ValueError("mask covers the whole image (no negative pixel/voxel): ROC AUC is undefined")
    return values


def _prepare(saliency, mask) -> tuple[np.ndarray, np.ndarray]:
    """Checked, flattened ``(map, boolean mask)`` of equal length."""
    values, labels = _same_grid(np.asarray(saliency), np.asarray(mask), "saliency")
    return _as_map(values).ravel(), _as_mask(labels).ravel()


def _check_percentile(percentile: float) -> float:
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return percentile


# ----------------------------------------------------------------------------------------------
# ranking metrics
# ----------------------------------------------------------------------------------------------


class _Ranking:
    """Positive and negative values of one map, each sorted once.

    For every distinct value ``v`` taken by a positive (ascending), it holds
    ``count`` (positives equal to v), ``tp`` (positives >= v), ``fp`` (negatives >= v) and
    ``neg_below`` / ``neg_at_or_below`` (negatives < v / <= v): every count that ROC AUC, AUPRC
    and thresholded overlaps need. Thresholds between positive values do not change recall, so
    they add nothing to either area.
    """

    def __init__(self, values: np.ndarray, labels: np.ndarray):
        self.positives = np.sort(values[labels])
        self.negatives = np.sort(values[~labels])
        self.n_pos = self.positives.size
        self.n_neg = self.negatives.size
        is_first = np.empty(self.n_pos, dtype=bool)
        is_first[0] = True
        np.not_equal(self.positives[1:], self.positives[:-1], out=is_first[1:])
        starts = np.flatnonzero(is_first)
        distinct = self.positives[starts]
        self.count = np.diff(np.append(starts, self.n_pos))
        self.tp = self.n_pos - starts
        self.neg_below = np.searchsorted(self.negatives, distinct, side="left")
        self.neg_at_or_below = np.searchsorted(self.negatives, distinct, side="right")
        self.fp = self.n_neg - self.neg_below

    def roc_auc(self) -> float:
        # Mann-Whitney U with average ranks: each (positive, negative) pair scores 1 when the
        # positive is higher, 1/2 when tied. Summed in integers, divided once.
        twice_u = int(np.sum(self.count * (self.neg_below + self.neg_at_or_below)))
        return twice_u / (2 * self.n_pos * self.n_neg)

    def pr_area(self, max_recall: float = 1.0) -> float:
        # Step-wise area sum_i (R_i - R_{i-1}) P_i, each recall clipped at max_recall.
        # Recall is counted in positives: R_i = tp_i / n_pos, R_{i-1} = (tp_i - count_i) / n_pos.
        limit = max_recall * self.n_pos
        recall_step = np.minimum(self.tp, limit) - np.minimum(self.tp - self.count, limit)
        precision = self.tp / (self.tp + self.fp)
        return float(np.sum(recall_step * precision) / self.n_pos)

    def overlap(self, threshold: float) -> tuple[int, int]:
        """``(|B & M|, |B|)`` for the binary map ``B = map >= threshold`` and mask ``M``."""
        true_pos = self.n_pos - int(np.searchsorted(self.positives, threshold, side="left"))
        false_pos = self.n_neg - int(np.searchsorted(self.negatives, threshold, side="left"))
        return true_pos, true_pos + false_pos


def roc_auc(saliency, mask) -> float:
    """Pixel/voxel ROC AUC of ``saliency`` as a score for ``mask``, in [0, 1].

    Identical to ``sklearn.metrics.roc_auc_score(mask.ravel(), saliency.ravel())``: ties count
    one half (average ranks, Mann-Whitney U / (n_pos * n_neg)). A constant map gives 0.5.
    """
    return _Ranking(*_prepare(saliency, mask)).roc_auc()


def roc_curve(saliency, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve of ``saliency`` as a score for ``mask``: ``(fpr, tpr, thresholds)``, float64.

    One point per distinct map value ``t`` (descending) for the binary map ``saliency >= t``,
    preceded by (0, 0) at threshold +inf; the same points as
    ``sklearn.metrics.roc_curve(mask.ravel(), saliency.ravel(), drop_intermediate=False)``.
    The trapezoid area under it equals :func:`roc_auc`.
    """
    values, labels = _prepare(saliency, mask)
    thresholds, tps, fps = _counts_per_threshold(values, labels)
    fpr = np.r_[0.0, fps / (labels.size - np.count_nonzero(labels))]
    tpr = np.r_[0.0, tps / np.count_nonzero(labels)]
    return fpr, tpr, np.r_[np.inf, thresholds]


def auprc(saliency, mask) -> float:
    """Area under the precision-recall curve ("localization utility", AUC_loc total), in [0, 1].

    Identical to ``sklearn.metrics.average_precision_score(mask.ravel(), saliency.ravel())``:
    ``sum_i (R_i - R_{i-1}) P_i`` over the distinct map values as thresholds (``map >= t``),
    descending, with ``R_0 = 0``; no interpolation. A constant map gives the prevalence
    ``mask.mean()``.
    """
    return _Ranking(*_prepare(saliency, mask)).pr_area()


def _counts_per_threshold(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, tps, fps): every distinct map value, descending, with the positives and
    negatives at or above it; sorts the whole map once."""
    order = np.argsort(-values, kind="stable")
    ranked, hits = values[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]  # each threshold's last index
    tps = np.cumsum(hits)[last_of_value]
    return ranked[last_of_value], tps, last_of_value + 1 - tps


def _trapezoid_pr_area(values: np.ndarray, labels: np.ndarray) -> float:
    """The trapezoid area under the precision-recall points of every distinct map value (see
    :func:`auprc_trapezoid`)."""
    _, tps, fps = _counts_per_threshold(values, labels)
    full = int(np.searchsorted(tps, tps[-1]))  # the curve stops where recall first reaches 1
    precision = np.r_[(tps / (tps + fps))[full::-1], 1.0]
    recall = np.r_[(tps / tps[-1])[full::-1], 0.0]
    return float(-np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def auprc_trapezoid(saliency, mask) -> float:
    """Area under the precision-recall curve by the trapezoid rule, in [0, 1]: the trust study's
    variant of :func:`auprc` (its published code).

    Identical to ``sklearn.metrics.auc(recall, precision)`` of
    ``sklearn.metrics.precision_recall_curve(mask.ravel(), saliency.ravel())``: one point per
    distinct map value as threshold (``map >= t``) down to the first that reaches recall 1, plus
    (recall 0, precision 1), joined by straight lines. Linear interpolation between points
    overstates precision, so it is above the step-wise :func:`auprc` on most maps; report which one
    a number is.
    """
    return _trapezoid_pr_area(*_prepare(saliency, mask))


def partial_auprc(saliency, mask, max_recall: float = 0.5) -> float:
    """Partial localization AUC: the :func:`auprc` sum over recall in ``[0, max_recall]``.

    Exactly ``sum_i (min(R_i, r) - min(R_{i-1}, r)) P_i`` with ``r = max_recall`` and the terms of
    :func:`auprc`: the area under the step-wise precision-recall curve (precision ``P_i`` on the
    recall interval ``(R_{i-1}, R_i]``) from recall 0 to ``r``; the step that crosses ``r`` counts
    up to ``r``. Not normalised: the value lies in ``[0, max_recall]`` (a perfect map scores
    ``max_recall``; divide by ``max_recall`` for a 0-1 scale). Non-decreasing in ``max_recall``
    and equal to :func:`auprc` at ``max_recall=1``.
    """
    if not 0 < max_recall <= 1:
        raise ValueError(f"max_recall must be in (0, 1], got {max_recall}")
    return _Ranking(*_prepare(saliency, mask)).pr_area(max_recall)


# ----------------------------------------------------------------------------------------------
# overlap metrics
# ----------------------------------------------------------------------------------------------


def minmax(saliency) -> np.ndarray:
    """``(s - min) / (max - min)`` as float64 of the same shape, in [0, 1]; zeros for a constant map."""
    values = _as_map(saliency)
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) / (high - low)


def _soft_dice(values: np.ndarray, labels: np.ndarray) -> float:
    scaled = minmax(values)
    return float(2.0 * scaled[labels].sum() / (scaled.sum() + np.count_nonzero(labels)))


def soft_dice(saliency, mask) -> float:
    """Soft Dice ``2 sum(s m) / (sum(s) + sum(m))`` with ``s`` the :func:`minmax` map, in [0, 1]."""
    return _soft_dice(*_prepare(saliency, mask))


def _area_threshold(values: np.ndarray, n_pos: int) -> float:
    # The k-th largest value, k = mask area: ``map >= it`` keeps the top k plus any ties.
    return float(np.partition(values, values.size - n_pos)[values.size - n_pos])


def _dice(overlap: tuple[int, int], n_pos: int) -> float:
    intersection, selected = overlap
    return 2.0 * intersection / (selected + n_pos)


def _iou(overlap: tuple[int, int], n_pos: int) -> float:
    intersection, selected = overlap
    return intersection / (selected + n_pos - intersection)


def hard_dice(saliency, mask, percentile: float | None = None, *, threshold: float | None = None) -> float:
    """Dice between ``mask`` and the binary map ``saliency >= threshold``, in [0, 1].

    ``threshold``: a map value (the map's own unit), e.g. the lower threshold a viewer shows the
    map at. Otherwise ``threshold = np.percentile(saliency, percentile)`` (linear interpolation)
    when ``percentile`` (0-100) is given. When both are ``None``, the threshold keeps the mask's
    own area fraction: it is the k-th largest map value with ``k = mask.sum()``, so the binary map
    holds the top k pixels/voxels *plus every pixel tied with the k-th* (ties at the threshold are
    included, never broken arbitrarily); a constant map therefore selects everything.
    """
    if percentile is not None and threshold is not None:
        raise ValueError("give a percentile or a threshold, not both")
    values, labels = _prepare(saliency, mask)
    ranking = _Ranking(values, labels)
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        threshold = float(threshold)
    elif percentile is None:
        threshold = _area_threshold(values, ranking.n_pos)
    else:
        threshold = float(np.percentile(values, _check_percentile(percentile)))
    return _dice(ranking.overlap(threshold), ranking.n_pos)


def _iou_key(percentile: float) -> str:
    return f"iou_p{percentile:g}"


def _percentile_overlaps(values: np.ndarray, ranking: _Ranking, percentiles: Sequence[float]) -> list[tuple[int, int]]:
    thresholds = np.percentile(values, [_check_percentile(p) for p in percentiles])
    return [ranking.overlap(float(threshold)) for threshold in thresholds]


def iou_at_percentiles(saliency, mask, percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """IoU between ``mask`` and ``saliency >= np.percentile(saliency, p)`` for each ``p`` (0-100).

    Returns ``{"iou_p80": ..., "iou_p85": ..., ...}`` in the order of ``percentiles``; the key
    formats ``p`` with ``:g`` (97.5 -> ``"iou_p97.5"``).
    """
    percentiles = list(percentiles)
    if not percentiles:
        raise ValueError("percentiles is empty")
    values, labels = _prepare(saliency, mask)
    ranking = _Ranking(values, labels)
    overlaps = _percentile_overlaps(values, ranking, percentiles)
    return {_iou_key(p): _iou(overlap, ranking.n_pos) for p, overlap in zip(percentiles, overlaps)}


def localization_metrics(saliency, mask, percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """Every per-image localization metric in one flat, ordered dict of Python floats.

    Keys, in order: ``roc_auc``, ``auprc``, ``auprc_trapezoid``, ``soft_dice``, ``dice_area`` (:func:`hard_dice` at the
    mask's area fraction), ``dice_p95`` (:func:`hard_dice` at the 95th percentile), then
    ``iou_pXX`` for each of ``percentiles`` (:func:`iou_at_percentiles`). JSON-serialisable as is;
    the map is checked and sorted once. This is what the server returns and the CLI writes per image.
    """
    percentiles = list(percentiles)
    values, labels = _prepare(saliency, mask)
    ranking = _Ranking(values, labels)
    dice_p95_overlap, *iou_overlaps = _percentile_overlaps(values, ranking, [95, *percentiles])
    metrics = {
        "roc_auc": ranking.roc_auc(),
        "auprc": ranking.pr_area(),
        "auprc_trapezoid": _trapezoid_pr_area(values, labels),
        "soft_dice": _soft_dice(values, labels),
        "dice_area": _dice(ranking.overlap(_area_threshold(values, ranking.n_pos)), ranking.n_pos),
        "dice_p95": _dice(dice_p95_overlap, ranking.n_pos),
    }
    for p, overlap in zip(percentiles, iou_overlaps):
        metrics[_iou_key(p)] = _iou(overlap, ranking.n_pos)
    return {key: float(value) for key, value in metrics.items()}


# ----------------------------------------------------------------------------------------------
# pointwise localization
# ----------------------------------------------------------------------------------------------


def pointwise_hit(saliency, mask, tolerance: float = 0.0) -> bool:
    """Pointwise localization of one map: does its maximum lie in the mask?

    The map's maximum (the first one in C order when several pixels share it) is a hit when it
    lies inside the mask, or within ``tolerance`` pixels/voxels (Euclidean, on the array grid) of
    its nearest mask pixel/voxel. The mask (or the box mask of bounding boxes) may be empty, for
    a negative image: then nothing is hit.
    """
    values, labels = _same_grid(_as_map(saliency), _binary(mask), "saliency")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    if labels[peak]:
        return True
    if tolerance == 0 or not labels.any():
        return False
    distances = np.linalg.norm(np.argwhere(labels) - np.asarray(peak), axis=1)
    return bool(distances.min() <= tolerance)


def pointwise_average_precision(scores, hits, labels) -> float:
    """Average precision of pointwise localization over images (as Oquab et al. and WILDCAT report it).

    Images are ranked by the classifier's score for the class (descending); an image is a true
    positive when it contains the class (``labels`` 1) and its map's maximum hits the evidence
    (``hits``, see :func:`pointwise_hit`), a false positive otherwise. AP = sum over the true
    positives' ranks k of precision@k, divided by the number of images that contain the class (so
    a missed localization costs recall). ``scores``, ``hits``, ``labels``: (N,) each; ties in score
    keep the given order. Needs at least one image with the class.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    hits = np.asarray(hits, dtype=bool).ravel()
    labels = np.asarray(labels).ravel()
    if not (scores.size == hits.size == labels.size) or scores.size == 0:
        raise ValueError(
            f"scores, hits and labels need the same length > 0, got {scores.size}, {hits.size}, {labels.size}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (does the image contain the class)")
    n_with_class = int(labels.sum())
    if n_with_class == 0:
        raise ValueError("no image contains the class: average precision is undefined")
    order = np.argsort(-scores, kind="stable")
    true_positive = (labels.astype(bool) & hits)[order]
    precision_at_k = np.cumsum(true_positive) / np.arange(1, scores.size + 1)
    return float(precision_at_k[true_positive].sum() / n_with_class)


# ----------------------------------------------------------------------------------------------
# XRAI regions
# ----------------------------------------------------------------------------------------------

DEFAULT_REGION_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def _region_ranks(ranks) -> np.ndarray:
    values = np.asarray(ranks)
    if values.dtype.kind not in "iu" or values.size == 0 or values.min() < 1:
        raise ValueError("regions must be a non-empty integer label array of ranks 1, 2, ... (1 = most important)")
    return values


def regions_from_map(region_map) -> np.ndarray:
    """The region ranks of a map that is constant on each region, such as an XRAI map (each
    region painted with its gain): an integer array of the map's shape, 1 on the highest value, 2 on
    the next, ... (regions that share a value share a rank). For an XRAI map these are its regions in
    the order XRAI ranks them (by gain), except that XRAI ranks the uncovered remainder last
    whatever its value. Input of :func:`top_regions_mask` and :func:`xrai_region_dice`."""
    values = _as_map(region_map, "region map")
    _, inverse = np.unique(-values, return_inverse=True)
    return inverse.reshape(values.shape).astype(np.int64) + 1


def top_regions_mask(ranks, fraction: float) -> np.ndarray:
    """Union of the fewest top-ranked regions that together cover at least ``fraction`` of the image.

    ``ranks``: integer array, pixel value k (1-based) = the pixel belongs to the k-th most
    important region (the label array ``saliency.xrai`` produces: disjoint regions covering the
    image). ``fraction`` in [0, 1]: 0 gives an empty mask, 1 the whole image.
    """
    values = _region_ranks(ranks)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0:
        return np.zeros(values.shape, dtype=bool)
    cumulative_area = np.cumsum(np.bincount(values.ravel())[1:]) / values.size
    count = int(np.searchsorted(cumulative_area, fraction - 1e-12) + 1)
    return values <= count


def xrai_region_dice(ranks, mask, fractions: Iterable[float] = DEFAULT_REGION_FRACTIONS) -> dict[str, float]:
    """Dice between the mask and the top XRAI regions covering p of the image, for each p of
    ``fractions`` (keys ``xrai_dice_p<percent>``, e.g. ``xrai_dice_p5``) and at p = the mask's own
    area fraction (``xrai_dice_area``). ``ranks``: the region label array (:func:`top_regions_mask`).
    """
    values, labels = _same_grid(_region_ranks(ranks), _binary(mask), "regions")
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0:
        raise ValueError("mask has no foreground: Dice against it is undefined")

    def dice(fraction: float) -> float:
        selected = top_regions_mask(values, fraction)
        return 2.0 * np.count_nonzero(selected & labels) / (np.count_nonzero(selected) + n_pos)

    result = {f"xrai_dice_p{100 * f:g}": dice(float(f)) for f in fractions}
    result["xrai_dice_area"] = dice(n_pos / labels.size)
    return result


def mask_metrics(saliency, mask, *, xrai: bool = False, threshold: float | None = None) -> dict[str, float]:
    """What the server, the CLI's users and the Slicer module report for one map against one mask:
    ``dice_threshold`` (:func:`hard_dice` at ``threshold``, a map value, when given), then
    :func:`localization_metrics`, then for an XRAI map (``xrai``) :func:`xrai_region_dice` of its
    regions (:func:`regions_from_map`)."""
    scores = {}
    if threshold is not None:
        scores["dice_threshold"] = hard_dice(saliency, mask, threshold=threshold)
    scores.update(localization_metrics(saliency, mask))
    if xrai:
        scores.update(xrai_region_dice(regions_from_map(saliency), mask))
    return scores


# ----------------------------------------------------------------------------------------------
# baseline
# ----------------------------------------------------------------------------------------------


def mean_mask_baseline(masks) -> np.ndarray:
    """The mean training mask as a saliency map: the baseline every method must beat.

    ``masks``: an ``(N, *spatial)`` array or a non-empty sequence of equally shaped boolean/0-1
    masks. Returns the float64 ``(*spatial)`` voxel-wise fraction of masks that cover each
    pixel/voxel, in [0, 1]; score it with the same functions as any map (e.g.
    ``roc_auc(mean_mask_baseline(train_masks), test_mask)``). Individual training masks may be
    empty (negative images); only non-binary values are rejected.
    """
    stacked = [np.asarray(m) for m in masks]
    if not stacked:
        raise ValueError("masks is empty: need at least one mask")
    shapes = {m.shape for m in stacked}
    if len(shapes) > 1:
        raise ValueError(f"masks must all have the same shape, got {sorted(shapes)}")
    total = np.zeros(stacked[0].shape, dtype=np.float64)
    for index, m in enumerate(stacked):
        if m.dtype.kind not in "biuf":
            raise TypeError(f"mask {index} must be a boolean or 0/1 array, got dtype {m.dtype}")
        if m.dtype != np.bool_ and not ((m == 0) | (m == 1)).all():
            raise ValueError(f"mask {index} must be boolean or contain only 0 and 1")
        total += m
    return total / len(stacked)
