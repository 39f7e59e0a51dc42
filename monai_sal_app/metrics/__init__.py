"""Metrics that score any saliency map: the one definition used by the server, CLI and Slicer.

numpy and scipy only: importing this package must not import torch (the 3D Slicer module uses
these functions in Slicer's own Python). Metrics that need a model live in their own modules and
are imported from there, never from this ``__init__``.
"""

from monai_sal_app.metrics.localization import (
    DEFAULT_PERCENTILES,
    auprc,
    auprc_trapezoid,
    hard_dice,
    iou_at_percentiles,
    localization_metrics,
    mask_metrics,
    mean_mask_baseline,
    minmax,
    partial_auprc,
    pointwise_average_precision,
    pointwise_hit,
    regions_from_map,
    roc_auc,
    roc_curve,
    soft_dice,
    top_regions_mask,
    xrai_region_dice,
)
from monai_sal_app.metrics.stats import bootstrap_ci, mean_ci, summarize, to_markdown, write_csv

__all__ = [
    "DEFAULT_PERCENTILES",
    "auprc",
    "auprc_trapezoid",
    "bootstrap_ci",
    "hard_dice",
    "iou_at_percentiles",
    "localization_metrics",
    "mask_metrics",
    "mean_ci",
    "mean_mask_baseline",
    "minmax",
    "partial_auprc",
    "pointwise_average_precision",
    "pointwise_hit",
    "regions_from_map",
    "roc_auc",
    "roc_curve",
    "soft_dice",
    "summarize",
    "to_markdown",
    "top_regions_mask",
    "write_csv",
    "xrai_region_dice",
]
