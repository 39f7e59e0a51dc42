"""Separability and specificity of a group saliency map between two regions (definitions and reference:
docs/METHODS.md#latent-subtypes).

A group map is the mean saliency map of a group of images (``evaluation.subtypes`` computes it);
the two regions are the Shepp-Logan phantom's TOP and BOTTOM regions. Both scores compare the
attribution density, D(R) = I(R) / S(R), with I(R) the summed **absolute** attribution in region R
and S(R) its size in pixels/voxels:

- separability: D(evidence region) / D(other region), the evidence region being the one the group's
  subtype atrophies (:data:`GROUP_EVIDENCE`): for "typical" (I_bottom / I_top) * (S_top / S_bottom)
  (``b``), for "atypical" (I_top / I_bottom) * (S_bottom / S_top) (``b_dagger``);
- specificity: D(top or bottom) / D(rest), rest = every other pixel of the map (``c``, ``c_dagger``).

1.0 is the value of a map whose absolute attribution has the same density everywhere. A zero
denominator gives ``inf`` (nan when the numerator is zero too).

numpy only; no torch, no sklearn.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["GROUP_EVIDENCE", "region_mask", "separability", "specificity"]

# The region each patient group's subtype atrophies (as data.shepp_logan.EVIDENCE_REGION; repeated
# here because metrics/ imports nothing from data/).
GROUP_EVIDENCE = {"typical": "bottom", "atypical": "top"}


def _attribution(group_map) -> np.ndarray:
    """|group_map| as float64 (H, W) or (D, H, W); ValueError for another shape or non-finite values."""
    array = np.asarray(group_map, dtype=np.float64)
    if array.ndim not in (2, 3):
        raise ValueError(f"group_map must be one map (H, W) or (D, H, W), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("group_map contains NaN or infinite values")
    return np.abs(array)


def region_mask(masks, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    """One boolean region mask on a map of ``shape``.

    ``masks``: a mask of ``shape`` itself, or per-image masks (N, *shape) (a channel axis of 1,
    (N, 1, *shape), is dropped), which give their union: every pixel where the region lies in at
    least one image. Values must be boolean or 0/1; the region must not be empty.
    """
    array = np.asarray(masks)
    shape = tuple(shape)
    if array.ndim == len(shape) + 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.shape == shape:
        array = array[None]
    if array.ndim != len(shape) + 1 or array.shape[1:] != shape or array.shape[0] == 0:
        raise ValueError(f"{name} has shape {array.shape}: expected the map's grid {shape} or (N, *{shape})")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1")
        array = array != 0
    union = array.any(axis=0)
    if not union.any():
        raise ValueError(f"{name} is empty: the region covers no pixel")
    return union


def _regions(group_map, top_mask, bottom_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    attribution = _attribution(group_map)
    top = region_mask(top_mask, attribution.shape, "top_mask")
    bottom = region_mask(bottom_mask, attribution.shape, "bottom_mask")
    if (top & bottom).any():
        raise ValueError(f"top and bottom regions overlap in {int((top & bottom).sum())} pixel(s)")
    return attribution, top, bottom


def _density_ratio(attribution: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> float:
    """(I_num / S_num) / (I_den / S_den) of the boolean regions ``numerator`` and ``denominator``."""
    i_num, i_den = float(attribution[numerator].sum()), float(attribution[denominator].sum())
    if i_den == 0.0:
        return math.inf if i_num > 0.0 else math.nan
    return (i_num * int(denominator.sum())) / (i_den * int(numerator.sum()))


def separability(group_map, top_mask, bottom_mask, group: str = "typical") -> float:
    """Separability of a group map: attribution density in the group's evidence region over the other's.

    Args:
        group_map: one map (H, W) or (D, H, W), any unit; its absolute value is summed.
        top_mask, bottom_mask: the regions, each on the map's grid or as per-image masks (N, *spatial)
            whose union is taken (:func:`region_mask`); they must not overlap.
        group: "typical" (evidence in the bottom region: b = (I_bottom / I_top) * (S_top / S_bottom))
            or "atypical" (evidence in the top region: b_dagger = (I_top / I_bottom) * (S_bottom / S_top)).

    Returns:
        A float >= 0; 1.0 for a map of uniform |attribution|, above 1 when the evidence region holds
        more attribution per pixel than the other region.
    """
    if group not in GROUP_EVIDENCE:
        raise ValueError(f"group must be one of {sorted(GROUP_EVIDENCE)}, got {group!r}")
    attribution, top, bottom = _regions(group_map, top_mask, bottom_mask)
    evidence, other = (bottom, top) if GROUP_EVIDENCE[group] == "bottom" else (top, bottom)
    return _density_ratio(attribution, evidence, other)


def specificity(group_map, top_mask, bottom_mask) -> float:
    """Specificity of a group map: (I_regions / I_rest) * (S_rest / S_regions), regions = the union of top and bottom.

    Arguments as :func:`separability`; the rest (every pixel outside both regions) must not be empty.
    A float >= 0; 1.0 for a map of uniform |attribution|, above 1 when the two regions hold more
    attribution per pixel than the rest of the image.
    """
    attribution, top, bottom = _regions(group_map, top_mask, bottom_mask)
    regions = top | bottom
    if regions.all():
        raise ValueError("the top and bottom regions cover the whole map: no rest to compare with")
    return _density_ratio(attribution, regions, ~regions)
