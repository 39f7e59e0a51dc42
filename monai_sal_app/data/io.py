"""Reading and writing images with clear errors (NIfTI, NRRD, PNG/JPEG, DICOM).

Every reader returns ``(array, meta)``: a float32 array and ``meta = {"affine": (4, 4) array mapping
array indices to millimetres, "spatial_shape": tuple, "format": str}``. Array axes:

- NIfTI: nibabel's array axes (i, j, k), trailing singleton axes dropped (a 2D image saved as
  (H, W, 1) reads as (H, W)); the affine is the file's (RAS+, mm).
- NRRD (through ITK): numpy order of ITK's buffer, i.e. (z, y, x) or (y, x); the affine maps those
  axes to RAS+ mm (ITK's LPS direction, spacing and origin converted).
- PNG/JPEG and single-frame DICOM: (rows, cols); the affine puts each pixel where ITK's reader of
  the file's header, and so 3D Slicer, puts it: pixel (row r, column c) at RAS (-c, -r, 0) for a PNG
  without a recorded resolution; DICOM with its position, orientation and the spacing GDCM chooses
  (ImagerPixelSpacing for CR and DX).
- DICOM volumes, a folder holding one series of slices or one multi-frame (enhanced) CT or MR file:
  (slices, rows, cols) sorted along the slice normal (:mod:`.dicom_volumes`); their ``meta`` also has
  ``positions`` and ``sources``, which DICOM objects derived from the image reference.

Anything wrong with an image (unknown type, corrupt file, NaN/inf, empty, constant) raises
:class:`ImageError`, a ``ValueError`` whose message starts with the file's path.

Size before decoding: :func:`declared_shape` reads only a file's header (NIfTI and NRRD headers,
PNG/JPEG dimensions, DICOM rows x columns x frames), so that ``read_image(..., max_voxels=...)``
refuses an image too large for the caller (:class:`ImageTooLarge`) before reading its pixels, and
a compressed NIfTI or NRRD whose data inflates past the size its header declares is refused after
inflating one byte more than that, never decoded to its end.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixel_data_handlers.util import apply_modality_lut

from monai_sal_app.data.dicom_volumes import find_dicom_series, is_multiframe, read_dicom_volume
from monai_sal_app.files import atomic_path

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ImageError",
    "ImageTooLarge",
    "check_image",
    "declared_shape",
    "read_image",
    "write_nifti",
]

SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".dcm")
_DICOM_MAGIC_OFFSET = 128


class ImageError(ValueError):
    """An image file or array that cannot be used: unreadable, unsupported, NaN/inf, empty or constant."""


class ImageTooLarge(ImageError):
    """An image whose header declares more voxels than the caller accepts (nothing was decoded)."""


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


_NRRD_HEADER_BYTES = 1 << 16  # an NRRD header is text lines up to the first empty line
_NRRD_SIZES = re.compile(rb"^sizes:\s*([0-9 \t]+)$", re.MULTILINE)
_NRRD_ENCODING = re.compile(rb"^encoding:\s*(\S+)", re.MULTILINE)
_NRRD_TYPE_BYTES = {
    b"uchar": 1, b"unsigned char": 1, b"uint8": 1, b"uint8_t": 1, b"signed char": 1, b"int8": 1, b"int8_t": 1,
    b"char": 1, b"short": 2, b"short int": 2, b"signed short": 2, b"int16": 2, b"int16_t": 2, b"ushort": 2,
    b"unsigned short": 2, b"uint16": 2, b"uint16_t": 2, b"int": 4, b"signed int": 4, b"int32": 4, b"int32_t": 4,
    b"uint": 4, b"unsigned int": 4, b"uint32": 4, b"uint32_t": 4, b"float": 4, b"double": 8, b"longlong": 8,
    b"int64": 8, b"int64_t": 8, b"ulonglong": 8, b"uint64": 8, b"uint64_t": 8,
}  # fmt: skip


def _nrrd_header(path: Path) -> tuple[bytes, int]:
    """(header text, offset of the data) of an attached-data NRRD file."""
    with open(path, "rb") as f:
        head = f.read(_NRRD_HEADER_BYTES)
    if not head.startswith(b"NRRD"):
        raise ImageError(f"{path}: cannot read the nrrd header (no NRRD magic)")
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None:
        raise ImageError(f"{path}: cannot read the nrrd header (longer than {_NRRD_HEADER_BYTES} bytes, or no data)")
    return head[: end.start()], end.end()


def declared_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The array shape an image file's header declares, read without decoding its pixels.

    NIfTI: the header's dimensions; NRRD: ``sizes``; PNG/JPEG: (rows, cols) (plus channels when
    there are several); DICOM: (frames, rows, cols) for multi-frame files, else (rows, cols); a
    folder of DICOM slices: (files, rows, cols).
    Raises :class:`ImageError` for an unsupported or unreadable header.
    """
    path = Path(path)
    if path.is_dir():
        files = _dicom_folder_files(path)
        if len(files) == 1:
            return declared_shape(files[0])
        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        return (len(files), int(ds.Rows), int(ds.Columns))
    fmt = _format_of(path)
    try:
        if fmt == "nifti":
            return tuple(int(s) for s in nib.load(str(path)).shape)
        if fmt == "nrrd":
            header, _ = _nrrd_header(path)
            sizes = _NRRD_SIZES.search(header)
            if sizes is None:
                raise ImageError(f"{path}: cannot read the nrrd header (no 'sizes' field)")
            return tuple(int(s) for s in sizes.group(1).split())[::-1]  # numpy order
        if fmt in ("png", "jpeg"):
            with Image.open(path) as image:  # reads the header only
                bands = len(image.getbands())
                return (image.height, image.width) + ((bands,) if bands > 1 else ())

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        return ((frames,) if frames > 1 else ()) + (int(ds.Rows), int(ds.Columns))
    except ImageError:
        raise
    except Exception as err:  # each library has its own exception types for corrupt headers
        raise ImageError(f"{path}: cannot read the {fmt} header ({type(err).__name__}: {err})") from err


def _check_declared_size(path: Path, max_voxels: Mapping[int, int]) -> None:
    shape = declared_shape(path)
    spatial = tuple(s for s in shape if s != 1) or (1,)
    dims = 2 if len(spatial) <= 2 else 3
    limit = max_voxels.get(dims)
    if limit is not None and math.prod(shape) > limit:
        raise ImageTooLarge(
            f"{path}: the header declares {'x'.join(map(str, shape))} = {math.prod(shape):,} voxels, above the "
            f"limit of {limit:,} for {dims}D images; nothing was decoded"
        )


def _inflate_at_most(path: Path, expected: int, stream) -> bytes:
    """``expected`` bytes inflated from ``stream`` (a ``read(n)`` callable); :class:`ImageError` if
    the data inflates past that (one byte more is read, never the rest)."""
    data = stream(expected + 1)
    if len(data) > expected:
        raise ImageError(
            f"{path}: the compressed data inflates past the {expected:,} bytes its header declares; not decoded"
        )
    return data


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    if path.name.lower().endswith(".gz"):  # inflate only what the header declares (one byte more is an error)
        header = image.header  # the data start: the proxy's offset (the header's vox_offset may say 0)
        expected = int(image.dataobj.offset) + math.prod(header.get_data_shape()) * header.get_data_dtype().itemsize
        with gzip.open(path, "rb") as f:
            data = _inflate_at_most(path, expected, f.read)
        image = type(image).from_bytes(data)
    array = np.asarray(image.get_fdata(dtype=np.float32))
    while array.ndim > 2 and array.shape[-1] == 1:  # e.g. a 2D image saved as (H, W, 1)
        array = array[..., 0]
    return array, np.asarray(image.affine, dtype=np.float64)


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    header, offset = _nrrd_header(path)
    encoding = _NRRD_ENCODING.search(header)
    if encoding is not None and encoding.group(1).lower() in (b"gzip", b"gz"):
        sizes = _NRRD_SIZES.search(header)
        kind = re.search(rb"^type:\s*(.+?)\s*$", header, re.MULTILINE)
        if sizes is not None and kind is not None and kind.group(1).lower() in _NRRD_TYPE_BYTES:
            expected = math.prod(int(s) for s in sizes.group(1).split()) * _NRRD_TYPE_BYTES[kind.group(1).lower()]
            with open(path, "rb") as f:
                f.seek(offset)
                inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib stream
                _inflate_at_most(path, expected, lambda n: inflater.decompress(f.read(), n))
    image = itk.imread(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()} components per pixel; expected a scalar image"
        )
    array = np.array(itk.array_view_from_image(image), dtype=np.float32)  # (z, y, x) or (y, x)
    n = array.ndim
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64).reshape(n, n)
    affine = _ras_affine(direction, image.GetSpacing(), image.GetOrigin())
    if n == 3 and array.shape[0] == 1:  # a single slice saved as 3D: keep (y, x), z column moves last
        array = array[0]
        affine = affine[:, [1, 2, 0, 3]]
    return array, affine


def _ras_affine(direction: np.ndarray, spacing, origin) -> np.ndarray:
    """The RAS+ affine of the numpy axes (z, y, x) or (y, x) of an ITK image: ``direction`` (n, n)
    LPS direction cosines (columns: ITK index axes x, y[, z]), ``spacing`` and ``origin`` (n,) in mm."""
    n = len(spacing)
    index_to_lps = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    affine = np.eye(4)
    affine[:n, :n] = index_to_lps[:, ::-1]  # columns reordered to numpy axes (.., y, x)
    affine[:n, 3] = np.asarray(origin, dtype=np.float64)
    affine[:2, :] *= -1  # LPS -> RAS
    return affine + 0.0  # no negative zeros


def _itk_plane_affine(path: Path) -> np.ndarray:
    """The RAS+ affine of a PNG/JPEG/DICOM image's (rows, cols) array where ITK, and so 3D Slicer,
    places it: pixel (row r, column c) is ITK index (x = c, y = r), at origin + direction x spacing x
    index in LPS, all three from the file's header as ITK reads them (for DICOM through GDCM: image
    position and orientation when present, and the spacing attribute GDCM uses for the image's SOP
    class, e.g. ImagerPixelSpacing for digital X-ray; for PNG/JPEG 1 mm pixels at the origin unless
    the file records its resolution). A file ITK has no reader for gets ITK's defaults: 1 mm pixels,
    origin 0, identity direction, i.e. RAS (-c, -r, 0)."""
    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    try:
        io.SetFileName(str(path))
        io.ReadImageInformation()
    except (AttributeError, RuntimeError):  # no ITK reader (None), or one that cannot parse the header
        return _ras_affine(np.eye(2), (1.0, 1.0), (0.0, 0.0))
    n = io.GetNumberOfDimensions()
    direction = np.array([io.GetDirection(axis) for axis in range(n)], dtype=np.float64).T  # columns: axes
    affine = _ras_affine(direction, [io.GetSpacing(a) for a in range(n)], [io.GetOrigin(a) for a in range(n)])
    return affine[:, [1, 2, 0, 3]] if n == 3 else affine  # (1, rows, cols): the slice axis moves last


def _read_pil(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image, dtype=np.float32)
        else:
            array = np.asarray(image.convert("L"), dtype=np.float32)
    return array, _itk_plane_affine(path)


def _dicom_folder_files(path: Path) -> list[Path]:
    """The files of the one DICOM series in the folder ``path`` (:class:`ImageError` for none or several)."""
    try:
        groups = find_dicom_series(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: is a directory without DICOM images, expected an image file") from None
    if len(groups) > 1:
        raise ImageError(f"{path}: is a directory with {len(groups)} DICOM series; expected one series per folder")
    return next(iter(groups.values()))


def _read_dicom_volume(path: Path) -> tuple[np.ndarray, dict]:
    try:
        return read_dicom_volume(path)
    except ValueError as error:
        raise ImageError(str(error) if str(error).startswith(str(path)) else f"{path}: {error}") from error


def _read_dicom(path: Path) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, dict]:
    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise ImageError(f"{path}: DICOM file has no pixel data")
    if is_multiframe(ds):
        return _read_dicom_volume(path)
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise ImageError(f"{path}: colour DICOM ({ds.SamplesPerPixel} samples per pixel); expected a grayscale image")
    array = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)  # RescaleSlope/Intercept
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        array = array.max() + array.min() - array  # bright = high value, as in MONOCHROME2
    return array, _itk_plane_affine(path)


_READERS = {"nifti": _read_nifti, "nrrd": _read_nrrd, "png": _read_pil, "jpeg": _read_pil, "dicom": _read_dicom}


def read_image(
    path: str | os.PathLike, allow_constant: bool = False, max_voxels: Mapping[int, int] | None = None
) -> tuple[np.ndarray, dict]:
    """Read a 2D or 3D image as float32.

    ``path``: an image file, or a folder holding one DICOM series.
    Returns ``(array, meta)``, ``meta = {"affine": (4, 4) float64, "spatial_shape": tuple,
    "format": "nifti" | "nrrd" | "png" | "jpeg" | "dicom" | "dicom-series" | "dicom-multiframe"}``
    (axes: see the module docstring; DICOM reads also give ``sources``, volumes ``positions``).
    ``max_voxels``: {2: pixels, 3: voxels} the caller accepts; an image whose header declares more
    raises :class:`ImageTooLarge` before any pixel is decoded.
    Raises :class:`ImageError` (missing file, unsupported type, corrupt file, not 2D/3D, NaN/inf,
    empty, or constant unless ``allow_constant``).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    fmt = "dicom" if path.is_dir() else _format_of(path)
    if path.is_dir() and len(files := _dicom_folder_files(path)) == 1:
        path = files[0]  # a folder holding one file: that file
    if max_voxels is not None:
        _check_declared_size(path, max_voxels)
    try:
        read = _read_dicom_volume(path) if path.is_dir() else _READERS[fmt](path)
    except ImageError:
        raise
    except Exception as err:  # every library has its own exception types for corrupt files
        raise ImageError(f"{path}: cannot read {fmt} file ({type(err).__name__}: {err})") from err
    array, found = read
    meta = {**found} if isinstance(found, dict) else {"affine": found, "format": fmt}
    if fmt == "dicom" and "sources" not in meta:
        meta["sources"] = [(str(path), 0)]
    if array.ndim not in (2, 3):
        raise ImageError(f"{path}: {array.ndim}D image of shape {array.shape}; expected 2D or 3D")
    check_image(array, str(path), allow_constant=allow_constant)
    return array, {**meta, "spatial_shape": tuple(int(s) for s in array.shape)}


def write_nifti(array: np.ndarray, path: str | os.PathLike, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` to ``path`` (.nii or .nii.gz) atomically and return the path.

    Data type: float32, except bool -> uint8 and integer input kept as is (int64/uint64 narrowed
    to int32 when the values fit). ``affine``: (4, 4), default identity (1 mm voxels). The file
    is written under a temporary name in the same folder and renamed, so a failed write never
    leaves a partial file under ``path`` (nor the temporary file). Parent folders are created.
    """
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
    with atomic_path(path, suffix) as temporary:
        nib.save(nib.Nifti1Image(array, affine), str(temporary))
    return path
