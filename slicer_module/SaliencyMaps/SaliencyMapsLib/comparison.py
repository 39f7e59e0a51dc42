"""A heatmap against a segment mask, scored with the project's one definition of each metric.

``localization.py`` beside this file is ``monai_sal_app/metrics/localization.py`` copied byte for
byte (numpy only; a test keeps the two identical), so nothing has to be installed into Slicer and
the numbers are those the server (``metrics`` of an infer answer with a label) and ``monai-sal
evaluate`` report for the same map and mask.
"""

from __future__ import annotations

import numpy as np

from SaliencyMapsLib.localization import mask_metrics, roc_curve

__all__ = ["MAX_ROC_POINTS", "compare_map", "roc_points"]

MAX_ROC_POINTS = 256  # points drawn of a ROC curve (a volume's curve has one per distinct map value)


def compare_map(saliency: np.ndarray, mask: np.ndarray, threshold: float | None = None, method: str = "") -> dict:
    """Scores of ``saliency`` against the boolean ``mask`` (same grid): ``localization.mask_metrics``,
    the function behind the server's ``metrics`` (Dice at ``threshold``, the viewer's lower
    threshold in map units, when given; ROC AUC, AUPRC, soft Dice, Dice at the mask's area and at
    the 95th percentile, IoU at percentiles 80..98; for an XRAI map, ``method == "xrai"``, the
    XRAI-region Dice of its regions at 1..50 % of the image)."""
    return mask_metrics(saliency, mask, xrai=method == "xrai", threshold=threshold)


def roc_points(
    saliency: np.ndarray, mask: np.ndarray, max_points: int = MAX_ROC_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of the map's ROC curve against the mask, at most
    ``max_points`` of its points, evenly spaced along it, from (0, 0) to (1, 1), to draw it (ROC AUC
    itself comes from all of them, in :func:`compare_map`)."""
    fpr, tpr, _ = roc_curve(saliency, mask)
    kept = np.unique(np.round(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr)))).astype(int))
    return fpr[kept], tpr[kept]
