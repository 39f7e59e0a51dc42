"""Locating the real images ("bases") that the real-anatomy generators start from, offline.

Each base is installed by ``scripts/install_data.sh`` (see docs/DATA_REAL.md); nothing here downloads.
Search order for every base: the folder named by the environment variable ``MONAI_SAL_DATA`` (if set),
then ``<repo>/.data/`` (what the install script fills), then the system / Python package locations.

===============  ==============================================  ======================================
base             files                                           from
===============  ==============================================  ======================================
colin27          ``ch2bet.nii.gz`` (T1, brain only), ``aal.nii.gz``  Debian ``mricron-data``
                 + ``aal.nii.txt`` (116 regions), 181x217x181 1 mm   (``.data/mricron/usr/share/mricron/templates``
                                                                     or ``/usr/share/mricron/templates``)
mni152           nilearn's MNI152 T1 + brain and grey-matter masks PyPI ``nilearn`` (no atlas offline)
chest_radiograph ``RG1_UNCR.dcm`` (PA chest CR, MONOCHROME1)       PyPI ``pydicom-data``
lung_ct          ``lung1/lung2_{image,label}.nrrd``                 pyradiomics 3.0.1 source archive, ``data/``
===============  ==============================================  ======================================

A missing base raises :class:`BaseNotInstalled` (a ``FileNotFoundError``) whose message names the
install command. The module also holds the few sampling helpers the three generators share
(:func:`smooth_random_field`, :func:`rotation_matrix`, :func:`deterministic_uuid`).
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "INSTALL_HINT",
    "REPO_DATA",
    "BaseNotInstalled",
    "chest_radiograph_file",
    "colin27_files",
    "data_roots",
    "deterministic_uuid",
    "lung_ct_files",
    "mni152_available",
    "rotation_matrix",
    "separable_zoom",
    "smooth_random_field",
]

REPO_DATA = Path(__file__).resolve().parents[2] / ".data"
INSTALL_HINT = "bash scripts/install_data.sh (from the monai-sal repository root)"


class BaseNotInstalled(FileNotFoundError):
    """A real-anatomy base image is not installed; the message says what is missing and how to install it."""


def data_roots() -> list[Path]:
    """Folders searched for installed bases, in order: ``$MONAI_SAL_DATA`` (if set), then ``<repo>/.data``."""
    roots = []
    if os.environ.get("MONAI_SAL_DATA"):
        roots.append(Path(os.environ["MONAI_SAL_DATA"]))
    roots.append(REPO_DATA)
    return roots


def _first_folder_with(candidates: list[Path], names: tuple[str, ...]) -> Path | None:
    for folder in candidates:
        if all((folder / name).is_file() for name in names):
            return folder
    return None


def colin27_files() -> dict[str, Path]:
    """Colin27 T1 and the AAL atlas: ``{"t1": ch2bet.nii.gz, "t1_head": ch2.nii.gz, "atlas": aal.nii.gz, "atlas_names": aal.nii.txt}``.

    All on one 181x217x181 grid, 1 mm, MNI space. Raises :class:`BaseNotInstalled` when absent.
    """
    names = ("ch2bet.nii.gz", "ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")
    relative = Path("usr/share/mricron/templates")
    candidates = [root / "mricron" / relative for root in data_roots()] + [Path("/") / relative]
    folder = _first_folder_with(candidates, names)
    if folder is None:
        raise BaseNotInstalled(
            "Colin27 + AAL (Debian package mricron-data) not found in "
            + ", ".join(str(c) for c in candidates)
            + f"; install it with: {INSTALL_HINT} (or: apt-get install mricron-data)"
        )
    return {
        "t1": folder / names[0],
        "t1_head": folder / names[1],
        "atlas": folder / names[2],
        "atlas_names": folder / names[3],
    }


def mni152_available() -> bool:
    """True when nilearn (which ships the MNI152 template and masks) can be imported."""
    return importlib.util.find_spec("nilearn") is not None


def chest_radiograph_file() -> Path:
    """Path of pydicom-data's ``RG1_UNCR.dcm`` (PA chest CR, 1955x1841, MONOCHROME1).

    pydicom-data installs its files as the package ``data_store`` (``data_store/data/``); the same file
    under ``<data root>/pydicom-data/`` is accepted too. Raises :class:`BaseNotInstalled` when absent.
    """
    name = "RG1_UNCR.dcm"
    candidates = [root / "pydicom-data" / name for root in data_roots()]
    spec = importlib.util.find_spec("data_store")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "data" / name for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise BaseNotInstalled(
        f"chest radiograph {name} (PyPI package pydicom-data) not found; install it with: {INSTALL_HINT} "
        "(or: .venv/bin/pip install pydicom-data)"
    )


def lung_ct_files() -> dict[str, dict[str, Path]]:
    """pyradiomics' lung CT cases: ``{"lung1": {"image": ..nrrd, "label": ..nrrd}, "lung2": {...}}``.

    ``lung1``: 512x512x48, 0.57x0.57x5 mm, a nodule; ``lung2``: 512x512x61, 0.63x0.63x5 mm, a tumour.
    Raises :class:`BaseNotInstalled` when absent.
    """
    names = tuple(f"{case}_{kind}.nrrd" for case in ("lung1", "lung2") for kind in ("image", "label"))
    candidates = [root / "pyradiomics" / "data" for root in data_roots()]
    folder = _first_folder_with(candidates, names)
    if folder is None:
        raise BaseNotInstalled(
            "pyradiomics 3.0.1 lung CT data (lung1/lung2 NRRD) not found in "
            + ", ".join(str(c) for c in candidates)
            + f"; install it with: {INSTALL_HINT}"
        )
    return {case: {kind: folder / f"{case}_{kind}.nrrd" for kind in ("image", "label")} for case in ("lung1", "lung2")}


# --- helpers shared by the real-anatomy generators ------------------------------------------------


def smooth_random_field(
    shape: tuple[int, ...], control_points: int, rng: np.random.Generator, components: int = 1
) -> np.ndarray:
    """Smooth random field of ``shape``: N(0, 1) values on a coarse grid, cubic-upsampled, rescaled to unit std.

    Returns float64 ``(components, *shape)``. ``control_points`` (>= 2) per axis sets the smoothness (a few
    control points = a few bumps across the image). Draws ``components * control_points ** len(shape)`` normals.
    """
    if control_points < 2:
        raise ValueError(f"control_points must be >= 2, got {control_points!r}")
    coarse = rng.normal(size=(components,) + (control_points,) * len(shape))
    field = np.stack([separable_zoom(c, shape, order=3, mode="nearest", grid_mode=True) for c in coarse])
    std = field.std()
    return field / std if std > 0 else field


def separable_zoom(array: np.ndarray, shape: tuple[int, ...], order: int, mode: str = "constant", grid_mode=False):
    """``scipy.ndimage.zoom(array, zoom, order=order, mode=mode, grid_mode=grid_mode)`` to ``shape``
    (zoom = shape / array.shape per axis), computed as one small matrix product per axis.

    The zoom is linear and separable over the axes (its spline filter and its interpolation both
    are), so each axis is a matrix (out, in) whose columns are the zooms of unit vectors; the
    result equals scipy's to float64 rounding, without evaluating a spline at every output
    element. float64 array of ``shape``."""
    field = np.asarray(array, dtype=np.float64)
    for axis, (n_in, n_out) in enumerate(zip(field.shape, shape)):
        matrix = _zoom_matrix(n_in, n_out, order, mode, grid_mode)
        field = np.moveaxis(np.tensordot(matrix, field, axes=([1], [axis])), 0, axis)
    return field


@lru_cache(maxsize=256)
def _zoom_matrix(n_in: int, n_out: int, order: int, mode: str, grid_mode: bool) -> np.ndarray:
    """(n_out, n_in): the 1D zoom of :func:`separable_zoom` as a matrix."""
    zoom = n_out / n_in
    columns = [ndimage.zoom(unit, zoom, order=order, mode=mode, grid_mode=grid_mode) for unit in np.eye(n_in)]
    return np.stack(columns, axis=1)[:n_out]


def rotation_matrix(angles_deg) -> np.ndarray:
    """3x3 rotation: rotations about axes 0, 1, 2 by ``angles_deg`` (degrees), applied in that order."""
    matrix = np.eye(3)
    for axis, angle in enumerate(np.radians(np.asarray(angles_deg, dtype=float))):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = np.cos(angle)
        r[a, b], r[b, a] = -np.sin(angle), np.sin(angle)
        matrix = r @ matrix
    return matrix


def deterministic_uuid(rng: np.random.Generator) -> str:
    """A version-4 UUID string from 16 bytes of ``rng`` (so ids are reproducible from a seed)."""
    return str(uuid.UUID(bytes=bytes(rng.integers(0, 256, size=16, dtype="uint8").tolist()), version=4))
