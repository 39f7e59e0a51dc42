"""Readers for the formats of the data sets users own: NIfTI/NRRD folders (optional masks) and DICOM series.

Every reader returns items with the keys of ``read_manifest``'s items (``id, image, label, subtype, mask,
mask_top, mask_bottom``), so they can be written with ``write_manifest`` (then ``monai-sal train`` works)
or wrapped as a ``monai.data.Dataset`` (``*_dataset``). :class:`LoadItemd` is a MONAI-style transform that
loads an item's image and mask as channel-first float32 arrays with :func:`~.io.read_image` (which also
reads JPEG-compressed DICOM) or :func:`read_dicom_series` for a series folder.

Image folder layouts (:func:`image_folder_items`):

- class sub-folders ``root/<class>/<case>.nii.gz``: label = index of the class in ``class_names``
  (default: the sorted sub-folder names), subtype = the class name;
- a flat folder with ``labels`` = a CSV with columns ``id,label[,subtype]`` (or a dict id -> label);
- neither: label None (images to explain, not to train on).

Masks are files next to the image named ``<id><suffix>`` with a suffix in ``mask_suffixes`` (e.g.
``lung1_label.nrrd`` next to ``lung1_image.nrrd``, ``case_mask.nii.gz`` next to ``case.nii.gz``), or files in
``mask_dir`` (same relative folder, named ``<id>`` or ``<id><suffix>``). An image's id is its file name
without the image suffix and without a trailing ``_image``/``_img``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from monai_sal_app.data.dicom_volumes import find_dicom_series, read_dicom_volume
from monai_sal_app.data.io import ImageError, check_image, read_image, write_nifti

__all__ = [
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "LoadItemd",
    "dicom_series_dataset",
    "dicom_series_items",
    "find_dicom_series",
    "image_folder_dataset",
    "image_folder_items",
    "read_dicom_series",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
MASK_SUFFIXES = ("_mask", "_label", "_labels", "_seg", "_segmentation")
_ID_SUFFIXES = ("_image", "_img")


def _split_suffix(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return None


def _case_id(stem: str) -> str:
    for suffix in _ID_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _is_mask(stem: str, mask_suffixes: Sequence[str]) -> bool:
    return any(stem.lower().endswith(s) for s in mask_suffixes)


def _find_mask(
    image: Path, case_id: str, relative_folder: Path, mask_dir: Path | None, mask_suffixes: Sequence[str]
) -> str | None:
    folders = [image.parent] + ([mask_dir / relative_folder, mask_dir] if mask_dir is not None else [])
    names = [case_id + s for s in mask_suffixes]
    in_mask_dir = [case_id, _split_suffix(image.name)[0]]
    for n, folder in enumerate(folders):
        for stem in names + (in_mask_dir if n > 0 else []):
            for suffix in IMAGE_SUFFIXES:
                candidate = folder / f"{stem}{suffix}"
                if candidate.is_file():
                    return str(candidate.resolve())
    return None


def _read_labels(labels, root: Path) -> dict[str, tuple[int, str]]:
    """``{id: (label, subtype)}`` from a CSV path (id,label[,subtype]) or a mapping id -> label."""
    if isinstance(labels, Mapping):
        return {str(k): (int(v), "") for k, v in labels.items()}
    path = Path(labels)
    if not path.is_absolute() and not path.exists():
        path = root / path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels CSV not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if "id" not in header or "label" not in header:
            raise ValueError(f"{path}: needs columns 'id' and 'label', found {header}")
        reader.fieldnames = header
        table = {}
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            try:
                label = int(str(row["label"]).strip())
            except ValueError:
                raise ValueError(f"{where}: label {row['label']!r} is not an integer") from None
            table[str(row["id"]).strip()] = (label, (row.get("subtype") or "").strip())
    return table


def image_folder_items(
    root: str | os.PathLike,
    labels: str | os.PathLike | Mapping[str, int] | None = None,
    mask_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    mask_suffixes: Sequence[str] = MASK_SUFFIXES,
) -> list[dict]:
    """Items of a folder of NIfTI/NRRD images (layouts: module docstring), sorted by id.

    ``labels`` (flat layout) must cover every image (``ValueError`` naming the first one missing); with class
    sub-folders it must be None. ``class_names`` fixes the label order of the sub-folders (a folder not listed is
    an error). Duplicate ids raise ``ValueError``; an empty folder raises ``FileNotFoundError``. Files are not
    opened (use :class:`LoadItemd` or ``read_image``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    mask_root = Path(mask_dir) if mask_dir is not None else None
    images = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or (mask_root is not None and mask_root.resolve() in path.resolve().parents):
            continue
        split = _split_suffix(path.name)
        if split is None or _is_mask(split[0], mask_suffixes):
            continue
        images.append(path)
    if not images:
        raise FileNotFoundError(f"{root}: no NIfTI/NRRD image ({', '.join(IMAGE_SUFFIXES)})")
    relative_folders = {p: p.parent.relative_to(root) for p in images}
    sub_folders = sorted({f.parts[0] for f in relative_folders.values() if f.parts})
    class_layout = bool(sub_folders) and all(f.parts for f in relative_folders.values())
    if class_layout and labels is not None:
        raise ValueError(f"{root}: images are in class sub-folders {sub_folders}; do not pass labels as well")
    if class_layout:
        names = list(class_names) if class_names is not None else sub_folders
        unknown = [f for f in sub_folders if f not in names]
        if unknown:
            raise ValueError(f"{root}: sub-folder(s) {unknown} not in class_names {names}")
    table = _read_labels(labels, root) if labels is not None else None
    items, seen = [], {}
    for path in images:
        case_id = _case_id(_split_suffix(path.name)[0])
        if case_id in seen:
            raise ValueError(f"{root}: id {case_id!r} used by both {seen[case_id]} and {path}")
        seen[case_id] = path
        if class_layout:
            class_name = relative_folders[path].parts[0]
            label, subtype = names.index(class_name), class_name
        elif table is not None:
            if case_id not in table:
                raise ValueError(f"{labels}: no label for image {path} (id {case_id!r})")
            label, subtype = table[case_id]
        else:
            label, subtype = None, ""
        items.append(
            {
                "id": case_id,
                "image": str(path.resolve()),
                "label": label,
                "subtype": subtype,
                "mask": _find_mask(path, case_id, relative_folders[path], mask_root, mask_suffixes),
                "mask_top": None,
                "mask_bottom": None,
            }
        )
    return sorted(items, key=lambda item: item["id"])


def image_folder_dataset(
    root, labels=None, mask_dir=None, class_names=None, transform=None, mask_suffixes=MASK_SUFFIXES
):
    """A ``monai.data.Dataset`` of :func:`image_folder_items` with an optional MONAI ``transform``."""
    from monai.data import Dataset  # here, not at the top: the data package imports without MONAI (its docstring)

    return Dataset(data=image_folder_items(root, labels, mask_dir, class_names, mask_suffixes), transform=transform)


# --- DICOM series ---------------------------------------------------------------------------------


def read_dicom_series(
    source: str | os.PathLike | Sequence[str | os.PathLike], series_uid: str | None = None, max_gap_ratio: float = 0.05
) -> tuple[np.ndarray, dict]:
    """Read a DICOM series (or one multi-frame CT/MR file) as a float32 volume ``(slices, rows, cols)``
    in modality units (e.g. HU), slices sorted along the slice normal: ``dicom_volumes.read_dicom_volume``,
    whose docstring gives ``meta`` and the errors, plus ``meta["files"]`` (the files in slice order) and
    :class:`~.io.ImageError` for NaN/constant volumes."""
    volume, meta = read_dicom_volume(source, series_uid, max_gap_ratio)
    check_image(volume, str(source) if isinstance(source, (str, os.PathLike)) else "read_dicom_series")
    return volume, {**meta, "files": list(dict.fromkeys(file for file, _ in meta["sources"]))}


def dicom_series_items(
    root: str | os.PathLike,
    labels: str | os.PathLike | Mapping[str, int] | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict]:
    """One item per DICOM series under ``root``; id = the series folder's name (relative path with ``_``)
    when each folder holds one series, else the SeriesInstanceUID.

    ``labels``: CSV (``id,label[,subtype]``) or dict, keyed by that id (every series needs one); None gives
    label None. ``image``: the series folder (loadable by :class:`LoadItemd`), or with ``out_dir`` a NIfTI
    conversion ``out_dir/images/<id>.nii.gz`` (then the items can go into a manifest). ``mask`` is None.
    """
    root = Path(root)
    groups = find_dicom_series(root)
    folders = {uid: {f.parent for f in files} for uid, files in groups.items()}
    one_per_folder = all(len(f) == 1 for f in folders.values()) and len(
        {next(iter(f)) for f in folders.values()}
    ) == len(groups)
    table = _read_labels(labels, root) if labels is not None else None
    items = []
    for uid in tqdm(sorted(groups), desc="DICOM series", disable=not progress):
        folder = next(iter(folders[uid])) if one_per_folder else None
        if folder is not None:
            relative = folder.relative_to(root).as_posix()
            series_id = relative.replace("/", "_") if relative != "." else root.name
        else:
            series_id = uid
        if table is not None and series_id not in table:
            raise ValueError(f"{labels}: no label for series {series_id!r}")
        label, subtype = table[series_id] if table is not None else (None, "")
        image = str(folder.resolve()) if folder is not None else None
        if out_dir is not None or image is None:
            if out_dir is None:
                raise ValueError(f"{root}: several series share a folder; pass out_dir to convert them to NIfTI")
            volume, meta = read_dicom_series(groups[uid])
            image = str(
                write_nifti(volume, Path(out_dir) / "images" / f"{series_id}.nii.gz", affine=meta["affine"]).resolve()
            )
        items.append(
            {
                "id": series_id,
                "image": image,
                "label": label,
                "subtype": subtype,
                "mask": None,
                "mask_top": None,
                "mask_bottom": None,
                "series_uid": uid,
            }
        )
    return items


def dicom_series_dataset(root, labels=None, out_dir=None, transform=None, progress=False):
    """A ``monai.data.Dataset`` of :func:`dicom_series_items` with an optional MONAI ``transform``."""
    from monai.data import Dataset

    return Dataset(data=dicom_series_items(root, labels, out_dir, progress), transform=transform)


class LoadItemd:
    """MONAI-style dictionary transform: replace ``item[key]`` paths by channel-first float32 arrays.

    ``keys`` default ``("image", "mask")``; a missing or None key is left as is (e.g. controls without a mask).
    Files go through :func:`~.io.read_image` (NIfTI, NRRD, PNG/JPEG, DICOM incl. JPEG-compressed), folders
    through :func:`read_dicom_series`. The affine of each key is stored as ``<key>_affine``. Masks (any key
    other than ``image``) may be constant.
    """

    def __init__(self, keys: Sequence[str] = ("image", "mask")):
        self.keys = tuple(keys)

    def __call__(self, item: dict) -> dict:
        out = dict(item)
        for key in self.keys:
            path = item.get(key)
            if path is None or path == "":
                continue
            try:
                if Path(path).is_dir():
                    array, meta = read_dicom_series(path)
                else:
                    array, meta = read_image(path, allow_constant=key != "image")
            except (ImageError, ValueError) as err:
                raise type(err)(f"{item.get('id')}: {key}: {err}") from err
            out[key] = array[None].astype(np.float32)
            out[f"{key}_affine"] = meta["affine"]
        return out
