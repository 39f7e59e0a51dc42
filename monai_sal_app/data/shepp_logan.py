"""Shepp-Logan subtype phantoms: a classification data set whose evidence location is known.

A modified Shepp-Logan head (2D ellipses or 3D ellipsoids) with two regions of interest that share
one grey level: a TOP region (one ellipse) and a BOTTOM region (three small ellipses side by side).
Patients have one region atrophied (drawn smaller); controls have none. Subtypes:

============  =====  ===============================  ==========================
subtype       label  atrophied                        evidence mask (manifest)
============  =====  ===============================  ==========================
control       0      nothing                          none
typical       1      bottom region                    bottom
atypical      1      top region                       top
error         1      nothing (a label error)          none
============  =====  ===============================  ==========================

Geometry is in normalised coordinates x, y, z in [-1, 1] (y points up), sampled at pixel centres.
Arrays are (H, W) in 2D and (D, H, W) in 3D with H the vertical axis: row 0 is the top of the
head. Each region's semi-axes are multiplied by a scale ~ U(1.0, 1.2) (normal) or U(0.8, 0.9)
(atrophied). Everything else that varies between subjects (skull/brain size, ventricle size, the
regions' grey level, smoothing, noise) is drawn identically for every subtype, so only the size
of a region carries the label.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from monai_sal_app.arguments import check_integer
from monai_sal_app.data.dataset_writer import (
    DatasetSpec,
    Subject,
    check_subject_args,
    write_dataset,
)

__all__ = [
    "DATASET_SPEC",
    "EVIDENCE_REGION",
    "PRESETS",
    "SUBTYPES",
    "SUBTYPE_LABELS",
    "Preset",
    "Variation",
    "generate_shepp_logan",
    "shepp_logan_phantom",
    "subtype_counts",
]

SUBTYPES = ("control", "typical", "atypical", "error")
SUBTYPE_LABELS = {"control": 0, "typical": 1, "atypical": 1, "error": 1}
EVIDENCE_REGION = {"control": None, "typical": "bottom", "atypical": "top", "error": None}
_ATROPHIED = {"control": (), "typical": ("bottom",), "atypical": ("top",), "error": ()}


@dataclass(frozen=True)
class Preset:
    """Data set composition: ``per_class`` controls and as many patients, split by the fractions."""

    per_class: int
    typical: float
    atypical: float
    error: float

    def __post_init__(self):
        check_integer(self.per_class, "per_class")
        fractions = (self.typical, self.atypical, self.error)
        if min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
            raise ValueError(f"patient fractions typical/atypical/error must be >= 0 and sum to 1, got {fractions}")


PRESETS = {
    "homogeneous": Preset(500, 0.85, 0.10, 0.05),
    "heterogeneous": Preset(500, 0.65, 0.25, 0.10),
    "large": Preset(10000, 0.85, 0.10, 0.05),
    "test": Preset(1000, 0.5, 0.5, 0.0),
}


@dataclass(frozen=True)
class Variation:
    """Per-subject variation of :func:`shepp_logan_phantom` (the ``**variation`` keywords).

    - ``head_jitter``: skull and brain semi-axes x, y, z each multiplied by U(1 - j, 1 + j).
    - ``ventricle_jitter``: each ventricle's semi-axes multiplied by U(1 - j, 1 + j).
    - ``roi_value``: (low, high) range of the grey level shared by both regions.
    - ``smoothing``: Gaussian smoothing with sigma ~ U(0, smoothing) pixels (0 = none).
    - ``noise_std``: standard deviation of the additive Gaussian noise (image units; skull = 1).
    - ``normal_scale`` / ``atrophy_scale``: (low, high) ranges of a region's scale factor.
    """

    head_jitter: float = 0.03
    ventricle_jitter: float = 0.10
    roi_value: tuple[float, float] = (0.75, 0.85)
    smoothing: float = 0.5
    noise_std: float = 0.02
    normal_scale: tuple[float, float] = (1.0, 1.2)
    atrophy_scale: tuple[float, float] = (0.8, 0.9)

    def __post_init__(self):
        for name in ("head_jitter", "ventricle_jitter"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)!r}")
        for name in ("smoothing", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("roi_value", "normal_scale", "atrophy_scale"):
            value = getattr(self, name)
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"{name} must be a (low, high) range with 0 < low <= high, got {value!r}")


@dataclass(frozen=True)
class _Ellipse:
    """Ellipse (2D) or ellipsoid (3D): centre (x, y, z), semi-axes (a, b, c), in-plane angle in degrees."""

    center: tuple[float, float, float]
    axes: tuple[float, float, float]
    angle: float = 0.0

    def scaled(self, factors) -> _Ellipse:
        return _Ellipse(self.center, tuple(a * f for a, f in zip(self.axes, np.broadcast_to(factors, 3))), self.angle)

    def inside(self, grid: tuple[np.ndarray, ...]) -> np.ndarray:
        """Boolean array: pixel centres of ``grid`` (x, y[, z], broadcastable) inside the shape."""
        dx, dy = grid[0] - self.center[0], grid[1] - self.center[1]
        theta = math.radians(self.angle)
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        r2 = (u / self.axes[0]) ** 2 + (v / self.axes[1]) ** 2
        if len(grid) == 3:
            r2 = r2 + ((grid[2] - self.center[2]) / self.axes[2]) ** 2
        return r2 <= 1.0


# Grey levels: background 0, skull 1, brain 0.2, central ellipse 0.45, ventricles 0, regions ~0.8.
_SKULL = _Ellipse((0.0, 0.0, 0.0), (0.69, 0.92, 0.81))
_BRAIN = _Ellipse((0.0, -0.0184, 0.0), (0.6624, 0.874, 0.78))
_CENTRAL = _Ellipse((0.0, 0.08, 0.0), (0.045, 0.045, 0.045))
_VENTRICLES = (
    _Ellipse((0.22, 0.0, 0.0), (0.11, 0.31, 0.22), -18.0),
    _Ellipse((-0.22, 0.0, 0.0), (0.16, 0.41, 0.28), 18.0),
)
_TOP = (_Ellipse((0.0, 0.46, 0.0), (0.17, 0.19, 0.28)),)
_BOTTOM = (
    _Ellipse((-0.24, -0.58, 0.0), (0.08, 0.05, 0.06)),
    _Ellipse((0.0, -0.58, 0.0), (0.06, 0.06, 0.06)),
    _Ellipse((0.24, -0.58, 0.0), (0.05, 0.08, 0.06)),
)
_VALUES = {"skull": 1.0, "brain": 0.2, "central": 0.45, "ventricle": 0.0}


def _grid(size: int, dim: int) -> tuple[np.ndarray, ...]:
    """Sparse pixel-centre coordinates (x, y[, z]) broadcasting to (H, W) or (D, H, W)."""
    centres = -1.0 + (2.0 * np.arange(size) + 1.0) / size
    if dim == 2:
        return centres[None, :], -centres[:, None]
    return centres[None, None, :], -centres[None, :, None], centres[:, None, None]


def shepp_logan_phantom(
    subtype: str,
    size: int = 128,
    dim: int = 2,
    rng: np.random.Generator | None = None,
    **variation,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One Shepp-Logan subtype phantom and the masks of its two regions.

    Returns ``(image, masks)``: ``image`` float32 of shape ``(size,) * dim`` (skull = 1, noise
    added), ``masks = {"top": bool, "bottom": bool}`` of the same shape, exactly the pixels where
    each region is drawn in this image (after its scaling). ``variation``: keywords of
    :class:`Variation`. Random draws happen in the same order for every subtype, so two calls
    with generators in the same state differ only in the atrophied region.
    Below size 32 the three bottom ellipses can merge into fewer blobs (and in 3D at size 16 the
    bottom region can cover no voxel centre at all); use size >= 32 when the masks matter.
    """
    check_subject_args(subtype, SUBTYPES, size, dim)
    try:
        params = Variation(**variation)
    except TypeError:
        unknown = sorted(set(variation) - {f.name for f in fields(Variation)})
        raise ValueError(
            f"unknown variation parameter(s) {unknown}; expected {[f.name for f in fields(Variation)]}"
        ) from None
    rng = np.random.default_rng() if rng is None else rng
    shape = (size,) * dim

    head = rng.uniform(1 - params.head_jitter, 1 + params.head_jitter, size=3)
    ventricle_scales = rng.uniform(1 - params.ventricle_jitter, 1 + params.ventricle_jitter, size=len(_VENTRICLES))
    roi_value = rng.uniform(*params.roi_value)
    region_u = {"top": rng.random(), "bottom": rng.random()}
    sigma = rng.uniform(0.0, params.smoothing)
    noise = rng.normal(0.0, 1.0, size=shape)

    grid = _grid(size, dim)
    image = np.zeros(shape, dtype=np.float64)
    image[_SKULL.scaled(head).inside(grid)] = _VALUES["skull"]
    image[_BRAIN.scaled(head).inside(grid)] = _VALUES["brain"]
    image[_CENTRAL.inside(grid)] = _VALUES["central"]
    for ventricle, scale in zip(_VENTRICLES, ventricle_scales):
        image[ventricle.scaled(scale).inside(grid)] = _VALUES["ventricle"]
    masks = {}
    for region, ellipses in (("top", _TOP), ("bottom", _BOTTOM)):
        low, high = params.atrophy_scale if region in _ATROPHIED[subtype] else params.normal_scale
        scale = low + region_u[region] * (high - low)
        mask = np.zeros(shape, dtype=bool)
        for ellipse in ellipses:
            mask |= ellipse.scaled(scale).inside(grid)
        image[mask] = roi_value
        masks[region] = mask
    if sigma > 0:
        image = ndimage.gaussian_filter(image, sigma)
    image += params.noise_std * noise
    return image.astype(np.float32), masks


def subtype_counts(preset: Preset, per_class: int | None = None) -> dict[str, int]:
    """Number of subjects per subtype: ``per_class`` controls and ``per_class`` patients.

    Patients are split by the preset's fractions with largest-remainder rounding, so the three
    patient counts sum to ``per_class`` exactly. ``per_class`` defaults to ``preset.per_class``.
    """
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a Preset, got {type(preset).__name__}")
    n = check_integer(preset.per_class if per_class is None else per_class, "per_class")
    patients = ("typical", "atypical", "error")
    exact = [getattr(preset, s) * n for s in patients]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(patients)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return {"control": int(n), **{s: int(c) for s, c in zip(patients, counts)}}


DATASET_SPEC = DatasetSpec(
    name="shepp-logan",
    presets=PRESETS,
    preset_type=Preset,
    subtype_counts=subtype_counts,
    default_size={2: 128, 3: 64},
    progress_label="Shepp-Logan",
    id_prefix="sl",
)


def generate_shepp_logan(
    out_dir: str | os.PathLike,
    preset: str | Preset = "homogeneous",
    dim: int = 2,
    size: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a Shepp-Logan subtype data set under ``out_dir`` and return the manifest's path.

    Files: ``images/<id>.nii.gz`` (float32), ``masks/<id>_top.nii.gz`` and ``masks/<id>_bottom.nii.gz``
    (uint8), identity affine (1 mm pixels), and ``manifest.csv`` (see :mod:`.manifest`; ``mask`` is
    the atrophied region's mask). ``preset``: a name in :data:`PRESETS` or a :class:`Preset`
    (named ``custom`` in ids). ``size`` defaults to 128 (2D) or 64 (3D); ``per_class`` overrides the
    preset's. Ids are ``sl<dim>d-<preset>-<index:06d>`` in a seeded random order of subtypes.
    The same arguments always give identical files; the random streams also depend on the preset
    name, dim and size, so e.g. the "homogeneous" and "test" sets differ even with the same seed.
    """
    request = DATASET_SPEC.resolve(preset, dim, size, per_class, seed)

    def make_subject(subtype: str, rng: np.random.Generator, subject_id: str) -> Subject:
        image, masks = shepp_logan_phantom(subtype, request.size, request.dim, rng)
        evidence = EVIDENCE_REGION[subtype]
        return Subject(
            SUBTYPE_LABELS[subtype],
            subtype,
            image,
            masks={"mask_top": masks["top"], "mask_bottom": masks["bottom"]},
            evidence=f"mask_{evidence}" if evidence else None,
        )

    stream = f"shepp-logan/{request.preset_name}/{request.dim}d/{request.size}"
    return write_dataset(out_dir, request, make_subject, stream, progress)
