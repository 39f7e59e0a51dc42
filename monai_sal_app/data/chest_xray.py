"""Chest X-ray opacities on a real radiograph, written in the RSNA pneumonia layout, with exact masks.

Base: pydicom-data's ``RG1_UNCR.dcm`` (PA chest CR, 1955x1841, 15-bit MONOCHROME1), inverted to
MONOCHROME2 (bright = dense), windowed to its 0.5-99.5 percentiles, padded to a square and resized to
1024x1024. Lung fields are segmented once (:func:`segment_lungs`).

Each subject (the draws 1-3 are identical for both classes, so a Normal and a Lung Opacity subject drawn
from generators in the same state differ only by the opacities):

1. a random affine (rotation, scaling, shift) and a smooth displacement field deform image and lung mask;
2. intensity variation: gamma, gain, offset and a smooth multiplicative bias field;
3. Gaussian noise (drawn now, added last);
4. Lung Opacity only: 1-3 opacities, each a lobulated ellipse with a soft edge, a patchy texture (a smooth
   random field) and a contrast drawn from the preset, centred inside one lung field and faded to zero
   outside the (smoothed) lung mask: ``I <- I + contrast * alpha * (1 - I)`` (brightening, saturating at 1).

Ground truth: ``mask`` = the pixels the opacities brightened by more than ``mask_tolerance`` (in [0, 1]
image units, before noise); each opacity's box is the bounding box of the mask pixels where it added the
most (so the union of the boxes covers the mask).

Files under ``out_dir`` (see :mod:`.rsna`): ``stage_2_train_labels.csv``, ``stage_2_detailed_class_info.csv``,
``stage_2_train_images/<patientId>.dcm`` (1024x1024 8-bit MONOCHROME2, JPEG baseline), plus for
``monai-sal train``: ``images/<patientId>.nii.gz`` (``size`` x ``size`` float32 in [0, 1], resized from the
8-bit image), ``masks/<patientId>.nii.gz`` (uint8, the exact opacity mask at ``size``), ``masks_1024/`` (the
exact mask at 1024) and ``manifest.csv``. Arrays are (rows, cols) = (y, x).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation
from skimage.transform import resize

from monai_sal_app.arguments import check_integer
from monai_sal_app.data.bases import chest_radiograph_file, deterministic_uuid, separable_zoom, smooth_random_field
from monai_sal_app.data.dataset_writer import DatasetSpec, Subject, write_dataset
from monai_sal_app.data.io import read_image, write_nifti
from monai_sal_app.data.rsna import IMAGE_DIR, RSNA_SIZE, write_rsna_dicom, write_rsna_tables

__all__ = [
    "CLASS_LABELS",
    "DATASET_SPEC",
    "PRESETS",
    "ChestPreset",
    "ChestVariation",
    "chest_base",
    "chest_xray_subject",
    "generate_chest_xray",
    "segment_lungs",
]

CLASS_LABELS = {"Normal": 0, "Lung Opacity": 1}


@dataclass(frozen=True)
class ChestPreset:
    """Data set: ``per_class`` Normal and as many Lung Opacity images; opacity parameter ranges.

    ``opacities``: (min, max) number per positive image; ``radius``: (low, high) semi-axes as a fraction of
    the image side; ``contrast``: (low, high) brightening fraction towards white.
    """

    per_class: int
    opacities: tuple[int, int] = (1, 3)
    radius: tuple[float, float] = (0.06, 0.13)
    contrast: tuple[float, float] = (0.3, 0.6)

    def __post_init__(self):
        check_integer(self.per_class, "per_class")
        if not 1 <= self.opacities[0] <= self.opacities[1]:
            raise ValueError(f"opacities must be a (min, max) count with 1 <= min <= max, got {self.opacities!r}")
        if not 0 < self.radius[0] <= self.radius[1] < 0.5:
            raise ValueError(f"radius must be a (low, high) fraction with 0 < low <= high < 0.5, got {self.radius!r}")
        if not 0 < self.contrast[0] <= self.contrast[1] <= 1:
            raise ValueError(
                f"contrast must be a (low, high) fraction with 0 < low <= high <= 1, got {self.contrast!r}"
            )


PRESETS = {
    "train": ChestPreset(200),
    "test": ChestPreset(100),
    "subtle": ChestPreset(200, contrast=(0.15, 0.3)),
}


@dataclass(frozen=True)
class ChestVariation:
    """Per-subject variation of :func:`chest_xray_subject` (its ``**variation`` keywords).

    ``rotation_deg``: U(-r, r); ``scale_jitter``: isotropic scale U(1 - s, 1 + s) times per-axis U(1 - s/2, 1 + s/2);
    ``shift``: per-axis shift U(-t, t) as a fraction of the side; ``deform``: std of the smooth displacement
    field as a fraction of the side; ``gamma``/``gain``: (low, high); ``offset``: U(-o, o); ``bias``: std of the
    log bias field; ``noise_std``: Gaussian noise in [0, 1] units; ``mask_tolerance``: smallest brightening
    counted in the mask.
    """

    rotation_deg: float = 5.0
    scale_jitter: float = 0.06
    shift: float = 0.03
    deform: float = 0.006
    gamma: tuple[float, float] = (0.85, 1.18)
    gain: tuple[float, float] = (0.9, 1.05)
    offset: float = 0.04
    bias: float = 0.05
    noise_std: float = 0.015
    mask_tolerance: float = 0.02

    def __post_init__(self):
        for name in (
            "rotation_deg",
            "scale_jitter",
            "shift",
            "deform",
            "offset",
            "bias",
            "noise_std",
            "mask_tolerance",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("gamma", "gain"):
            value = getattr(self, name)
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"{name} must be a (low, high) range with 0 < low <= high, got {value!r}")


def segment_lungs(image: np.ndarray) -> np.ndarray:
    """Lung fields of a PA chest radiograph: boolean mask of ``image``'s shape (2D, bright = dense).

    Classical pipeline at 256x256: Otsu threshold of the smoothed image inside a frame (6% border excluded),
    an opening (radius 7) whose largest component on each side of the midline seeds that lung; a watershed
    of the gradient between the lung seeds and background seeds (frame, and the brightest 30% of a
    strongly smoothed image: mediastinum, diaphragm, shoulders); opening, closing and hole filling.
    Checked against a hand-drawn reference on the base radiograph (tests/test_real_data.py).
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"segment_lungs needs a 2D image, got shape {image.shape}")
    work = resize(image, (256, 256), order=1, anti_aliasing=True)
    low, high = np.percentile(work, [0.5, 99.5])
    if high <= low:
        raise ValueError("segment_lungs: the image is constant")
    work = np.clip((work - low) / (high - low), 0, 1)
    n = work.shape[0]
    frame = np.zeros(work.shape, dtype=bool)
    border = int(0.06 * n)
    frame[border:-border, border:-border] = True
    smooth = filters.gaussian(work, 2)
    dark = (smooth < filters.threshold_otsu(smooth[frame])) & frame
    cores = measure.label(morphology.opening(dark, morphology.disk(7)))
    markers = np.zeros(work.shape, dtype=np.int32)
    for side, label in ((0, 2), (1, 3)):
        candidates = [p for p in measure.regionprops(cores) if (p.centroid[1] < n / 2) == (side == 0)]
        if not candidates:
            raise ValueError("segment_lungs: no dark lung field found on one side of the image")
        core = cores == max(candidates, key=lambda p: p.area).label
        markers[morphology.erosion(core, morphology.disk(3))] = label
    broad = filters.gaussian(work, 8)
    markers[(markers == 0) & ((broad > np.quantile(broad[frame], 0.7)) | ~frame)] = 1
    basins = segmentation.watershed(filters.sobel(filters.gaussian(work, 1)), markers)
    lungs = np.zeros(work.shape, dtype=bool)
    for label in (2, 3):
        lung = morphology.closing(morphology.opening(basins == label, morphology.disk(2)), morphology.disk(5))
        lungs |= ndimage.binary_fill_holes(lung)
    return resize(lungs.astype(np.float32), image.shape, order=1) > 0.5


@lru_cache(maxsize=1)
def chest_base() -> tuple[np.ndarray, np.ndarray]:
    """The base radiograph and its lung fields at 1024x1024: ``(image float32 in [0, 1], lungs bool)``."""
    array, _ = read_image(chest_radiograph_file())  # MONOCHROME1 already inverted by read_image
    low, high = np.percentile(array, [0.5, 99.5])
    array = np.clip((array - low) / (high - low), 0, 1)
    rows, cols = array.shape
    pad = rows - cols
    if pad > 0:
        array = np.pad(array, ((0, 0), (pad // 2, pad - pad // 2)), mode="edge")
    elif pad < 0:
        array = np.pad(array, ((-pad // 2, -pad - (-pad // 2)), (0, 0)), mode="edge")
    image = resize(array, (RSNA_SIZE, RSNA_SIZE), order=1, anti_aliasing=True).astype(np.float32)
    return image, segment_lungs(image)


@lru_cache(maxsize=1)
def _centred_grid(n: int) -> np.ndarray:
    """(2, n, n) float64 row and column coordinates of an n x n grid about its centre (read-only)."""
    grid = np.stack(np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij"))
    centred = grid - (n - 1) / 2.0
    centred.flags.writeable = False
    return centred


@lru_cache(maxsize=1)
def _field_labels() -> tuple[float, ...]:
    """The labels (> 0) of the eroded lung fields of :func:`_lung_fields`, ascending."""
    return tuple(float(k) for k in np.unique(_lung_fields()[1]) if k > 0)


@lru_cache(maxsize=1)
def _lung_fields() -> tuple[np.ndarray, np.ndarray]:
    """Base-grid helpers: the soft lung weight (1 inside, fading over ~12 px) and the eroded lungs labelled 1, 2.

    Opacities are faded by the weight; their centres are drawn in the eroded fields (3% of the side inside).
    """
    _, lungs = chest_base()
    fade = np.clip(ndimage.gaussian_filter(lungs.astype(np.float32), 6) * 2 - 0.5, 0, 1).astype(np.float32)
    inner = ndimage.distance_transform_edt(lungs) > 0.03 * RSNA_SIZE
    fields_left_right = ndimage.label(inner)[0].astype(np.float32)
    return fade, fields_left_right


def _lobulated_blob(rng: np.random.Generator, shape: tuple[int, int], centre, radii, angle: float) -> np.ndarray:
    """Soft opacity profile in [0, 1] on ``shape``: a rotated ellipse with a wavy border and a 30% soft rim,
    times a patchy texture; computed in the window around ``centre`` where it can be non-zero."""
    reach = int(math.ceil(1.3 * max(radii))) + 2
    box = tuple(slice(max(0, int(c) - reach), min(s, int(c) + reach + 1)) for c, s in zip(centre, shape))
    window = tuple(b.stop - b.start for b in box)
    rows, cols = np.ogrid[box[0], box[1]]
    dy, dx = rows - centre[0], cols - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    theta = np.arctan2(v / radii[1], u / radii[0])
    harmonics = rng.normal(0, 0.05, size=(3, 2))
    wobble = 1 + sum(a * np.cos((k + 2) * theta) + b * np.sin((k + 2) * theta) for k, (a, b) in enumerate(harmonics))
    distance = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2) / wobble
    profile = np.clip((1.0 - distance) / 0.3, 0.0, 1.0)
    profile = profile * profile * (3 - 2 * profile)  # smoothstep
    texture = smooth_random_field(window, int(rng.integers(4, 8)), rng)[0]
    blob = np.zeros(shape, dtype=np.float64)
    blob[box] = profile * np.clip(0.7 + 0.25 * texture, 0.2, 1.0)
    return blob


def chest_xray_subject(
    opacity: bool,
    rng: np.random.Generator | None = None,
    preset: ChestPreset = PRESETS["train"],
    with_lungs: bool = True,
    **variation,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]], np.ndarray | None]:
    """One 1024x1024 subject: ``(image, mask, boxes, lungs)``.

    ``image`` float32 in [0, 1] (bright = dense); ``mask`` bool, the pixels the opacities changed (empty when
    ``opacity`` is False); ``boxes`` ``[(x, y, width, height)]``, one per opacity (bounding box of the mask
    pixels where that opacity added the most, end-exclusive: the boxes' union covers the mask); ``lungs`` the
    deformed lung fields (None with ``with_lungs=False``, which saves one resampling of the whole image).
    ``variation``: :class:`ChestVariation`.
    """
    try:
        params = ChestVariation(**variation)
    except TypeError:
        unknown = sorted(set(variation) - {f.name for f in fields(ChestVariation)})
        raise ValueError(
            f"unknown variation parameter(s) {unknown}; expected {[f.name for f in fields(ChestVariation)]}"
        ) from None
    if not isinstance(preset, ChestPreset):
        raise TypeError(f"preset must be a ChestPreset, got {type(preset).__name__}")
    rng = np.random.default_rng() if rng is None else rng
    base, base_lungs = chest_base()
    n = RSNA_SIZE
    shape = (n, n)

    angle = math.radians(rng.uniform(-params.rotation_deg, params.rotation_deg))
    scale = rng.uniform(1 - params.scale_jitter, 1 + params.scale_jitter) * rng.uniform(
        1 - params.scale_jitter / 2, 1 + params.scale_jitter / 2, size=2
    )
    shift = rng.uniform(-params.shift, params.shift, size=2) * n
    coarse_shape = (n // 8, n // 8)
    displacement = smooth_random_field(coarse_shape, 5, rng, components=2) * params.deform * n
    gamma = rng.uniform(*params.gamma)
    gain = rng.uniform(*params.gain)
    offset = rng.uniform(-params.offset, params.offset)
    log_bias = smooth_random_field(coarse_shape, 3, rng)[0] * params.bias
    noise = rng.normal(size=shape)

    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale[:, None]
    points = np.tensordot(rotation, _centred_grid(n), axes=1) + (n - 1) / 2.0 + shift[:, None, None]
    points += np.stack([separable_zoom(d, shape, order=1) for d in displacement])
    image = ndimage.map_coordinates(base, points, order=1, mode="nearest")
    lungs = None
    if with_lungs:
        lungs = ndimage.map_coordinates(base_lungs.astype(np.float32), points, order=1, mode="constant") > 0.5
    bias = np.exp(separable_zoom(log_bias, shape, order=1))
    clean = np.clip(gain * np.power(np.clip(image, 0, 1), gamma) * bias + offset, 0.0, 1.0)

    boxes: list[tuple[int, int, int, int]] = []
    unchanged = clean
    if opacity:
        fade, fields_left_right = _lung_fields()
        lung_fade = ndimage.map_coordinates(fade, points, order=1, mode="constant")
        fields_left_right = ndimage.map_coordinates(fields_left_right, points, order=0, mode="constant")
        in_field = {side: np.flatnonzero(fields_left_right == side) for side in _field_labels()}
        sides = [side for side, pixels in in_field.items() if pixels.size]
        if not sides:
            raise RuntimeError("no lung field left after deformation; lower the deformation")
        count = int(rng.integers(preset.opacities[0], preset.opacities[1] + 1))
        contributions = []
        for _ in range(count):
            candidates = in_field[sides[int(rng.integers(len(sides)))]]  # the field's pixels in row-major order
            centre = np.array(np.unravel_index(candidates[int(rng.integers(len(candidates)))], shape))
            radii = rng.uniform(*preset.radius, size=2) * n
            alpha = _lobulated_blob(rng, shape, centre, radii, rng.uniform(0, math.pi)) * lung_fade
            brighter = clean + rng.uniform(*preset.contrast) * alpha * (1.0 - clean)
            contributions.append(brighter - clean)
            clean = brighter
    mask = clean - unchanged > params.mask_tolerance
    if opacity:
        if not mask.any():
            raise RuntimeError("the opacities changed no pixel; raise the preset's contrast or radius")
        changed_rows, changed_cols = np.nonzero(mask)
        # each changed pixel belongs to its main opacity
        owner = np.argmax(np.stack([c[changed_rows, changed_cols] for c in contributions]), axis=0)
        for k in range(len(contributions)):
            rows, cols = changed_rows[owner == k], changed_cols[owner == k]
            if len(rows):
                boxes.append(
                    (
                        int(cols.min()),
                        int(rows.min()),
                        int(cols.max() - cols.min() + 1),
                        int(rows.max() - rows.min() + 1),
                    )
                )
    image = np.clip(clean + params.noise_std * noise, 0.0, 1.0)
    return image.astype(np.float32), mask, boxes, lungs


def _downsample(array: np.ndarray, size: int) -> np.ndarray:
    return resize(array.astype(np.float32), (size, size), order=1, anti_aliasing=True).astype(np.float32)


def _class_counts(preset: ChestPreset, per_class: int) -> dict[str, int]:
    """``per_class`` Normal and ``per_class`` Lung Opacity images."""
    return {"Normal": per_class, "Lung Opacity": per_class}


DATASET_SPEC = DatasetSpec(
    name="chest-xray",
    presets=PRESETS,
    preset_type=ChestPreset,
    subtype_counts=_class_counts,
    default_size={2: 256},
    max_size=RSNA_SIZE,
    progress_label="chest X-ray",
    draw_id=deterministic_uuid,
)


def generate_chest_xray(
    out_dir: str | os.PathLike,
    preset: str | ChestPreset = "train",
    dim: int = 2,
    size: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
    compress: bool = True,
) -> Path:
    """Write a chest X-ray opacity data set (RSNA layout + manifest) under ``out_dir``; return the manifest path.

    ``preset``: a name in :data:`PRESETS` or a :class:`ChestPreset` (named ``custom``); ``dim`` must be 2;
    ``size``: side of the manifest's NIfTI copies (default 256; the DICOM files are always 1024x1024);
    ``compress``: JPEG baseline DICOM as the challenge's files (default) or uncompressed. Patient ids are
    UUIDs drawn from the seed; sex, age and view (PA 70%, AP 30%) are drawn per subject. Identical
    arguments give identical files.
    """
    request = DATASET_SPEC.resolve(preset, dim, size, per_class, seed)
    out_dir = Path(out_dir)
    records = []

    def make_subject(class_name: str, rng: np.random.Generator, patient_id: str) -> Subject:
        """Write the subject's RSNA files (DICOM, full-resolution mask, table record); return its ``size`` copy."""
        sex, age, view = (
            ("F", "M")[int(rng.integers(2))],
            int(rng.integers(18, 90)),
            ("PA" if rng.random() < 0.7 else "AP"),
        )
        image, mask, boxes, _ = chest_xray_subject(class_name == "Lung Opacity", rng, request.preset, with_lungs=False)
        pixels = np.round(image * 255).astype(np.uint8)
        write_rsna_dicom(
            out_dir / IMAGE_DIR / f"{patient_id}.dcm", pixels, patient_id, sex, age, view, compress=compress
        )
        records.append({"patientId": patient_id, "class": class_name, "boxes": boxes})
        small_image = _downsample(pixels / 255.0, request.size)
        if not boxes:
            return Subject(CLASS_LABELS[class_name], class_name, small_image)
        write_nifti(mask, out_dir / "masks_1024" / f"{patient_id}.nii.gz")
        small_mask = _downsample(mask, request.size) >= 0.5
        return Subject(CLASS_LABELS[class_name], class_name, small_image, masks={"mask": small_mask})

    def write_tables() -> None:
        write_rsna_tables(out_dir, records)

    return write_dataset(out_dir, request, make_subject, f"chest-xray/{request.preset_name}", progress, write_tables)
