"""Regional brain atrophy simulated on a real T1: many subjects from one brain, known atrophy masks.

Base: the Colin27 T1 (brain only, ``ch2bet``) with the AAL atlas (Debian ``mricron-data``); when it is
not installed, nilearn's MNI152 template with regions drawn as ellipsoids fitted to the AAL regions
(intersected with nilearn's grey-matter mask). Both live in MNI space (1 mm voxels).

Subtypes, as in the Shepp-Logan data set (:mod:`.shepp_logan`):

============  =====  ========================================================================
subtype       label  atrophied region
============  =====  ========================================================================
control       0      nothing
typical       1      medial temporal lobe: hippocampus + amygdala, both sides (AAL 37, 38, 41, 42)
atypical      1      occipital lobe, both sides (AAL 49-54: superior, middle, inferior occipital)
error         1      nothing (a label error)
============  =====  ========================================================================

Each subject is drawn in this order (the draws are identical for every subtype, so a control and a
patient drawn from generators in the same state differ only by the atrophy):

1. a random affine (rotation, anisotropic scaling, translation) and a smooth random displacement field
   map the output grid into the template;
2. atrophy (patients only), in template space: inside a smooth weight ``w`` (1 on the atlas region,
   falling to exactly 0 about 3 mm outside it) the tissue is pulled towards each region's centroid by up
   to ``shrink_mm`` (volume loss: the image is resampled from points pushed outwards) and darkened by
   the factor ``1 - intensity_loss * w`` (tissue replaced by CSF, dark on T1);
3. intensity drift: global gain, gamma and a smooth multiplicative bias field;
4. Gaussian noise.

Ground truth: ``mask`` = the voxels whose noiseless, pre-drift intensity the atrophy changed by more
than ``mask_tolerance`` (in units of the normalised T1, where the brightest white matter is ~1).
Outside the weight's support the atrophied and the control images are identical.

Arrays: 3D ``(size, size, size)`` with axes (i, j, k) = (left->right, posterior->anterior,
inferior->superior) of the template, isotropic voxels covering the whole brain (about 2.9 mm at 64);
2D ``(size, size)`` = an axial slice (i, j) at MNI z = -11 mm, which cuts both the hippocampi and the
occipital lobes. The NIfTI affines map voxels to MNI millimetres of the unperturbed template.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from monai_sal_app.data.bases import (
    BaseNotInstalled,
    colin27_files,
    mni152_available,
    rotation_matrix,
    smooth_random_field,
)
from monai_sal_app.data.dataset_writer import DatasetSpec, Subject, check_subject_args, write_dataset
from monai_sal_app.data.shepp_logan import SUBTYPE_LABELS, SUBTYPES, Preset, subtype_counts

__all__ = [
    "ATYPICAL_REGIONS",
    "DATASET_SPEC",
    "PRESETS",
    "SLICE_Z_MM",
    "TYPICAL_REGIONS",
    "AtrophyPreset",
    "BrainBase",
    "BrainVariation",
    "brain_atrophy_subject",
    "generate_brain_atrophy",
    "load_brain_base",
]

TYPICAL_REGIONS = ("Hippocampus_L", "Hippocampus_R", "Amygdala_L", "Amygdala_R")
ATYPICAL_REGIONS = (
    "Occipital_Sup_L",
    "Occipital_Sup_R",
    "Occipital_Mid_L",
    "Occipital_Mid_R",
    "Occipital_Inf_L",
    "Occipital_Inf_R",
)
SLICE_Z_MM = -11.0
_ATROPHIED = {"control": None, "typical": "typical", "atypical": "atypical", "error": None}

# Fallback regions for MNI152 (no labelled atlas offline): ellipsoids fitted to the AAL regions above
# (centroid and principal semi-axes sqrt(5 * eigenvalue) of each region's voxel cloud, MNI mm).
_FALLBACK_ELLIPSOIDS = {
    "typical": (
        ((-26.0, -20.7, -10.1), (6.6, 14.7, 30.5), ((0.29, -0.58, -0.76), (0.96, 0.22, 0.20), (-0.06, 0.79, -0.61))),
        ((28.2, -19.8, -10.3), (6.4, 15.0, 29.8), ((-0.33, -0.56, -0.76), (0.94, -0.30, -0.18), (0.13, 0.77, -0.62))),
        ((-24.3, -0.7, -17.1), (5.6, 8.1, 10.7), ((-0.14, 0.93, 0.35), (0.85, 0.29, -0.44), (-0.51, 0.24, -0.83))),
        ((26.3, 0.6, -17.5), (5.6, 8.6, 12.7), ((-0.41, -0.79, -0.46), (0.73, -0.58, 0.35), (-0.54, -0.20, 0.82))),
    ),
    "atypical": (
        ((-30.2, -81.2, 15.0), (13.6, 28.7, 37.9), ((0.68, 0.68, -0.27), (-0.64, 0.73, 0.24), (0.36, 0.01, 0.93))),
        ((32.5, -80.6, 16.9), (13.0, 22.8, 39.7), ((0.75, -0.60, 0.27), (0.63, 0.78, 0.00), (-0.21, 0.17, 0.96))),
    ),
}


@dataclass(frozen=True)
class AtrophyPreset(Preset):
    """Composition (as :class:`~.shepp_logan.Preset`) plus the atrophy strength ranges drawn per patient.

    ``shrink_mm``: (low, high) maximum inward displacement of a region's outer voxels, mm.
    ``intensity_loss``: (low, high) fraction by which the region's intensity is lowered.
    """

    shrink_mm: tuple[float, float] = (2.0, 4.0)
    intensity_loss: tuple[float, float] = (0.15, 0.30)

    def __post_init__(self):
        super().__post_init__()
        for name in ("shrink_mm", "intensity_loss"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(
                    f"{name} must be a (low, high) range with 0 <= low <= high, got {getattr(self, name)!r}"
                )
        if self.intensity_loss[1] >= 1:
            raise ValueError(f"intensity_loss must stay below 1, got {self.intensity_loss!r}")


PRESETS = {
    "homogeneous": AtrophyPreset(250, 0.85, 0.10, 0.05),
    "heterogeneous": AtrophyPreset(250, 0.65, 0.25, 0.10),
    "test": AtrophyPreset(100, 0.5, 0.5, 0.0),
    "mild": AtrophyPreset(250, 0.85, 0.10, 0.05, shrink_mm=(1.0, 2.0), intensity_loss=(0.05, 0.15)),
}


@dataclass(frozen=True)
class BrainVariation:
    """Per-subject variation of :func:`brain_atrophy_subject` (its ``**variation`` keywords).

    - ``rotation_deg``: rotations ~ U(-r, r) about each axis (2D: in-plane only, out-of-plane r/4).
    - ``scale_jitter``: per-axis scaling ~ U(1 - s, 1 + s).
    - ``translation_mm``: per-axis shift ~ U(-t, t) mm.
    - ``deform_mm``: standard deviation of the smooth displacement field, mm; ``deform_points``: its
      control points per axis.
    - ``gain``: (low, high) global intensity factor; ``gamma``: (low, high) exponent on the normalised T1;
      ``bias``: standard deviation of the log bias field.
    - ``noise_std``: additive Gaussian noise (normalised T1 units).
    - ``mask_tolerance``: smallest change (normalised T1 units) counted in the ground-truth mask.
    """

    rotation_deg: float = 4.0
    scale_jitter: float = 0.05
    translation_mm: float = 3.0
    deform_mm: float = 1.5
    deform_points: int = 5
    gain: tuple[float, float] = (0.9, 1.1)
    gamma: tuple[float, float] = (0.9, 1.1)
    bias: float = 0.05
    noise_std: float = 0.02
    mask_tolerance: float = 0.02

    def __post_init__(self):
        for name in ("rotation_deg", "translation_mm", "deform_mm", "bias", "noise_std", "mask_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.scale_jitter < 0.5:
            raise ValueError(f"scale_jitter must be in [0, 0.5), got {self.scale_jitter!r}")
        if self.deform_points < 2:
            raise ValueError(f"deform_points must be >= 2, got {self.deform_points!r}")
        for name in ("gain", "gamma"):
            value = getattr(self, name)
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"{name} must be a (low, high) range with 0 < low <= high, got {value!r}")


@dataclass(frozen=True)
class BrainBase:
    """A template brain ready for sampling (all arrays on the template grid, 1 mm voxels).

    ``t1``: float32, normalised so the 99th percentile of the brain is 1, pre-smoothed per output spacing
    by :meth:`smoothed`. ``weights[region]``: float32 atrophy weight in [0, 1] (1 on the region, exactly 0
    about 3 mm away). ``outward[region]``: float32 (3, ...) unit-strength displacement (voxels), the
    direction away from the nearest region part's centroid scaled so its largest norm is 1 on the region.
    ``regions[region]``: the boolean region. ``brain``: boolean brain mask. ``affine``: voxel -> MNI mm.
    """

    name: str
    t1: np.ndarray
    brain: np.ndarray
    regions: dict
    weights: dict
    outward: dict
    affine: np.ndarray

    def smoothed(self, sigma_vox: float) -> np.ndarray:
        """The T1 Gaussian-smoothed by ``sigma_vox`` (anti-aliasing before sampling at coarser spacing)."""
        return _smoothed_t1(self.name, round(float(sigma_vox), 3))


_WEIGHT_SIGMA_MM = 2.0
_WEIGHT_FLOOR = 0.05


def _region_fields(region: np.ndarray, parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Atrophy weight and unit outward displacement of ``region`` made of ``parts`` (boolean arrays).

    Computed inside the region's bounding box grown by the weight's reach, then pasted into full arrays.
    """
    idx = np.argwhere(region)
    reach = int(math.ceil(4 * _WEIGHT_SIGMA_MM)) + 1
    box = tuple(
        slice(max(0, lo - reach), min(n, hi + reach + 1)) for lo, hi, n in zip(idx.min(0), idx.max(0), region.shape)
    )
    weight, outward = np.zeros(region.shape, dtype=np.float32), np.zeros((3,) + region.shape, dtype=np.float32)
    weight[box], outward[(slice(None),) + box] = _region_fields_in_box(region[box], [p[box] for p in parts])
    return weight, outward


def _region_fields_in_box(region: np.ndarray, parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    smooth = ndimage.gaussian_filter(region.astype(np.float32), _WEIGHT_SIGMA_MM)
    weight = np.clip((smooth - _WEIGHT_FLOOR) / (0.5 - _WEIGHT_FLOOR), 0.0, 1.0).astype(np.float32)
    support = weight > 0
    # every support voxel moves away from the centroid of the nearest part of the region
    part_index = np.zeros(region.shape, dtype=np.int16)
    for n, part in enumerate(parts, start=1):
        part_index[part] = n
    _, nearest = ndimage.distance_transform_edt(part_index == 0, return_indices=True)
    owner = part_index[tuple(nearest)]
    centroids = np.array([np.argwhere(p).mean(0) for p in parts])
    coords = np.argwhere(support)
    offset = coords - centroids[owner[support] - 1]
    radius = np.zeros(len(parts))
    for n in range(len(parts)):
        inside = parts[n][tuple(coords.T)]
        radius[n] = np.linalg.norm(offset[inside], axis=1).max() if inside.any() else 1.0
    outward = np.zeros((3,) + region.shape, dtype=np.float32)
    outward[(slice(None),) + tuple(coords.T)] = (
        weight[support][:, None] * offset / radius[owner[support] - 1][:, None]
    ).T
    return weight, outward


def _normalised(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    scale = np.percentile(t1[brain], 99)
    return np.clip(t1 / scale, 0, None).astype(np.float32) * brain


def _ellipsoid(shape, affine, centre, semi_axes, directions) -> np.ndarray:
    """Boolean ellipsoid on the voxel grid (centre and semi-axes in mm, directions as unit rows)."""
    idx = np.indices(shape).reshape(3, -1).T
    mm = idx @ affine[:3, :3].T + affine[:3, 3]
    local = (mm - np.asarray(centre)) @ np.asarray(directions).T
    return (((local / np.asarray(semi_axes)) ** 2).sum(1) <= 1.0).reshape(shape)


@lru_cache(maxsize=2)
def _load_base(name: str) -> BrainBase:
    if name == "colin27":
        files = colin27_files()
        t1_image = nib.load(str(files["t1"]))
        t1 = np.asarray(t1_image.get_fdata(dtype=np.float32))
        atlas = np.asarray(nib.load(str(files["atlas"])).get_fdata(dtype=np.float32)).astype(np.int16)
        names = {}
        for line in Path(files["atlas_names"]).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[parts[1]] = int(parts[0])
        brain = t1 > 0
        part_masks = {}
        for region, region_names in (("typical", TYPICAL_REGIONS), ("atypical", ATYPICAL_REGIONS)):
            missing = [n for n in region_names if n not in names]
            if missing:
                raise ValueError(f"{files['atlas_names']}: AAL region(s) {missing} not listed")
            part_masks[region] = [atlas == names[n] for n in region_names]
        affine = t1_image.affine
    elif name == "mni152":
        if not mni152_available():
            raise BaseNotInstalled("nilearn (MNI152 fallback) is not installed; run: bash scripts/install_data.sh")
        # optional (scripts/install_data.sh installs it for this fallback), and over a second to import
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_mask, load_mni152_template

        template = load_mni152_template(resolution=1)
        t1 = np.asarray(template.get_fdata(dtype=np.float32))
        brain = np.asarray(load_mni152_brain_mask(resolution=1).get_fdata()) > 0.5
        grey = np.asarray(load_mni152_gm_mask(resolution=1).get_fdata()) > 0.5
        affine = template.affine
        part_masks = {
            region: [_ellipsoid(t1.shape, affine, *e) & grey for e in ellipsoids]
            for region, ellipsoids in _FALLBACK_ELLIPSOIDS.items()
        }
        t1 = t1 * brain
    else:
        raise ValueError(f"unknown brain base {name!r}; expected 'colin27' or 'mni152'")
    regions, weights, outward = {}, {}, {}
    for region, parts in part_masks.items():
        regions[region] = np.logical_or.reduce(parts)
        weights[region], outward[region] = _region_fields(regions[region], parts)
    return BrainBase(
        name, _normalised(t1, brain), brain, regions, weights, outward, np.asarray(affine, dtype=np.float64)
    )


@lru_cache(maxsize=4)
def _smoothed_t1(name: str, sigma_vox: float) -> np.ndarray:
    t1 = _load_base(name).t1
    return ndimage.gaussian_filter(t1, sigma_vox) if sigma_vox > 0 else t1


def load_brain_base(name: str = "auto") -> BrainBase:
    """The template: ``"colin27"`` (mricron-data), ``"mni152"`` (nilearn) or ``"auto"`` (Colin27, else MNI152).

    Cached per process. Raises :class:`~.bases.BaseNotInstalled` when the requested base (for
    ``"auto"``: both) is not installed.
    """
    if name != "auto":
        return _load_base(name)
    try:
        return _load_base("colin27")
    except BaseNotInstalled as colin_error:
        if not mni152_available():
            raise BaseNotInstalled(f"{colin_error}; the MNI152 fallback (nilearn) is not installed either") from None
        return _load_base("mni152")


@lru_cache(maxsize=2)
def _brain_box(name: str) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(_load_base(name).brain)
    return idx.min(0), idx.max(0)


def _output_geometry(base: BrainBase, size: int, dim: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Centre (template voxels), isotropic spacing (mm) and NIfTI affine of the output grid."""
    low, high = _brain_box(base.name)
    centre = (low + high) / 2.0
    spacing = float((high - low + 1).max()) * 1.05 / size
    if dim == 2:
        centre[2] = np.linalg.solve(base.affine[:3, :3], np.array([0.0, 0.0, SLICE_Z_MM]) - base.affine[:3, 3])[2]
    to_template = np.eye(4)
    to_template[:3, :3] = np.eye(3) * spacing
    to_template[:3, 3] = centre - spacing * (size - 1) / 2.0
    if dim == 2:
        to_template[2, 3] = centre[2]
    return centre, spacing, base.affine @ to_template


def brain_atrophy_subject(
    subtype: str,
    size: int = 64,
    dim: int = 3,
    rng: np.random.Generator | None = None,
    base: BrainBase | None = None,
    shrink_mm: float = 3.0,
    intensity_loss: float = 0.2,
    **variation,
) -> tuple[np.ndarray, np.ndarray]:
    """One subject: ``(image, mask)``, float32 and bool arrays of shape ``(size,) * dim``.

    ``subtype`` in :data:`~.shepp_logan.SUBTYPES`; ``shrink_mm``/``intensity_loss``: strength of the
    atrophy (ignored for controls and label errors). ``variation``: keywords of :class:`BrainVariation`.
    ``mask`` is the set of voxels the atrophy changed (empty for controls and errors; module docstring).
    The random draws do not depend on the subtype or the strength.
    """
    check_subject_args(subtype, SUBTYPES, size, dim)
    try:
        params = BrainVariation(**variation)
    except TypeError:
        unknown = sorted(set(variation) - {f.name for f in fields(BrainVariation)})
        raise ValueError(
            f"unknown variation parameter(s) {unknown}; expected {[f.name for f in fields(BrainVariation)]}"
        ) from None
    if shrink_mm < 0 or not 0 <= intensity_loss < 1:
        raise ValueError(f"need shrink_mm >= 0 and 0 <= intensity_loss < 1, got {shrink_mm!r}, {intensity_loss!r}")
    rng = np.random.default_rng() if rng is None else rng
    base = load_brain_base() if base is None else base
    shape = (size,) * dim

    out_of_plane = 0.25 if dim == 2 else 1.0
    angles = rng.uniform(-1, 1, size=3) * params.rotation_deg * np.array([out_of_plane, out_of_plane, 1.0])
    scales = rng.uniform(1 - params.scale_jitter, 1 + params.scale_jitter, size=3)
    shift = rng.uniform(-params.translation_mm, params.translation_mm, size=3)
    displacement = smooth_random_field(shape, params.deform_points, rng, components=3) * params.deform_mm
    gain = rng.uniform(*params.gain)
    gamma = rng.uniform(*params.gamma)
    log_bias = smooth_random_field(shape, 3, rng)[0] * params.bias
    noise = rng.normal(size=shape)

    centre, spacing, _ = _output_geometry(base, size, dim)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float64)] * dim, indexing="ij"))
    offsets = (grid - (size - 1) / 2.0) * spacing  # mm from the output centre, (dim, *shape)
    if dim == 2:
        offsets = np.concatenate([offsets, np.zeros((1,) + shape)])
    template_mm = np.tensordot(rotation_matrix(angles) * scales, offsets, axes=1) + shift.reshape((3,) + (1,) * dim)
    if dim == 2:
        template_mm[:2] += displacement[:2]
    else:
        template_mm += displacement
    voxel_mm = np.abs(np.diag(base.affine)[:3])  # 1 mm for both bases
    points = centre.reshape((3,) + (1,) * dim) + template_mm / voxel_mm.reshape((3,) + (1,) * dim)

    t1 = base.smoothed(max(0.0, (spacing - 1.0) / 2.0))
    control = ndimage.map_coordinates(t1, points, order=1, mode="constant", cval=0.0)
    region = _ATROPHIED[subtype]
    if region is None:
        clean = control
        mask = np.zeros(shape, dtype=bool)
    else:
        weight = ndimage.map_coordinates(base.weights[region], points, order=1, mode="constant", cval=0.0)
        outward = np.stack(
            [ndimage.map_coordinates(c, points, order=1, mode="constant", cval=0.0) for c in base.outward[region]]
        )
        moved = points + shrink_mm / voxel_mm.reshape((3,) + (1,) * dim) * outward
        clean = ndimage.map_coordinates(t1, moved, order=1, mode="constant", cval=0.0) * (1.0 - intensity_loss * weight)
        mask = np.abs(clean - control) > params.mask_tolerance
    image = gain * np.power(np.clip(clean, 0, None), gamma) * np.exp(log_bias) + params.noise_std * noise
    return image.astype(np.float32), mask


DATASET_SPEC = DatasetSpec(
    name="brain-atrophy",
    presets=PRESETS,
    preset_type=AtrophyPreset,
    subtype_counts=subtype_counts,
    default_size={2: 128, 3: 64},
    progress_label="brain atrophy",
    id_prefix="ba",
)


def generate_brain_atrophy(
    out_dir: str | os.PathLike,
    preset: str | AtrophyPreset = "homogeneous",
    dim: int = 3,
    size: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
    base: str = "auto",
) -> Path:
    """Write a brain-atrophy data set under ``out_dir`` and return the manifest's path.

    Files: ``images/<id>.nii.gz`` (float32), ``masks/<id>.nii.gz`` (uint8, patients with atrophy only),
    ``manifest.csv`` (``mask`` = the atrophy mask; ``mask_top``/``mask_bottom`` empty). ``preset``: a name
    in :data:`PRESETS` or an :class:`AtrophyPreset` (named ``custom``); ``size`` defaults to 64 (3D) or
    128 (2D slices); ``base``: see :func:`load_brain_base`. Each patient's strength is drawn from the
    preset's ranges. Ids ``ba<dim>d-<preset>-<index:06d>``; identical arguments give identical files.
    """
    request = DATASET_SPEC.resolve(preset, dim, size, per_class, seed)
    template = load_brain_base(base)
    _, _, affine = _output_geometry(template, request.size, request.dim)
    composition = request.preset

    def make_subject(subtype: str, rng: np.random.Generator, subject_id: str) -> Subject:
        shrink = rng.uniform(*composition.shrink_mm)
        loss = rng.uniform(*composition.intensity_loss)
        image, mask = brain_atrophy_subject(
            subtype, request.size, request.dim, rng, template, shrink_mm=shrink, intensity_loss=loss
        )
        if _ATROPHIED[subtype] is None:
            return Subject(SUBTYPE_LABELS[subtype], subtype, image, affine=affine)
        if not mask.any():
            raise RuntimeError(
                f"{subject_id}: the atrophy changed no voxel (strength {shrink:.2f} mm, {loss:.2f}); raise the preset's strength"
            )
        return Subject(SUBTYPE_LABELS[subtype], subtype, image, masks={"mask": mask}, affine=affine)

    stream = f"brain-atrophy/{request.preset_name}/{request.dim}d/{request.size}/{template.name}"
    return write_dataset(out_dir, request, make_subject, stream, progress)
