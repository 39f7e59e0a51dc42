"""The RSNA Pneumonia Detection Challenge layout: writer (for generated data) and reader (for the real data).

Layout of a data set root (as in the challenge's stage 2 download)::

    stage_2_train_labels.csv          patientId,x,y,width,height,Target   one row per box; Target 0 rows: empty box
    stage_2_detailed_class_info.csv   patientId,class                     one row per row of the labels file
    stage_2_train_images/<patientId>.dcm   1024x1024, 8-bit, MONOCHROME2, JPEG baseline compressed

Boxes are in pixels of the 1024x1024 image, ``x, y`` the upper-left corner (column, row), written as floats
(``264.0``). Classes: ``Normal`` and ``No Lung Opacity / Not Normal`` (Target 0), ``Lung Opacity`` (Target 1).
The reader's two-class subset keeps Normal (label 0) vs Lung Opacity (label 1).

Items (:func:`rsna_items`, :func:`rsna_dataset`) have the keys of ``read_manifest``'s items
(``id, image, label, subtype, mask, mask_top, mask_bottom``) plus ``boxes`` (list of ``(x, y, width, height)``);
``subtype`` is the class name. Box-union masks at any resolution: :func:`box_mask`.
:func:`rsna_to_manifest` (also ``python -m monai_sal_app.data.rsna ROOT --out DIR``) writes a manifest so
``monai-sal train`` works on the data set.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from skimage.transform import resize
from tqdm.auto import tqdm

from monai_sal_app.data.io import ImageError, read_image, write_nifti
from monai_sal_app.data.manifest import write_manifest
from monai_sal_app.files import atomic_path

__all__ = [
    "CLASSES",
    "CLASS_COLUMNS",
    "CLASS_CSV",
    "IMAGE_DIR",
    "LABELS_COLUMNS",
    "LABELS_CSV",
    "RSNA_SIZE",
    "TWO_CLASS_LABELS",
    "box_mask",
    "main",
    "read_rsna_tables",
    "rsna_dataset",
    "rsna_items",
    "rsna_to_manifest",
    "write_rsna_dicom",
    "write_rsna_tables",
]

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
LABELS_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
CLASSES = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal")
TWO_CLASS_LABELS = {"Normal": 0, "Lung Opacity": 1}
RSNA_SIZE = 1024
_TARGET_OF_CLASS = {"Normal": 0, "Lung Opacity": 1, "No Lung Opacity / Not Normal": 0}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_rsna_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    patient_id: str,
    sex: str = "F",
    age: int = 50,
    view: str = "PA",
    compress: bool = True,
    pixel_spacing_mm: float = 0.143,
) -> Path:
    """Write one radiograph as the challenge's files are: 8-bit MONOCHROME2 secondary capture, JPEG baseline.

    ``pixels``: uint8 (rows, cols), bright = dense (bone, opacity). ``compress=False`` writes explicit VR
    little endian instead of JPEG (lossless, for exact round trips). UIDs derive from ``patient_id`` so the
    same call always writes the same file. Returns the path.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"{path}: pixels must be a 2D uint8 array, got {pixels.dtype} {pixels.shape}")
    if sex not in ("F", "M"):
        raise ValueError(f"sex must be 'F' or 'M', got {sex!r}")
    if view not in ("PA", "AP"):
        raise ValueError(f"view must be 'PA' or 'AP', got {view!r}")
    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient_id, "instance"])
    meta.TransferSyntaxUID = JPEGBaseline8Bit if compress else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate, ds.StudyTime = "19010101", "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    with warnings.catch_warnings():  # the challenge's files store the age as bare digits ('51'), not the AS form '051Y'
        warnings.simplefilter("ignore", UserWarning)
        ds.PatientAge = str(int(age))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, "series"])
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if compress:
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=95)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].is_undefined_length = True
        ds.is_little_endian, ds.is_implicit_VR = True, False
    else:
        ds.PixelData = pixels.tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
    with atomic_path(path) as temporary:
        pydicom.dcmwrite(str(temporary), ds, write_like_original=False)
    return path


def _box_cell(value: float) -> str:
    return f"{float(value):.1f}"


def write_rsna_tables(root: str | os.PathLike, records: Sequence[dict]) -> tuple[Path, Path]:
    """Write the labels and detailed-class CSVs under ``root`` from ``records``.

    Each record: ``{"patientId": str, "class": one of CLASSES, "boxes": [(x, y, width, height), ...]}``;
    Lung Opacity needs >= 1 box, the other classes none. One labels row per box (one empty-box row with
    Target 0 otherwise), and the class file repeats the class for every labels row, as the challenge does.
    """
    root = Path(root)
    label_rows, class_rows = [], []
    for record in records:
        pid, name, boxes = record["patientId"], record["class"], list(record.get("boxes") or [])
        if name not in CLASSES:
            raise ValueError(f"{pid}: unknown class {name!r}; expected one of {CLASSES}")
        target = _TARGET_OF_CLASS[name]
        if target == 1 and not boxes:
            raise ValueError(f"{pid}: class 'Lung Opacity' needs at least one box")
        if target == 0 and boxes:
            raise ValueError(f"{pid}: class {name!r} (Target 0) cannot have boxes")
        for box in boxes or [None]:
            if box is None:
                label_rows.append([pid, "", "", "", "", "0"])
            else:
                x, y, w, h = box
                if w <= 0 or h <= 0:
                    raise ValueError(f"{pid}: box {box} has no area")
                label_rows.append([pid, _box_cell(x), _box_cell(y), _box_cell(w), _box_cell(h), "1"])
            class_rows.append([pid, name])
    root.mkdir(parents=True, exist_ok=True)
    paths = (root / LABELS_CSV, root / CLASS_CSV)
    for path, header, rows in ((paths[0], LABELS_COLUMNS, label_rows), (paths[1], CLASS_COLUMNS, class_rows)):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    return paths


def _read_csv(path: Path, expected: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = tuple(h.strip() for h in next(reader, []))
        if header != expected:
            raise ValueError(f"{path}: columns {list(header)}; expected exactly {list(expected)}")
        return [dict(zip(expected, (v.strip() for v in row)), line=n) for n, row in enumerate(reader, start=2) if row]


def read_rsna_tables(
    root: str | os.PathLike, labels_csv: str | os.PathLike | None = None, class_csv: str | os.PathLike | None = None
) -> dict[str, dict]:
    """Parse and check the two CSVs: ``{patientId: {"class": str, "target": int, "boxes": [(x, y, w, h)]}}``.

    Checks (``ValueError`` naming file and line): exact column order, Target 0/1, empty box cells on
    Target 0 rows and complete positive boxes on Target 1 rows, one Target per patient, a known class
    that agrees with the Target, every labelled patient has a class. Order: as in the labels file.
    """
    root = Path(root)
    labels_path = Path(labels_csv) if labels_csv else root / LABELS_CSV
    class_path = Path(class_csv) if class_csv else root / CLASS_CSV
    patients: dict[str, dict] = {}
    for row in _read_csv(labels_path, LABELS_COLUMNS):
        where = f"{labels_path}: line {row['line']}"
        pid = row["patientId"]
        if not pid:
            raise ValueError(f"{where}: empty patientId")
        if row["Target"] not in ("0", "1"):
            raise ValueError(f"{where}: Target {row['Target']!r} is not 0 or 1")
        target = int(row["Target"])
        cells = [row[c] for c in ("x", "y", "width", "height")]
        entry = patients.setdefault(pid, {"class": None, "target": target, "boxes": []})
        if entry["target"] != target:
            raise ValueError(f"{where}: patient {pid} has rows with Target 0 and Target 1")
        if target == 0:
            if any(cells):
                raise ValueError(f"{where}: Target 0 row must have an empty box, got {cells}")
            continue
        try:
            x, y, w, h = (float(c) for c in cells)
        except ValueError:
            raise ValueError(f"{where}: Target 1 row needs numeric x, y, width, height, got {cells}") from None
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            raise ValueError(f"{where}: box {cells} must have x, y >= 0 and positive width and height")
        entry["boxes"].append((x, y, w, h))
    for row in _read_csv(class_path, CLASS_COLUMNS):
        where = f"{class_path}: line {row['line']}"
        pid, name = row["patientId"], row["class"]
        if name not in CLASSES:
            raise ValueError(f"{where}: unknown class {name!r}; expected one of {CLASSES}")
        if pid not in patients:
            raise ValueError(f"{where}: patient {pid} is not in {labels_path.name}")
        entry = patients[pid]
        if entry["class"] not in (None, name):
            raise ValueError(f"{where}: patient {pid} has two classes, {entry['class']!r} and {name!r}")
        if _TARGET_OF_CLASS[name] != entry["target"]:
            raise ValueError(f"{where}: class {name!r} disagrees with Target {entry['target']} of patient {pid}")
        entry["class"] = name
    unclassified = [pid for pid, e in patients.items() if e["class"] is None]
    if unclassified:
        raise ValueError(f"{class_path}: {len(unclassified)} patient(s) without a class, e.g. {unclassified[0]}")
    if not patients:
        raise ValueError(f"{labels_path}: no rows")
    return patients


def box_mask(
    boxes: Sequence[Sequence[float]], shape: Sequence[int], source_shape: Sequence[int] = (RSNA_SIZE, RSNA_SIZE)
) -> np.ndarray:
    """Union of boxes as a boolean (rows, cols) mask of ``shape``.

    ``boxes``: ``(x, y, width, height)`` in pixels of an image of ``source_shape`` (rows, cols), x the column.
    Each box covers rows [y, y + height) and columns [x, x + width) (end-exclusive), scaled to ``shape``
    and rounded to the nearest pixel edge; a box that would vanish keeps at least one pixel.
    """
    rows, cols = (int(s) for s in shape)
    scale_r, scale_c = rows / float(source_shape[0]), cols / float(source_shape[1])
    mask = np.zeros((rows, cols), dtype=bool)
    for x, y, w, h in boxes:
        r0, c0 = int(round(y * scale_r)), int(round(x * scale_c))
        r1, c1 = int(round((y + h) * scale_r)), int(round((x + w) * scale_c))
        r0, c0 = min(max(r0, 0), rows - 1), min(max(c0, 0), cols - 1)
        mask[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)] = True
    return mask


def rsna_items(
    root: str | os.PathLike,
    classes: Sequence[str] = ("Normal", "Lung Opacity"),
    image_dir: str | os.PathLike | None = None,
    labels_csv: str | os.PathLike | None = None,
    class_csv: str | os.PathLike | None = None,
) -> list[dict]:
    """Items of the patients whose class is in ``classes`` (default: the two-class subset).

    Labels: Normal 0, Lung Opacity 1 (``No Lung Opacity / Not Normal``, when asked for, gets label 2).
    ``image`` is ``<image_dir>/<patientId>.dcm`` (default ``root/stage_2_train_images``); a missing image
    raises ``FileNotFoundError`` (with the number missing). ``mask`` is None: use :func:`box_mask` on
    ``boxes``, or :func:`rsna_dataset` / :func:`rsna_to_manifest` which write mask files.
    """
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or not classes:
        raise ValueError(f"unknown class(es) {unknown}; choose among {CLASSES}")
    label_of = {"Normal": 0, "Lung Opacity": 1, "No Lung Opacity / Not Normal": 2}
    root = Path(root)
    folder = Path(image_dir) if image_dir else root / IMAGE_DIR
    items, missing = [], []
    for pid, entry in read_rsna_tables(root, labels_csv, class_csv).items():
        if entry["class"] not in classes:
            continue
        image = folder / f"{pid}.dcm"
        if not image.is_file():
            missing.append(str(image))
            continue
        items.append(
            {
                "id": pid,
                "image": str(image.resolve()),
                "label": label_of[entry["class"]],
                "subtype": entry["class"],
                "mask": None,
                "mask_top": None,
                "mask_bottom": None,
                "boxes": list(entry["boxes"]),
            }
        )
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in the CSVs are missing, e.g. {missing[0]}")
    if not items:
        raise ValueError(f"{root}: no patient of class(es) {list(classes)}")
    return items


def _write_box_masks(items: list[dict], mask_dir: Path, mask_size: Sequence[int] | None, progress: bool) -> None:
    """Write a box-union mask per item with boxes (uint8 NIfTI, ``mask_size`` or the image's own size)."""
    for item in tqdm(items, desc="RSNA box masks", disable=not progress):
        if not item["boxes"]:
            continue
        if mask_size is None:
            array, _ = read_image(item["image"])
            shape = array.shape
        else:
            shape = tuple(int(s) for s in mask_size)
        item["mask"] = str(write_nifti(box_mask(item["boxes"], shape), mask_dir / f"{item['id']}.nii.gz"))


def rsna_dataset(
    root, classes=("Normal", "Lung Opacity"), transform=None, mask_dir=None, mask_size=None, progress=False, **paths
):
    """A ``monai.data.Dataset`` of :func:`rsna_items` with an optional MONAI ``transform``.

    With ``mask_dir``, box-union masks are written there (uint8 NIfTI at ``mask_size`` (rows, cols) or each
    image's own size) and ``item["mask"]`` points at them. ``paths``: ``image_dir``, ``labels_csv``, ``class_csv``.
    """
    from monai.data import Dataset  # here, not at the top: the data package imports without MONAI (its docstring)

    items = rsna_items(root, classes, **paths)
    if mask_dir is not None:
        _write_box_masks(items, Path(mask_dir), mask_size, progress)
    return Dataset(data=items, transform=transform)


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    return resize(array, (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def rsna_to_manifest(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int | None = 256,
    classes: Sequence[str] = ("Normal", "Lung Opacity"),
    progress: bool = True,
    **paths,
) -> Path:
    """Write ``out_dir/manifest.csv`` for the RSNA data set at ``root``; return its path.

    ``size``: images converted to ``size`` x ``size`` float32 NIfTI (``out_dir/images/<id>.nii.gz``) and
    masks = box unions at that size (``out_dir/masks/<id>.nii.gz``); ``size=None`` keeps the DICOM files
    (absolute paths) with masks at each image's own resolution. Lung Opacity rows get a mask, others none.
    """
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16):
        raise ValueError(f"size must be an integer >= 16 or None, got {size!r}")
    out_dir = Path(out_dir)
    items = rsna_items(root, classes, **paths)
    rows = []
    for item in tqdm(items, desc="RSNA -> manifest", disable=not progress):
        try:
            array, _ = read_image(item["image"])
        except ImageError as err:
            raise ImageError(f"{item['id']}: {err}") from err
        row = {"id": item["id"], "label": item["label"], "subtype": item["subtype"], "image": item["image"]}
        shape = array.shape
        if size is not None:
            row["image"] = f"images/{item['id']}.nii.gz"
            write_nifti(_resize(array, size), out_dir / row["image"])
            shape = (size, size)
        if item["boxes"]:
            row["mask"] = f"masks/{item['id']}.nii.gz"
            write_nifti(box_mask(item["boxes"], shape, source_shape=array.shape), out_dir / row["mask"])
        rows.append(row)
    return write_manifest(out_dir / "manifest.csv", rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m monai_sal_app.data.rsna ROOT --out DIR [--size 256 | --keep-dicom]``: write a manifest."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_sal_app.data.rsna", description="RSNA pneumonia layout -> monai-sal manifest"
    )
    parser.add_argument(
        "root", help="folder with stage_2_train_labels.csv, stage_2_detailed_class_info.csv, stage_2_train_images/"
    )
    parser.add_argument("--out", required=True, help="output folder (manifest.csv, images/, masks/)")
    parser.add_argument("--size", type=int, default=256, help="convert images to SIZE x SIZE NIfTI (default 256)")
    parser.add_argument("--keep-dicom", action="store_true", help="point the manifest at the DICOM files instead")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        manifest = rsna_to_manifest(
            args.root, args.out, size=None if args.keep_dicom else args.size, progress=not args.quiet
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
