"""Named post-processing steps for raw maps (N, 1, *spatial), each per image.

Kept apart from the methods because the metrics depend on them: ROC AUC is invariant to a
monotone rescaling but not to ``abs``; soft Dice depends on the min-max range.

Definitions: docs/METHODS.md#post-processing.
"""

from __future__ import annotations

import torch

__all__ = ["POSTPROCESSING", "absolute", "checked_steps", "clip_percentile", "grayscale", "minmax", "postprocess"]


def _per_image(maps: torch.Tensor) -> torch.Tensor:
    return maps.reshape(maps.shape[0], -1)


def absolute(maps: torch.Tensor) -> torch.Tensor:
    """|map|."""
    return maps.abs()


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """(m - min) / (max - min) per image; a constant map becomes zeros."""
    flat = _per_image(maps)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(
        span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat)
    )
    return out.reshape(maps.shape)


def clip_percentile(maps: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """Clip each map from above at its ``percentile`` (0-100) of values."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    flat = _per_image(maps)
    cap = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    return torch.minimum(flat, cap).reshape(maps.shape)


def grayscale(maps: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """PAIR's visualisation: sum |.| over channels, clip at the 99th percentile, scale to [0, 1].

    Accepts (N, C, *spatial) and returns (N, 1, *spatial) in [0, 1] (zeros for an all-zero map).
    """
    summed = maps.abs().sum(1, keepdim=True)
    flat = _per_image(summed)
    cap = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    lo = flat.min(1, keepdim=True).values
    span = cap - lo
    scaled = torch.where(
        span > 0, ((flat - lo) / torch.where(span > 0, span, torch.ones_like(span))).clamp(0, 1), torch.zeros_like(flat)
    )
    return scaled.reshape(summed.shape)


POSTPROCESSING = {"abs": absolute, "minmax": minmax, "clip": clip_percentile, "grayscale": grayscale}


def checked_steps(steps: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``steps`` as a tuple of names of :data:`POSTPROCESSING`; ``ValueError`` for an unknown name,
    ``TypeError`` for a single string (a sequence of names is expected)."""
    if isinstance(steps, str):
        raise TypeError(f"post-processing steps must be a sequence of names, got the string {steps!r}")
    for step in steps:
        if step not in POSTPROCESSING:
            raise ValueError(f"unknown post-processing step {step!r}; available: {', '.join(POSTPROCESSING)}")
    return tuple(steps)


def postprocess(maps: torch.Tensor, steps: list[str] | tuple[str, ...] = ()) -> torch.Tensor:
    """Apply named steps in order, e.g. ``("abs", "minmax")``. Unknown names raise ``ValueError``."""
    for step in checked_steps(steps):
        maps = POSTPROCESSING[step](maps)
    return maps
