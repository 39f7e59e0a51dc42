"""Reading and writing images with clear errors (NIfTI, NRRD, PNG/JPEG, DICOM).

Every reader returns ``(array, meta)``: a float32 array and ``meta = {"affine": (4, 4) array mapping
array indices to millimetres, "spatial_shape": tuple, "format": str}``. Array axes:

- NIfTI: nibabel's array axes (i, j, k), trailing singleton axes dropped (a 2D image saved as
  (H, W, 1) reads as (H, W)); the affine is the file's (RAS+, mm).
- NRRD (through ITK): numpy order of ITK's buffer, i.e. (z, y, x) or (y, x); the affine maps those
  axes to RAS+ mm (ITK's LPS direction, spacing and origin converted).
- PNG/JPEG and DICOM: (rows, cols); the affine is the identity, with the DICOM PixelSpacing (mm)
  on the diagonal when present.

Anything wrong with an image (unknown type, corrupt file, NaN/inf, empty, constant) raises
:class:`ImageError`, a ``ValueError`` whose message starts with the file's path.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

__all__ = ["SUPPORTED_SUFFIXES", "ImageError", "check_image", "read_image", "write_nifti"]

SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".dcm")
_DICOM_MAGIC_OFFSET = 128


class ImageError(ValueError):
    """An image file or array that cannot be used: unreadable, unsupported, NaN/inf, empty or constant."""


def check_image(array: np.ndarray, name: str = "image", allow_constant: bool = False) -> None:
    """Raise :class:`ImageError` if ``array`` is empty, has NaN/inf values or (unless allowed) is constant.

    ``name`` starts the message (a path or an id). Masks and saliency maps may legitimately be constant
    (an empty mask, an all-zero map): pass ``allow_constant=True`` for them.
    """
    array = np.asarray(array)
    if array.size == 0:
        raise ImageError(f"{name}: image is empty (shape {array.shape})")
    if array.dtype.kind not in "biuf":
        raise ImageError(f"{name}: pixel type {array.dtype} is not numeric")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            n_nan = int(np.isnan(array).sum())
            raise ImageError(f"{name}: image has {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values")
    if not allow_constant:
        low, high = array.min(), array.max()
        if low == high:
            raise ImageError(f"{name}: image is constant (every value is {low.item()!r})")


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nii.gz", ".nii")):
        return "nifti"
    if name.endswith(".nrrd"):
        return "nrrd"
    if name.endswith(".png"):
        return "png"
    if name.endswith((".jpg", ".jpeg")):
        return "jpeg"
    if name.endswith(".dcm"):
        return "dicom"
    with open(path, "rb") as f:
        f.seek(_DICOM_MAGIC_OFFSET)
        if f.read(4) == b"DICM":
            return "dicom"
    suffix = "".join(path.suffixes[-2:]) or "(none)"
    raise ImageError(
        f"{path}: unsupported image type (suffix {suffix}, no DICOM preamble); supported: {', '.join(SUPPORTED_SUFFIXES)} "
        "or a DICOM file without suffix"
    )


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    array = np.asarray(image.get_fdata(dtype=np.float32))
    while array.ndim > 2 and array.shape[-1] == 1:  # e.g. a 2D image saved as (H, W, 1)
        array = array[..., 0]
    return array, np.asarray(image.affine, dtype=np.float64)


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import itk

    image = itk.imread(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()} components per pixel; expected a scalar image"
        )
    array = np.array(itk.array_view_from_image(image), dtype=np.float32)  # (z, y, x) or (y, x)
    n = array.ndim
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64).reshape(n, n)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    index_to_lps = direction * spacing  # columns: ITK index axes (x, y[, z])
    affine = np.eye(4)
    affine[:n, :n] = index_to_lps[:, ::-1]  # columns reordered to numpy axes (.., y, x)
    affine[:n, 3] = origin
    affine[:2, :] *= -1  # LPS -> RAS
    if n == 3 and array.shape[0] == 1:  # a single slice saved as 3D: keep (y, x), z column moves last
        array = array[0]
        affine = affine[:, [1, 2, 0, 3]]
    return array, affine


def _read_pil(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image, dtype=np.float32)
        else:
            array = np.asarray(image.convert("L"), dtype=np.float32)
    return array, np.eye(4)


def _read_dicom(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pydicom
    from pydicom.pixel_data_handlers.util import apply_modality_lut

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise ImageError(f"{path}: DICOM file has no pixel data")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ImageError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames); expected a single 2D image")
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise ImageError(f"{path}: colour DICOM ({ds.SamplesPerPixel} samples per pixel); expected a grayscale image")
    array = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)  # RescaleSlope/Intercept
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        array = array.max() + array.min() - array  # bright = high value, as in MONOCHROME2
    affine = np.eye(4)
    spacing = getattr(ds, "PixelSpacing", None)  # [row spacing, column spacing] in mm
    if spacing is not None and len(spacing) == 2:
        affine[0, 0], affine[1, 1] = float(spacing[0]), float(spacing[1])
    return array, affine


_READERS = {"nifti": _read_nifti, "nrrd": _read_nrrd, "png": _read_pil, "jpeg": _read_pil, "dicom": _read_dicom}


def read_image(path: str | os.PathLike, allow_constant: bool = False) -> tuple[np.ndarray, dict]:
    """Read a 2D or 3D image as float32.

    Returns ``(array, meta)``, ``meta = {"affine": (4, 4) float64, "spatial_shape": tuple,
    "format": "nifti" | "nrrd" | "png" | "jpeg" | "dicom"}`` (axes: see the module docstring).
    Raises :class:`ImageError` (missing file, unsupported type, corrupt file, not 2D/3D, NaN/inf,
    empty, or constant unless ``allow_constant``).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, expected an image file")
    fmt = _format_of(path)
    try:
        array, affine = _READERS[fmt](path)
    except ImageError:
        raise
    except Exception as err:  # every library has its own exception types for corrupt files
        raise ImageError(f"{path}: cannot read {fmt} file ({type(err).__name__}: {err})") from err
    if array.ndim not in (2, 3):
        raise ImageError(f"{path}: {array.ndim}D image of shape {array.shape}; expected 2D or 3D")
    check_image(array, str(path), allow_constant=allow_constant)
    return array, {"affine": affine, "spatial_shape": tuple(int(s) for s in array.shape), "format": fmt}


def write_nifti(array: np.ndarray, path: str | os.PathLike, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` to ``path`` (.nii or .nii.gz) atomically and return the path.

    Data type: float32, except bool -> uint8 and integer input kept as is (int64/uint64 narrowed
    to int32 when the values fit). ``affine``: (4, 4), default identity (1 mm voxels). The file
    is written under a temporary name in the same folder and renamed, so a failed write never
    leaves a partial file under ``path`` (nor the temporary file). Parent folders are created.
    """
    import nibabel as nib

    path = Path(path)
    name = path.name
    if name.lower().endswith(".nii.gz"):
        suffix = ".nii.gz"
    elif name.lower().endswith(".nii"):
        suffix = ".nii"
    else:
        raise ValueError(f"{path}: a NIfTI file name must end with .nii or .nii.gz")
    array = np.asarray(array)
    if array.size == 0:
        raise ImageError(f"{path}: refusing to write an empty array (shape {array.shape})")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype.kind in "iu":
        if array.dtype.itemsize == 8:
            info = np.iinfo(np.int32)
            if array.min() < info.min or array.max() > info.max:
                raise ImageError(f"{path}: integer values out of int32 range, cannot write as NIfTI integers")
            array = array.astype(np.int32)
    else:
        array = array.astype(np.float32)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be 4x4, got shape {affine.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name[: -len(suffix)]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        nib.save(nib.Nifti1Image(array, affine), str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
