"""A heatmap against a segment mask, scored with the project's own metric functions.

``monai_sal_app.metrics`` (numpy only) is imported, not copied: the numbers are the ones the server
(``metrics`` of an infer answer with a label) and ``monai-sal evaluate`` report for the same map
and mask. In 3D Slicer it is installed once into Slicer's Python (see the README).
"""

from __future__ import annotations

import numpy as np

__all__ = ["compare_map", "metrics_available", "roc_points"]


def metrics_available() -> str | None:
    """None when ``monai_sal_app.metrics`` can be imported, else what to do about it."""
    try:
        import monai_sal_app.metrics  # noqa: F401
    except ImportError as error:
        return (
            f"the metrics need the monai-sal package in Slicer's Python ({error}): run "
            "slicer.util.pip_install('monai-sal --no-deps') in the Python console"
        )
    return None


def compare_map(saliency: np.ndarray, mask: np.ndarray, threshold: float | None = None, method: str = "") -> dict:
    """Scores of ``saliency`` against the boolean ``mask`` (same grid): ``metrics.mask_metrics``,
    the function behind the server's ``metrics`` (Dice at ``threshold``, the viewer's lower
    threshold, when given; ROC AUC, AUPRC, soft Dice, Dice at the mask's area and at the 95th
    percentile, IoU at percentiles 80..98; for an XRAI map, ``method == "xrai"``, the XRAI-region
    Dice of its regions at 1..50 % of the image)."""
    from monai_sal_app.metrics import mask_metrics

    return mask_metrics(saliency, mask, xrai=method == "xrai", threshold=threshold)


def roc_points(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of the map's ROC curve against the mask."""
    from monai_sal_app.metrics import roc_curve

    fpr, tpr, _ = roc_curve(saliency, mask)
    return fpr, tpr
