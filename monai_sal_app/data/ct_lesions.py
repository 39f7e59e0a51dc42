"""CT lesions on real lung CTs (pyradiomics' ``lung1``/``lung2``): real tumours, inserted nodules, negatives.

Bases (``scripts/install_data.sh``): ``lung1`` (512x512x48, 0.57x0.57x5 mm, a nodule) and ``lung2``
(512x512x61, 0.63x0.63x5 mm, a tumour), each with its expert tumour mask. Lung fields are segmented once
per case (:func:`segment_lung_ct`).

Subtypes:

==========  =====  ==================================================================================
subtype     label  content of the crop
==========  =====  ==================================================================================
control     0      lung tissue, no lesion (the crop contains no voxel of the real tumour mask)
real        1      one of the two real tumours, mask = its expert segmentation
synthetic   1      a nodule inserted into lung tissue (crop free of the real tumour), mask = known
==========  =====  ==================================================================================

Each subject is a crop of ``size`` voxels per side at ``spacing_mm`` (default 64 at 1.5 mm: 96 mm) centred
on the lesion (+- ``jitter_mm``) or, for controls, on a random lung voxel at least ``radius_mm[1]`` + 2 mm
deep in the lungs (where a synthetic nodule would have gone), through a random rotation,
scaling and smooth displacement field; then HU gain/offset, Gaussian smoothing and noise; values clipped
to the window ``[-1024, 400]`` HU. Synthetic nodules are inserted on the native grid (so they are blurred
by the 5 mm slices exactly like the real tumours): a lobulated sphere of radius ``radius_mm`` with a 1.5 mm
soft rim and density ``density_hu`` (+- 25 HU texture), blended into the CT; their centres are at least
their radius + 2 mm inside the lung fields. Synthetic mask = the output voxels whose noiseless intensity
the nodule changed by more than ``mask_tolerance_hu``. Real mask = the expert mask resampled (linear > 0.5).

Arrays are (z, y, x) as ITK's NRRD buffer (``read_image``), 2D slices (y, x) are the axial plane through
the lesion. The NIfTI affine maps output voxels to the base's RAS mm (without the random deformation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from monai_sal_app.arguments import check_integer
from monai_sal_app.data.bases import lung_ct_files, rotation_matrix, smooth_random_field
from monai_sal_app.data.dataset_writer import (
    DatasetSpec,
    Subject,
    check_subject_args,
    write_dataset,
)
from monai_sal_app.data.io import read_image

__all__ = [
    "CASES",
    "DATASET_SPEC",
    "PRESETS",
    "SUBTYPES",
    "SUBTYPE_LABELS",
    "WINDOW_HU",
    "CTPreset",
    "CTVariation",
    "LungCase",
    "ct_lesion_subject",
    "generate_ct_lesions",
    "load_lung_case",
    "segment_lung_ct",
]

SUBTYPES = ("control", "real", "synthetic")
SUBTYPE_LABELS = {"control": 0, "real": 1, "synthetic": 1}
CASES = ("lung1", "lung2")
WINDOW_HU = (-1024.0, 400.0)
_MAX_TRIES = 200


@dataclass(frozen=True)
class CTPreset:
    """``per_class`` controls and as many lesions, a fraction ``real`` of them real tumours; nodule ranges.

    ``radius_mm``: (low, high) nodule radius; ``density_hu``: (low, high) nodule density in HU.
    """

    per_class: int
    real: float = 0.3
    radius_mm: tuple[float, float] = (4.0, 12.0)
    density_hu: tuple[float, float] = (-150.0, 60.0)

    def __post_init__(self):
        check_integer(self.per_class, "per_class")
        if not 0 <= self.real <= 1:
            raise ValueError(f"real must be a fraction in [0, 1], got {self.real!r}")
        if not 1 <= self.radius_mm[0] <= self.radius_mm[1]:
            raise ValueError(f"radius_mm must be a (low, high) range with 1 <= low <= high, got {self.radius_mm!r}")
        if not -1000 < self.density_hu[0] <= self.density_hu[1]:
            raise ValueError(f"density_hu must be a (low, high) range above -1000 HU, got {self.density_hu!r}")


PRESETS = {
    "train": CTPreset(150),
    "test": CTPreset(100),
}


@dataclass(frozen=True)
class CTVariation:
    """Per-subject variation of :func:`ct_lesion_subject` (its ``**variation`` keywords).

    ``rotation_deg``: about the axial axis U(-r, r), about the others U(-r/3, r/3); ``scale_jitter``: per-axis
    U(1 - s, 1 + s); ``jitter_mm``: lesion offset from the crop centre U(-j, j) per axis (z: a tenth in 2D, so the slice cuts the lesion);
    ``deform_mm``: std of the smooth displacement field; ``gain``: U(1 - g, 1 + g); ``offset_hu``: U(-o, o);
    ``smoothing``: Gaussian sigma U(0, s) output voxels; ``noise_hu``: (low, high) noise std;
    ``mask_tolerance_hu``: smallest change counted in a synthetic nodule's mask.
    """

    rotation_deg: float = 15.0
    scale_jitter: float = 0.08
    jitter_mm: float = 12.0
    deform_mm: float = 1.5
    gain: float = 0.03
    offset_hu: float = 20.0
    smoothing: float = 0.6
    noise_hu: tuple[float, float] = (10.0, 25.0)
    mask_tolerance_hu: float = 100.0

    def __post_init__(self):
        for name in ("rotation_deg", "jitter_mm", "deform_mm", "offset_hu", "smoothing", "mask_tolerance_hu"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("scale_jitter", "gain"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)!r}")
        if not 0 <= self.noise_hu[0] <= self.noise_hu[1]:
            raise ValueError(f"noise_hu must be a (low, high) range with 0 <= low <= high, got {self.noise_hu!r}")


@dataclass(frozen=True)
class LungCase:
    """One base CT: ``image`` HU float32 (z, y, x), ``tumour`` and ``lungs`` bool, ``spacing`` mm per axis,
    ``affine`` (voxel -> RAS mm), ``tumour_centre`` (voxel index), ``lung_depth`` (mm from the lung border,
    inside the lungs)."""

    name: str
    image: np.ndarray
    tumour: np.ndarray
    lungs: np.ndarray
    lung_depth: np.ndarray
    spacing: np.ndarray
    affine: np.ndarray
    tumour_centre: np.ndarray


def segment_lung_ct(image: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Lung fields of a chest CT (HU, axes (z, y, x)): boolean mask.

    Air below -400 HU, minus the components that touch the in-plane border (air around the body), keeping
    components of at least 2% of the remaining air volume (lungs, airways); holes filled per axial slice
    (vessels and nodules inside the lungs are included). ``spacing`` (mm per axis) is accepted for API
    symmetry with the distance computations and checked to have three positive values.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"segment_lung_ct needs a 3D image, got shape {image.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive values in mm, got {spacing!r}")
    air = image < -400
    labels, count = ndimage.label(air)
    if count == 0:
        raise ValueError("segment_lung_ct: no air in the image")
    border = np.unique(
        np.concatenate(
            [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = True
    keep[border] = False
    inside_total = sizes[keep[1:]].sum()
    keep[1:] &= sizes >= 0.02 * max(inside_total, 1)
    lungs = keep[labels]
    if not lungs.any():
        raise ValueError("segment_lung_ct: no lung field found")
    return np.stack([ndimage.binary_fill_holes(s) for s in lungs])


@lru_cache(maxsize=2)
def load_lung_case(name: str) -> LungCase:
    """Load and segment one base (``"lung1"`` or ``"lung2"``), cached per process."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; expected one of {CASES}")
    files = lung_ct_files()[name]
    image, meta = read_image(files["image"])
    tumour = read_image(files["label"], allow_constant=True)[0] > 0.5
    if tumour.shape != image.shape:
        raise ValueError(f"{files['label']}: shape {tumour.shape} differs from the image's {image.shape}")
    affine = meta["affine"]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lungs = segment_lung_ct(image, spacing) | tumour
    idx = np.argwhere(lungs)
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(idx.min(0), idx.max(0)))
    depth = np.zeros(lungs.shape, dtype=np.float32)
    depth[box] = ndimage.distance_transform_edt(np.pad(lungs[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    return LungCase(name, image, tumour, lungs, depth, spacing, affine, np.argwhere(tumour).mean(0))


@lru_cache(maxsize=8)
def _nodule_centres(name: str, min_depth_mm: float) -> np.ndarray:
    """(K, 3) native voxel indices of base ``name`` deeper than ``min_depth_mm`` inside the lungs: where a
    nodule's centre may fall (cached per process: a search of the whole volume, the same for every crop)."""
    return np.argwhere(load_lung_case(name).lung_depth > min_depth_mm)


def _nodule(
    rng: np.random.Generator,
    case: LungCase,
    box: tuple[slice, ...],
    centre_mm: np.ndarray,
    radius: float,
    density: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``(weight, hu)`` on the native sub-grid ``box``: the nodule's weight in [0, 1] (a lobulated sphere with a
    1.5 mm soft rim, averaged over 5 positions across each slice's thickness: partial volume; exactly 0 beyond
    1.15 radius + 1 mm) and its HU values (``density`` +- 25 HU of smooth texture)."""
    lobes = rng.normal(size=(4, 4, 4))
    texture = smooth_random_field((8, 8, 8), 3, rng)[0]
    shape = tuple(b.stop - b.start for b in box)
    reach = (1.15 * radius + 1.0 + case.spacing) / case.spacing  # voxels, per axis
    centre = centre_mm / case.spacing - np.array([b.start for b in box])
    near = tuple(
        slice(int(max(0, np.floor(c - r))), int(min(n, np.ceil(c + r) + 1))) for c, r, n in zip(centre, reach, shape)
    )
    z, y, x = ((np.arange(b.start, b.stop) + s.start) * sp for b, s, sp in zip(near, box, case.spacing))
    weight = np.zeros(shape)
    local = np.zeros(tuple(b.stop - b.start for b in near))
    for fraction in (np.arange(5) + 0.5) / 5 - 0.5:
        dz = (z + fraction * case.spacing[0] - centre_mm[0])[:, None, None]
        dy, dx = (y - centre_mm[1])[None, :, None], (x - centre_mm[2])[None, None, :]
        distance = np.sqrt(dz**2 + dy**2 + dx**2)
        unit = np.stack(np.broadcast_arrays(dz, dy, dx)) / np.maximum(distance, 1e-6)
        wobble = 1 + 0.15 * np.tanh(ndimage.map_coordinates(lobes, 1.5 + 1.5 * unit, order=1, mode="nearest"))
        profile = np.clip((radius * wobble - distance) / 1.5 + 0.5, 0, 1)
        local += profile * profile * (3 - 2 * profile) / 5
    weight[near] = local
    grid = np.stack(np.meshgrid(*[np.linspace(0, 7, n) for n in shape], indexing="ij"))
    hu = density + 25 * ndimage.map_coordinates(texture, grid, order=1)
    return weight, hu


def _output_offsets(size: int, dim: int, spacing_mm: float) -> np.ndarray:
    """Millimetre offsets (3, *shape) of the output voxels from the crop centre, axes (z, y, x)."""
    axis = (np.arange(size) - (size - 1) / 2.0) * spacing_mm
    if dim == 3:
        return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"))
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([np.zeros_like(yy), yy, xx])


def ct_lesion_subject(
    subtype: str,
    size: int = 64,
    dim: int = 3,
    rng: np.random.Generator | None = None,
    preset: CTPreset = PRESETS["train"],
    spacing_mm: float = 1.5,
    **variation,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One crop: ``(image, mask, affine)``; ``image`` float32 HU of shape ``(size,) * dim`` (window
    :data:`WINDOW_HU`), ``mask`` bool (empty for controls), ``affine`` (4, 4) output voxel -> RAS mm.

    The case (lung1/lung2) is drawn at random; controls and synthetic crops are redrawn until they hold no
    voxel of the real tumour. A control and a synthetic crop drawn from generators in the same state are the
    same crop, with and without the nodule. ``variation``: keywords of :class:`CTVariation`.
    """
    check_subject_args(subtype, SUBTYPES, size, dim)
    try:
        params = CTVariation(**variation)
    except TypeError:
        unknown = sorted(set(variation) - {f.name for f in fields(CTVariation)})
        raise ValueError(
            f"unknown variation parameter(s) {unknown}; expected {[f.name for f in fields(CTVariation)]}"
        ) from None
    if not isinstance(preset, CTPreset):
        raise TypeError(f"preset must be a CTPreset, got {type(preset).__name__}")
    rng = np.random.default_rng() if rng is None else rng
    shape = (size,) * dim
    case = load_lung_case(CASES[int(rng.integers(len(CASES)))])

    angles = rng.uniform(-1, 1, size=3) * params.rotation_deg * np.array([1.0, 1 / 3, 1 / 3])
    scales = rng.uniform(1 - params.scale_jitter, 1 + params.scale_jitter, size=3)
    jitter = rng.uniform(-params.jitter_mm, params.jitter_mm, size=3) * np.array([0.1 if dim == 2 else 1.0, 1.0, 1.0])
    displacement = smooth_random_field(shape, 4, rng, components=3) * params.deform_mm
    gain = rng.uniform(1 - params.gain, 1 + params.gain)
    offset = rng.uniform(-params.offset_hu, params.offset_hu)
    sigma = rng.uniform(0, params.smoothing)
    noise = rng.normal(size=shape) * rng.uniform(*params.noise_hu)

    offsets = np.tensordot(rotation_matrix(angles) * scales, _output_offsets(size, dim, spacing_mm), axes=1)
    if dim == 2:
        offsets[1:] += displacement[1:]
    else:
        offsets += displacement
    nodule = None
    for _ in range(_MAX_TRIES):
        if subtype == "real":
            centre_mm = case.tumour_centre * case.spacing
        else:  # controls draw the same centre and nodule as a synthetic crop would, and insert nothing
            candidates = _nodule_centres(case.name, 2.0 + preset.radius_mm[1])
            centre_mm = candidates[int(rng.integers(len(candidates)))] * case.spacing
            nodule = (centre_mm, rng.uniform(*preset.radius_mm), rng.uniform(*preset.density_hu))
        points = (centre_mm + jitter).reshape((3,) + (1,) * dim) + offsets  # mm on the native grid
        index = points / case.spacing.reshape((3,) + (1,) * dim)
        low = np.maximum(np.floor(index.reshape(3, -1).min(1)).astype(int) - 1, 0)
        high = np.minimum(np.ceil(index.reshape(3, -1).max(1)).astype(int) + 2, case.image.shape)
        box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
        local = index - low.reshape((3,) + (1,) * dim)
        tumour = ndimage.map_coordinates(case.tumour[box].astype(np.float32), local, order=1, mode="constant") > 0.5
        if subtype == "real" or not tumour.any():
            break
    else:
        raise RuntimeError(f"{case.name}: no crop free of the real tumour after {_MAX_TRIES} draws")

    native = case.image[box].astype(np.float32)
    control = ndimage.map_coordinates(native, local, order=1, mode="nearest")
    if subtype == "synthetic":
        centre, radius, density = nodule
        weight, hu = _nodule(rng, case, box, centre, radius, density)
        with_nodule = ndimage.map_coordinates(native * (1 - weight) + hu * weight, local, order=1, mode="nearest")
        mask = np.abs(with_nodule - control) > params.mask_tolerance_hu
        clean = with_nodule
    elif subtype == "real":
        mask, clean = tumour, control
    else:
        mask, clean = np.zeros(shape, dtype=bool), control
    if sigma > 0:
        clean = ndimage.gaussian_filter(clean, sigma)
    image = np.clip(gain * clean + offset + noise, *WINDOW_HU)

    to_native = np.eye(4)
    to_native[:3, :3] = np.diag(spacing_mm / case.spacing)
    to_native[:3, 3] = (centre_mm + jitter) / case.spacing - spacing_mm / case.spacing * (size - 1) / 2.0
    if dim == 2:
        to_native[0, 3] = (centre_mm[0] + jitter[0]) / case.spacing[0]
        to_native[:3, [0, 1, 2]] = to_native[:3, [1, 2, 0]]  # 2D arrays are (y, x): their axes 0, 1 are native 1, 2
    return image.astype(np.float32), mask, case.affine @ to_native


def _subtype_counts(preset: CTPreset, per_class: int) -> dict[str, int]:
    """``per_class`` controls and ``per_class`` lesions, ``round(preset.real * per_class)`` of them real tumours."""
    real = int(round(preset.real * per_class))
    return {"control": per_class, "real": real, "synthetic": per_class - real}


DATASET_SPEC = DatasetSpec(
    name="ct-lesions",
    presets=PRESETS,
    preset_type=CTPreset,
    subtype_counts=_subtype_counts,
    default_size={2: 64, 3: 64},
    progress_label="CT lesions",
    id_prefix="ct",
)


def generate_ct_lesions(
    out_dir: str | os.PathLike,
    preset: str | CTPreset = "train",
    dim: int = 3,
    size: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a CT-lesion data set under ``out_dir`` and return the manifest's path.

    Files: ``images/<id>.nii.gz`` (float32 HU), ``masks/<id>.nii.gz`` (uint8, lesions only), ``manifest.csv``
    (subtype control / real / synthetic). ``preset``: a name in :data:`PRESETS` or a :class:`CTPreset`
    (named ``custom``); ``size`` defaults to 64 (3D crops, or 2D axial slices with ``dim=2``) at 1.5 mm.
    Ids ``ct<dim>d-<preset>-<index:06d>``; identical arguments give identical files.
    """
    request = DATASET_SPEC.resolve(preset, dim, size, per_class, seed)

    def make_subject(subtype: str, rng: np.random.Generator, subject_id: str) -> Subject:
        image, mask, affine = ct_lesion_subject(subtype, request.size, request.dim, rng, request.preset)
        if subtype == "control":
            return Subject(SUBTYPE_LABELS[subtype], subtype, image, affine=affine)
        if not mask.any():
            raise RuntimeError(f"{subject_id}: the {subtype} lesion covers no voxel of the crop")
        return Subject(SUBTYPE_LABELS[subtype], subtype, image, masks={"mask": mask}, affine=affine)

    stream = f"ct-lesions/{request.preset_name}/{request.dim}d/{request.size}"
    return write_dataset(out_dir, request, make_subject, stream, progress)
