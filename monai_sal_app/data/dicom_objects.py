"""Saliency maps written as DICOM objects that belong to the study of the image they explain.

:func:`saliency_objects` makes, for one map on the grid of a DICOM image (as :func:`.io.read_image`
reads it: a series of slices, a multi-frame CT or MR file, or a single-frame CR, DX or other 2D
image):

- a **Parametric Map** (highdicom): the raw map as float32 frames, one per source slice, with a Real
  World Value Mapping (identity, no units, the map's range), the method and the class in its labels
  (content label and description, the mapping's label and explanation, the series description), the
  source's patient, study and Frame of Reference, its geometry (orientation, pixel spacing, each
  frame's ImagePositionPatient) and a reference to the source series and images;
- optionally an RGB **Secondary Capture** overlay per source slice (the image in grey, the map's
  positive part in colour), for viewers that do not show Parametric Maps.

A 2D image without patient geometry (a DX or CR has ImagerPixelSpacing, and usually neither
ImagePositionPatient nor a Frame of Reference) is placed where ITK, and so 3D Slicer, places it (the
affine ``read_image`` gives); an image without a Frame of Reference gets one of its own in the map,
since a Parametric Map must have one.

highdicom 0.22.x is used: the last release that works with pydicom 2, which MONAI Label 0.8.5 needs.
It is imported when a map is written, so that the rest of the package does not need it.
"""

from __future__ import annotations

import copy
import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from monai_sal_app.data.io import read_image
from monai_sal_app.files import atomic_path
from monai_sal_app.version import __version__

__all__ = [
    "SaliencyDescription",
    "is_dicom_image",
    "saliency_objects",
    "write_dicom_objects",
    "write_maps_as_dicom",
]

MANUFACTURER = "monai-sal"
PARAMETRIC_MAP_SERIES_NUMBER = 9701
OVERLAY_SERIES_NUMBER = 9702
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS
# Type 2 attributes of the source that highdicom copies: present (empty) when the source lacks them.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class SaliencyDescription:
    """What a map shows: ``method`` (a registered name), the explained class ``label`` and its
    ``probability`` (0-1), and the ``model``'s name."""

    method: str
    label: str
    probability: float
    model: str

    def text(self, limit: int = 64) -> str:
        """One line for DICOM LO fields (at most ``limit`` characters)."""
        return f"{self.method} saliency, class {self.label} (p={self.probability:.3f}), {self.model}"[:limit]

    def code_string(self) -> str:
        """The method as a DICOM CS value (upper case, digits, underscore; at most 16 characters)."""
        return "".join(c if c.isalnum() else "_" for c in self.method.upper())[:16]


def _highdicom():
    try:
        import highdicom
    except ImportError as error:
        raise RuntimeError("writing DICOM objects needs highdicom 0.22 (pip install 'monai-sal[dicom]')") from error
    return highdicom


def _source_datasets(meta: dict) -> list[Dataset]:
    """The source files of an image (``meta["sources"]``), headers only, each file once, in slice order."""
    files = list(dict.fromkeys(file for file, _ in meta["sources"]))
    return [pydicom.dcmread(file, stop_before_pixels=True) for file in files]


def _geometry(meta: dict, n_planes: int) -> tuple[list[float], list[np.ndarray], tuple[float, float], float]:
    """(ImageOrientationPatient, ImagePositionPatient per plane, (row, column) spacing, slice spacing)
    of an image's array from its RAS affine (axes (slice, row, col) or (row, col))."""
    lps = _LPS @ np.asarray(meta["affine"], dtype=float)
    row_axis, col_axis = (1, 2) if n_planes > 1 or len(meta["spatial_shape"]) == 3 else (0, 1)
    down, across = lps[:3, row_axis], lps[:3, col_axis]  # one step down a column, one step along a row
    row_spacing, col_spacing = float(np.linalg.norm(down)), float(np.linalg.norm(across))
    orientation = [*(across / col_spacing), *(down / row_spacing)]
    positions = [np.asarray(p, dtype=float) for p in meta["positions"]] if "positions" in meta else [lps[:3, 3]]
    slice_spacing = float(np.linalg.norm(lps[:3, 0])) if len(meta["spatial_shape"]) == 3 else 1.0
    return [round(v, 8) + 0.0 for v in orientation], positions, (row_spacing, col_spacing), slice_spacing


def _fill_type2(ds: Dataset) -> None:
    """Give ``ds`` the type 2 attributes highdicom copies from a source, empty where it lacks them."""
    for keyword in _TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, None)


def _for_highdicom(source: Dataset, orientation, position, spacing, thickness) -> Dataset:
    """A copy of a single-frame source header with what highdicom reads present: patient geometry
    (where the source has none: the array's, as ITK places it) and the type 2 attributes it copies."""
    ds = copy.deepcopy(source)
    _fill_type2(ds)
    if "FrameOfReferenceUID" not in ds:
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    if "ImageOrientationPatient" not in ds:
        ds.ImageOrientationPatient = list(orientation)
    if "ImagePositionPatient" not in ds:
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
    if "PixelSpacing" not in ds:
        ds.PixelSpacing = [_ds_number(v) for v in spacing]
    if "SliceThickness" not in ds or ds.SliceThickness in (None, ""):
        ds.SliceThickness = _ds_number(thickness)
    return ds


def _plane_arrays(saliency: np.ndarray) -> np.ndarray:
    """The map as planes (n, rows, cols)."""
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.ndim == 2:
        return saliency[None]
    if saliency.ndim != 3:
        raise ValueError(f"a saliency map of shape {saliency.shape} cannot be written as DICOM: expected 2D or 3D")
    return saliency


def _ds_number(value: float) -> float:
    """``value`` rounded to fit a DICOM DS value (16 characters)."""
    return float(f"{value:.10g}")


def _parametric_map(hd, sources, planes, meta, description):
    orientation, positions, spacing, slice_spacing = _geometry(meta, planes.shape[0])
    if len(positions) != planes.shape[0]:
        raise ValueError(f"the map has {planes.shape[0]} planes, the image {len(positions)}")
    coordinates = hd.CoordinateSystemNames.PATIENT
    multiframe = len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1
    if multiframe:  # the map's planes in the file's frame order, at the file's own plane positions
        source_images = [copy.deepcopy(sources[0])]
        _fill_type2(source_images[0])
        stored = np.empty_like(planes)
        for plane, (_, frame) in zip(planes, meta["sources"]):
            stored[frame] = plane
        planes, geometry = stored, {}
    else:
        source_images = [
            _for_highdicom(s, orientation, positions[k], spacing, slice_spacing) for k, s in enumerate(sources)
        ]
        geometry = {
            "plane_orientation": hd.PlaneOrientationSequence(coordinates, orientation),
            "plane_positions": [hd.PlanePositionSequence(coordinates, [_ds_number(v) for v in p]) for p in positions],
        }
    low, high = float(planes.min()), float(planes.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=description.method[:16],
        lut_explanation=description.text(),
        unit=hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units"),
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
    )
    parametric_map = hd.pm.ParametricMap(
        source_images=source_images,
        pixel_array=planes,
        series_instance_uid=hd.UID(),
        series_number=PARAMETRIC_MAP_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=description.model[:64] or MANUFACTURER,
        software_versions=f"monai-sal {__version__}",
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        window_center=(low + high) / 2,
        window_width=max(high - low, 1e-6),
        content_label=description.code_string() or "SALIENCY",
        content_description=description.text(),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=[_ds_number(v) for v in spacing],
            slice_thickness=_ds_number(slice_spacing),
            spacing_between_slices=_ds_number(slice_spacing),
        ),
        series_description=description.text(),
        **geometry,
    )
    parametric_map.Laterality = None  # type 2C: unknown (the source's body part is not copied)
    # a map's range is often far below 1: a linear window narrower than 1 needs LINEAR_EXACT
    parametric_map.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0].VOILUTFunction = "LINEAR_EXACT"
    return parametric_map


def _patient_orientation(direction: Sequence[float]) -> str:
    """The DICOM PatientOrientation letter of an LPS direction's strongest axis ("L", "R", "P", "A",
    "H" or "F"; highdicom takes one letter per direction)."""
    axis = int(np.argmax(np.abs(direction)))
    return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if direction[axis] > 0 else 1]


def overlay_rgb(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """An RGB uint8 picture (rows, cols, 3) of a 2D ``image`` (grey, 1st-99th percentile window) under
    its ``saliency`` map's positive part (inferno colours, opacity rising with the value)."""
    from matplotlib import colormaps

    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1)[..., None]
    positive = np.clip(saliency, 0, None)
    peak = float(positive.max())
    weight = positive / peak if peak > 0 else np.zeros_like(positive)
    colour = colormaps["inferno"](weight)[..., :3]
    alpha = 0.6 * weight[..., None]
    return np.round(255 * ((1 - alpha) * grey + alpha * colour)).astype(np.uint8)


def _overlays(hd, sources, image, planes, meta, description):
    orientation, _, spacing, _ = _geometry(meta, planes.shape[0])
    images = image[None] if image.ndim == 2 else image
    series_uid = hd.UID()
    reference = _for_highdicom(sources[0], orientation, (0, 0, 0), spacing, 1.0)
    overlays = []
    for k in range(planes.shape[0]):
        overlay = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=reference,
            pixel_array=overlay_rgb(images[k], planes[k]),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=OVERLAY_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=k + 1,
            manufacturer=MANUFACTURER,
            pixel_spacing=tuple(_ds_number(v) for v in spacing),
            patient_orientation=(
                _patient_orientation(orientation[:3]),
                _patient_orientation(orientation[3:]),
            ),
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            series_description=f"{description.text(48)} overlay",
        )
        overlay.Laterality = None  # type 2C: unknown
        overlays.append(overlay)
    return overlays


def saliency_objects(
    image: np.ndarray, meta: dict, saliency: np.ndarray, description: SaliencyDescription, overlay: bool = False
) -> list[Dataset]:
    """The DICOM objects of ``saliency`` (the map on ``image``'s grid) for the DICOM image ``image``,
    ``meta`` as :func:`.io.read_image` returned them: ``[parametric map]``, then with ``overlay``
    one RGB Secondary Capture per slice (module docstring).

    Raises ``ValueError`` when the image is not DICOM or the map is not on its grid.
    """
    if not str(meta.get("format", "")).startswith("dicom") or "sources" not in meta:
        raise ValueError(
            f"DICOM objects are written for DICOM images only (this image is {meta.get('format', 'unknown')})"
        )
    if tuple(np.shape(saliency)) != tuple(np.shape(image)):
        raise ValueError(f"the map's shape {np.shape(saliency)} differs from the image's {np.shape(image)}")
    hd = _highdicom()
    sources = _source_datasets(meta)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword not in sources[0]:
            raise ValueError(f"{meta['sources'][0][0]}: no {keyword}, so a map cannot join its study")
    planes = _plane_arrays(saliency)
    objects = [_parametric_map(hd, sources, planes, meta, description)]
    if overlay:
        objects += _overlays(hd, sources, np.asarray(image, dtype=np.float32), planes, meta, description)
    return objects


def write_dicom_objects(objects: Sequence[Dataset], folder: str | os.PathLike) -> list[Path]:
    """Write ``objects`` into ``folder`` as ``<Modality>_<SOPInstanceUID>.dcm`` (parametric map: ``PM``,
    overlay: ``SC``), each file whole or not at all; returns the paths."""
    folder = Path(folder)
    paths = []
    for ds in objects:
        kind = "PM" if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" else "SC"
        path = folder / f"{kind}_{ds.SOPInstanceUID}.dcm"
        with atomic_path(path, ".dcm") as temporary:
            ds.save_as(str(temporary), write_like_original=False)
        paths.append(path)
    return paths


def write_maps_as_dicom(
    maps_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    labels: Sequence[str],
    model: str,
    overlay: bool = False,
) -> list[Path]:
    """The DICOM objects of every map listed in ``maps_csv`` (as ``monai-sal explain`` writes it:
    columns ``id``, ``image``, ``map``, ``method``, ``target``, ``probability``) whose image is DICOM,
    written to ``out_dir/<id>/<method>/`` (:func:`write_dicom_objects`); ``labels``: the model's class
    names (``target`` is an index); ``model``: its name. Rows with an ``error`` (an image that could
    not be explained: no map) are left out. Returns the paths written."""
    with open(maps_csv, newline="") as f:
        rows = [row for row in csv.DictReader(f) if not row.get("error")]
    written = []
    for row in rows:
        image, meta = read_image(row["image"])
        saliency, _ = read_image(row["map"], allow_constant=True)
        description = SaliencyDescription(row["method"], labels[int(row["target"])], float(row["probability"]), model)
        objects = saliency_objects(image, meta, saliency.reshape(image.shape), description, overlay=overlay)
        written += write_dicom_objects(objects, Path(out_dir) / row["id"] / row["method"])
    return written


def is_dicom_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file or a folder of DICOM files (read from the headers)."""
    path = Path(path)
    if path.is_dir():
        return any(_is_dicom_file(p) for p in path.iterdir() if p.is_file())
    return _is_dicom_file(path)


def _is_dicom_file(path: Path) -> bool:
    try:
        pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM: every parser error means the same here
        return False
    return True
