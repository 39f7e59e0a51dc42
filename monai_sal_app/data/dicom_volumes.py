"""DICOM volumes: a series of single-frame slices, or one multi-frame (enhanced) CT or MR file.

Both read as a float32 array ``(slices, rows, cols)`` in modality units (e.g. HU), slices sorted along
the slice normal (the row direction x the column direction) by their ImagePositionPatient, and
``meta``:

- ``affine``: (4, 4) array indices (slice, row, col) -> RAS+ mm;
- ``positions``: (slices, 3) ImagePositionPatient of each array slice (LPS mm, as in the files);
- ``sources``: what each array slice came from: ``[(file, frame)]`` with ``frame`` the 0-based
  frame of a multi-frame file (0 for a single-frame file);
- ``format``: ``"dicom-series"`` or ``"dicom-multiframe"``, and ``series_uid``.

Geometry is the same as ITK's (GDCM's) reading of the files (checked in ``tests/test_dicom_objects.py``).
Errors are ``ValueError`` naming the file and the problem: several series, mixed sizes or
orientations, two slices at one position, slice spacing varying by more than ``max_gap_ratio``
(missing slices), a slice without position or orientation.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixel_data_handlers.util import apply_modality_lut

__all__ = ["find_dicom_series", "is_multiframe", "read_dicom_volume"]


def find_dicom_series(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``{SeriesInstanceUID: [files]}`` of the DICOM images under ``root`` (any depth, any file name).

    Files that are not DICOM (no preamble ``DICM`` and not parseable) or have no image (no Rows) are
    skipped. Raises ``FileNotFoundError`` when there is none.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    series: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Rows"])
        except Exception:  # not DICOM: every parser error means the same here
            continue
        if "SeriesInstanceUID" in ds and "Rows" in ds:
            series[str(ds.SeriesInstanceUID)].append(path)
    if not series:
        raise FileNotFoundError(f"{root}: no DICOM image series found")
    return dict(series)


def is_multiframe(ds) -> bool:
    """True for a dataset with more than one frame."""
    return int(getattr(ds, "NumberOfFrames", 1) or 1) > 1


def _group(ds, frame: int, keyword: str):
    """The first item of functional group ``keyword`` of ``frame``: per-frame, else shared (or None)."""
    for sequence in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(sequence)
        if not groups:
            continue
        item = groups[frame] if sequence.startswith("PerFrame") else groups[0]
        if keyword in item and len(item[keyword].value):
            return item[keyword].value[0]
    return None


def _frame_geometry(ds, frame: int, where: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(orientation (6,), position (3,), (row, column) spacing) of a multi-frame file's frame."""
    orientation, position, measures = (
        _group(ds, frame, k) for k in ("PlaneOrientationSequence", "PlanePositionSequence", "PixelMeasuresSequence")
    )
    if orientation is None or position is None or measures is None or "PixelSpacing" not in measures:
        raise ValueError(
            f"{where}: frame {frame + 1} has no plane orientation, plane position or pixel spacing; "
            "not an enhanced CT or MR volume"
        )
    spacing = tuple(float(v) for v in measures.PixelSpacing)
    return (
        np.asarray([float(v) for v in orientation.ImageOrientationPatient]),
        np.asarray([float(v) for v in position.ImagePositionPatient]),
        spacing,
    )


def _frame_values(ds, frame: int, pixels: np.ndarray) -> np.ndarray:
    """A multi-frame file's stored ``pixels`` of ``frame`` in modality units (its pixel value transformation)."""
    transformation = _group(ds, frame, "PixelValueTransformationSequence")
    slope = float(getattr(transformation, "RescaleSlope", 1.0)) if transformation is not None else 1.0
    intercept = float(getattr(transformation, "RescaleIntercept", 0.0)) if transformation is not None else 0.0
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _volume(
    slices: list[tuple[tuple[str, int], np.ndarray, np.ndarray, tuple[float, float], np.ndarray]],
    where: str,
    max_gap_ratio: float,
    thickness: float,
) -> tuple[np.ndarray, dict]:
    """Stack ``slices`` ((source, orientation, position, spacing, values)) sorted along the normal."""
    _, orientation, _, spacing, first = slices[0]
    for source, o, _, s, values in slices[1:]:
        if values.shape != first.shape:
            raise ValueError(f"{source[0]}: size {values.shape} differs from {first.shape} of the series")
        if not np.allclose(o, orientation, atol=1e-4):
            raise ValueError(f"{source[0]}: orientation differs from the rest of the series")
        if not np.allclose(s, spacing, atol=1e-6):
            raise ValueError(f"{source[0]}: pixel spacing {s} differs from {spacing} of the series")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices = sorted(slices, key=lambda s: float(np.dot(s[2], normal)))
    depths = np.array([float(np.dot(s[2], normal)) for s in slices])
    gaps = np.diff(depths)
    if len(gaps) and gaps.min() <= 1e-6:
        raise ValueError(f"{where}: two slices share one position ({depths[np.argmin(gaps)]:.3f} mm along the normal)")
    slice_spacing = float(np.median(gaps)) if len(gaps) else thickness
    if len(gaps) and np.abs(gaps - slice_spacing).max() > max_gap_ratio * slice_spacing:
        raise ValueError(
            f"{where}: slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm (missing slices?)"
        )
    row_spacing, col_spacing = spacing
    lps = np.eye(4)
    lps[:3, 0] = normal * slice_spacing  # axis 0: slice
    lps[:3, 1] = col_dir * row_spacing  # axis 1: the row index moves along the column direction
    lps[:3, 2] = row_dir * col_spacing  # axis 2: the column index moves along the row direction
    lps[:3, 3] = slices[0][2]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    volume = np.stack([s[4] for s in slices]).astype(np.float32)
    return volume, {
        "affine": affine + 0.0,
        "spatial_shape": tuple(volume.shape),
        "positions": np.stack([s[2] for s in slices]),
        "sources": [s[0] for s in slices],
    }


def _read_multiframe(path: Path, max_gap_ratio: float) -> tuple[np.ndarray, dict]:
    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file has no pixel data")
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{path}: colour DICOM ({ds.SamplesPerPixel} samples per pixel); expected a grayscale image")
    pixels = ds.pixel_array  # (frames, rows, cols)
    slices = []
    for frame in range(pixels.shape[0]):
        orientation, position, spacing = _frame_geometry(ds, frame, str(path))
        slices.append(((str(path), frame), orientation, position, spacing, _frame_values(ds, frame, pixels[frame])))
    measures = _group(ds, 0, "PixelMeasuresSequence")
    thickness = float(getattr(measures, "SliceThickness", 1.0) or 1.0)
    volume, meta = _volume(slices, str(path), max_gap_ratio, thickness)
    return volume, {**meta, "format": "dicom-multiframe", "series_uid": str(ds.SeriesInstanceUID)}


def _read_series(files: Sequence[Path], where: str, max_gap_ratio: float) -> tuple[np.ndarray, dict]:
    slices, series_uid, first = [], None, None
    for path in files:
        ds = pydicom.dcmread(str(path))
        if series_uid is not None and str(ds.SeriesInstanceUID) != series_uid:
            raise ValueError(f"{path}: series {ds.SeriesInstanceUID} differs from {series_uid}")
        series_uid = str(ds.SeriesInstanceUID)
        if is_multiframe(ds):
            raise ValueError(f"{path}: multi-frame file in a series of slices; expected one slice per file")
        try:
            orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            position = np.asarray([float(v) for v in ds.ImagePositionPatient])
            spacing = tuple(float(v) for v in ds.PixelSpacing)
        except AttributeError:
            raise ValueError(
                f"{path}: missing ImageOrientationPatient, ImagePositionPatient or PixelSpacing; not a volume slice"
            ) from None
        values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
        slices.append(((str(path), 0), orientation, position, spacing, values))
        first = first or ds
    thickness = float(getattr(first, "SliceThickness", 1.0) or 1.0)
    volume, meta = _volume(slices, where, max_gap_ratio, thickness)
    return volume, {**meta, "format": "dicom-series", "series_uid": series_uid}


def read_dicom_volume(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    series_uid: str | None = None,
    max_gap_ratio: float = 0.05,
) -> tuple[np.ndarray, dict]:
    """A DICOM volume as ``(float32 array (slices, rows, cols), meta)`` (module docstring).

    ``source``: a folder (its only series, or ``series_uid``), a list of the files of one series,
    or one multi-frame file (also a folder or list holding just that file).
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        groups = find_dicom_series(source)
        if series_uid is None:
            if len(groups) > 1:
                raise ValueError(f"{source}: {len(groups)} series found ({', '.join(sorted(groups))}); pass series_uid")
            series_uid = next(iter(groups))
        if series_uid not in groups:
            raise ValueError(f"{source}: no series {series_uid!r}; found {sorted(groups)}")
        files, where = groups[series_uid], str(source)
    else:
        files = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(f) for f in source]
        if not files:
            raise ValueError("read_dicom_volume: no files given")
        where = str(files[0]) if len(files) == 1 else str(files[0].parent)
    if len(files) == 1 and is_multiframe(pydicom.dcmread(str(files[0]), stop_before_pixels=True)):
        return _read_multiframe(files[0], max_gap_ratio)
    return _read_series(files, where, max_gap_ratio)
