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
    "auprc",
    "hard_dice",
    "iou_at_percentiles",
    "localization_metrics",
    "mean_mask_baseline",
    "minmax",
    "partial_auprc",
    "roc_auc",
    "soft_dice",
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


def _as_mask(mask) -> np.ndarray:
    """A boolean array with at least one positive and one negative element."""
    values = np.asarray(mask)
    if values.dtype.kind not in "biuf":
        raise TypeError(f"mask must be a boolean or 0/1 array, got dtype {values.dtype}")
    if values.dtype != np.bool_:
        is_binary = (values == 0) | (values == 1)
        if not is_binary.all():
            found = np.unique(values[~is_binary])[:5]
            raise ValueError(f"mask must be boolean or contain only 0 and 1; found values {found.tolist()}")
        values = values == 1
    n_positive = int(np.count_nonzero(values))
    if n_positive == 0:
        raise ValueError("mask is empty (no positive pixel/voxel): ROC AUC is undefined")
    if n_positive == values.size:
        raise ValueError("mask covers the whole image (no negative pixel/voxel): ROC AUC is undefined")
    return values


def _prepare(saliency, mask) -> tuple[np.ndarray, np.ndarray]:
    """Checked, flattened ``(map, boolean mask)`` of equal length."""
    values = np.asarray(saliency)
    labels = np.asarray(mask)
    if values.shape != labels.shape:
        core = _drop_leading_singletons(values.shape)
        if core != _drop_leading_singletons(labels.shape):
            raise ValueError(f"saliency shape {values.shape} does not match mask shape {labels.shape}")
        values, labels = values.reshape(core), labels.reshape(core)
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


def auprc(saliency, mask) -> float:
    """Area under the precision-recall curve ("localization utility", AUC_loc total), in [0, 1].

    Identical to ``sklearn.metrics.average_precision_score(mask.ravel(), saliency.ravel())``:
    ``sum_i (R_i - R_{i-1}) P_i`` over the distinct map values as thresholds (``map >= t``),
    descending, with ``R_0 = 0``; no interpolation. A constant map gives the prevalence
    ``mask.mean()``.
    """
    return _Ranking(*_prepare(saliency, mask)).pr_area()


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


def hard_dice(saliency, mask, percentile: float | None = None) -> float:
    """Dice between ``mask`` and the binary map ``saliency >= threshold``, in [0, 1].

    ``threshold = np.percentile(saliency, percentile)`` (linear interpolation) when ``percentile``
    (0-100) is given. When ``None``, the threshold keeps the mask's own area fraction: it is the
    k-th largest map value with ``k = mask.sum()``, so the binary map holds the top k
    pixels/voxels *plus every pixel tied with the k-th* (ties at the threshold are included,
    never broken arbitrarily); a constant map therefore selects everything.
    """
    values, labels = _prepare(saliency, mask)
    ranking = _Ranking(values, labels)
    if percentile is None:
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

    Keys, in order: ``roc_auc``, ``auprc``, ``soft_dice``, ``dice_area`` (:func:`hard_dice` at the
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
        "soft_dice": _soft_dice(values, labels),
        "dice_area": _dice(ranking.overlap(_area_threshold(values, ranking.n_pos)), ranking.n_pos),
        "dice_p95": _dice(dice_p95_overlap, ranking.n_pos),
    }
    for p, overlap in zip(percentiles, iou_overlaps):
        metrics[_iou_key(p)] = _iou(overlap, ranking.n_pos)
    return {key: float(value) for key, value in metrics.items()}


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
