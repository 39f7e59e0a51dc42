"""A model's inputs: an image array brought to the model's input grid, and the images of a manifest
(or of image files) loaded as one batch.

An image becomes a model input by min-max scaling to [0, 1] and a bi/trilinear resize to the
model's input size (:func:`preprocess`), the same for training, explaining and serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monai_sal_app.data.dicom_volumes import find_dicom_series
from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest

__all__ = ["load_inputs", "preprocess", "read_items", "resize_to"]


def resize_to(tensor: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Bi/trilinear resize of (N, C, *s) to ``spatial`` (no-op when already there)."""
    spatial = tuple(int(s) for s in spatial)
    if tuple(tensor.shape[2:]) == spatial:
        return tensor
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(tensor, size=spatial, mode=mode, align_corners=False)


def preprocess(array: np.ndarray, input_size: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Image (*spatial) -> model input (1, 1, *input_size), float32 in [0, 1].

    Raises ``ValueError`` when the image's dimensionality differs from the model's, or when it
    is constant or not finite (nothing to explain).
    """
    input_size = tuple(int(s) for s in input_size)
    array = np.asarray(array)
    if array.ndim != len(input_size):
        kind = {2: "2D images", 3: "3D volumes"}.get(len(input_size), f"{len(input_size)}D arrays")
        raise ValueError(f"the model takes {kind}, got an array of shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        raise ValueError("image is constant: there is nothing to classify or explain")
    x = torch.from_numpy(((array.astype(np.float32) - lo) / (hi - lo))[None, None].copy())
    return resize_to(x, input_size)


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".dcm")


def _dicom_series_folder(path: Path) -> bool:
    """Whether ``path`` is a folder whose files are the slices of one DICOM series (one volume)."""
    try:
        groups = find_dicom_series(path)
    except FileNotFoundError:
        return False
    return len(groups) == 1 and len(next(iter(groups.values()))) > 1


def read_items(source: str | Path | Sequence[str | Path]) -> list[dict]:
    """Items from a manifest CSV, from image files given one by one, or from every image file in a
    folder (sorted by name; no labels, no masks). A folder holding the slices of one DICOM series
    is one image (a volume), named by the folder. ``ValueError`` for a folder without images."""
    if isinstance(source, (str, Path)) and str(source).endswith(".csv"):
        return read_manifest(source)
    paths = [source] if isinstance(source, (str, Path)) else list(source)
    if any(Path(p).is_dir() and _dicom_series_folder(Path(p)) for p in paths):
        return [
            {"id": Path(p).name, "image": str(Path(p).resolve()), "label": None, "subtype": "", "mask": None}
            if Path(p).is_dir()
            else read_items([p])[0]
            for p in paths
        ]
    if len(paths) == 1 and Path(paths[0]).is_dir():
        folder = Path(paths[0])
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    items = []
    for p in paths:
        p = Path(p)
        name = p.name
        for suffix in IMAGE_SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        items.append({"id": name, "image": str(p.resolve()), "label": None, "subtype": "", "mask": None})
    return items


def load_inputs(
    items: list[dict], input_size: Sequence[int] | None = None, progress: bool = True
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Model inputs (N, 1, *input_size) for ``items`` via :func:`preprocess`.

    ``input_size`` defaults to the first image's shape. Errors name the offending item.
    """
    tensors = []
    for item in tqdm(items, desc="loading", disable=not progress, leave=False):
        try:
            array, _ = read_image(item["image"])
            if input_size is None:
                input_size = tuple(array.shape)
            tensors.append(preprocess(array, input_size))
        except ValueError as err:
            raise ValueError(f"{item['id']}: {err}") from err
    if not tensors:
        raise ValueError("no images to load")
    return torch.cat(tensors), tuple(int(s) for s in input_size)
