"""The dataset manifest: one CSV row per image, the input of training, explanation and evaluation.

Columns, in this order: ``id,image,label,subtype,mask,mask_top,mask_bottom``.

- ``id``: unique name of the subject (used for output file names).
- ``image``: the image file, relative to the manifest's folder (absolute paths are allowed).
- ``label``: integer class (0 = control, 1 = patient for the synthetic data sets).
- ``subtype``: free text (e.g. ``control``, ``typical``, ``atypical``, ``error``), may be empty.
- ``mask``: ground-truth location of the evidence for the label, empty when there is none
  (controls, label errors).
- ``mask_top``, ``mask_bottom``: masks of the two Shepp-Logan regions, empty for other data.

Only ``id``, ``image`` and ``label`` are required when reading. Relative paths may not leave the
manifest's folder (``../x.nii.gz`` is refused); use an absolute path for files elsewhere.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monai_sal_app.data.io import read_image
from monai_sal_app.files import atomic_write

if TYPE_CHECKING:
    import torch

__all__ = [
    "COLUMNS",
    "PATH_COLUMNS",
    "REQUIRED_COLUMNS",
    "load_images",
    "load_labels",
    "read_manifest",
    "write_manifest",
]

COLUMNS = ("id", "image", "label", "subtype", "mask", "mask_top", "mask_bottom")
REQUIRED_COLUMNS = ("id", "image", "label")
PATH_COLUMNS = ("image", "mask", "mask_top", "mask_bottom")


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or value is None:
        raise ValueError(f"{where}: label {value!r} is not an integer")
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not an integer") from None


def _path_for_csv(value: Any, folder: Path, where: str) -> str:
    """Relative POSIX path if ``value`` lies under ``folder``, else the absolute path; '' for None."""
    if value is None or value == "":
        return ""
    p = Path(value)
    if not p.is_absolute():
        if _leaves_folder(str(p)):
            raise ValueError(
                f"{where}: relative path {str(value)!r} leaves the manifest's folder; use an absolute path"
            )
        return p.as_posix()
    try:
        return Path(os.path.abspath(p)).relative_to(os.path.abspath(folder)).as_posix()
    except ValueError:
        return str(p)


def write_manifest(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``rows`` as a manifest CSV (columns :data:`COLUMNS`) atomically; return the path.

    Each row needs ``id``, ``image`` and an integer ``label``; the other columns default to empty.
    Path values may be relative to the manifest's folder or absolute (absolute paths under that
    folder are written relative). Unknown keys and duplicate ids raise ``ValueError``. The CSV is
    written to a temporary file in the same folder and renamed, never left half-written.
    """
    path = Path(path)
    folder = path.parent
    lines = []
    seen: set[str] = set()
    for n, row in enumerate(rows):
        where = f"{path}: row {n}"
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"{where}: unknown column(s) {sorted(unknown)}; columns are {list(COLUMNS)}")
        for column in REQUIRED_COLUMNS:
            if row.get(column) in (None, ""):
                raise ValueError(f"{where}: missing {column!r}")
        row_id = str(row["id"])
        if row_id in seen:
            raise ValueError(f"{where}: duplicate id {row_id!r}")
        seen.add(row_id)
        line = {column: "" if row.get(column) is None else str(row.get(column, "")) for column in COLUMNS}
        line["label"] = str(_parse_label(row["label"], where))
        for column in PATH_COLUMNS:
            line[column] = _path_for_csv(row.get(column), folder, where)
        lines.append(line)

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(lines)

    return atomic_write(path, write, mode="w")


def _leaves_folder(relative: str) -> bool:
    return os.path.normpath(relative).split(os.sep)[0] == ".."


def _resolve(value: str, folder: Path, where: str) -> str | None:
    """Absolute path of a CSV path cell (relative to ``folder``), None when empty."""
    value = value.strip()
    if not value:
        return None
    if Path(value).is_absolute():
        return value
    if _leaves_folder(value):
        raise ValueError(f"{where}: relative path {value!r} leaves the manifest's folder; use an absolute path")
    return os.path.abspath(folder / value)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read a manifest CSV into items.

    Each item: ``{"id": str, "image": absolute path str, "label": int, "subtype": str,
    "mask" / "mask_top" / "mask_bottom": absolute path str or None}``, in file order.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file, and the
    line for row errors) for: no header or no rows, missing required columns, empty id or image,
    duplicate id, non-integer label, a relative path leaving the manifest's folder.
    Image files are not opened here (:func:`load_images` and ``read_image`` check them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    folder = path.parent
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {missing}; found columns {header}")
        reader.fieldnames = header
        items = []
        seen: set[str] = set()
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            item_id = (row.get("id") or "").strip()
            if not item_id:
                raise ValueError(f"{where}: empty id")
            if item_id in seen:
                raise ValueError(f"{where}: duplicate id {item_id!r}")
            seen.add(item_id)
            image = _resolve(row.get("image") or "", folder, where)
            if image is None:
                raise ValueError(f"{where}: empty image path for id {item_id!r}")
            item = {
                "id": item_id,
                "image": image,
                "label": _parse_label(row.get("label"), where),
                "subtype": (row.get("subtype") or "").strip(),
            }
            for column in ("mask", "mask_top", "mask_bottom"):
                item[column] = _resolve(row.get(column) or "", folder, where)
            items.append(item)
    if not items:
        raise ValueError(f"{path}: manifest has no rows")
    return items


def load_images(items: list[dict], key: str = "image") -> torch.Tensor:
    """Stack the files ``item[key]`` into a float32 tensor (N, 1, *spatial).

    All arrays must have the same shape (``ValueError`` naming the first mismatching id). Images
    (``key="image"``) must not be constant; masks (any other key) may be empty.
    """
    import torch  # here, not at the top: the data package imports without torch (its docstring)

    if not items:
        raise ValueError("load_images: no items")
    stacked = None
    for n, item in enumerate(items):
        file = item.get(key)
        if not file:
            raise ValueError(f"{item.get('id')}: no {key!r} file")
        try:
            array, _ = read_image(file, allow_constant=key != "image")
        except ValueError as err:
            raise type(err)(f"{item.get('id')}: {err}") from err
        if stacked is None:
            stacked = np.empty((len(items), 1, *array.shape), dtype=np.float32)
        elif array.shape != stacked.shape[2:]:
            raise ValueError(
                f"{item.get('id')}: {key} shape {array.shape} differs from {tuple(stacked.shape[2:])} of {items[0].get('id')}"
            )
        stacked[n, 0] = array
    return torch.from_numpy(stacked)


def load_labels(items: list[dict]) -> torch.Tensor:
    """Labels of ``items`` as a long tensor (N,); ``ValueError`` naming the item if one is missing."""
    import torch

    labels = []
    for item in items:
        labels.append(_parse_label(item.get("label"), str(item.get("id"))))
    return torch.tensor(labels, dtype=torch.long)
