"""The data-writing skeleton shared by the dataset generators (``data.generators``).

A generator declares a :class:`DatasetSpec` (its preset table, default sizes, how many subjects of each
subtype, how subjects are named) and supplies one function that makes one subject; this module does the
rest, the same way for every generator:

1. :meth:`DatasetSpec.resolve` checks the arguments (preset name or object, dim, size, per_class, seed)
   before anything is loaded or written and returns a :class:`DatasetRequest`;
2. :func:`write_dataset` draws a random order of the subtypes and one independent random stream per
   subject from ``SeedSequence([seed, crc32(stream)])``, calls the generator's ``make_subject`` once per
   subject in that order, writes each returned :class:`Subject` as NIfTI files (``images/<id>.nii.gz``,
   ``masks/<id>[_<region>].nii.gz``) and finally the manifest (``manifest.csv``, see :mod:`.manifest`).

Identical arguments give identical files; the ``stream`` name (e.g. preset, dim and size) separates the
random streams of data sets that should differ even with the same seed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from monai_sal_app.arguments import check_integer
from monai_sal_app.data.io import write_nifti
from monai_sal_app.data.manifest import PATH_COLUMNS, write_manifest

__all__ = [
    "MIN_SIZE",
    "DatasetRequest",
    "DatasetSpec",
    "Subject",
    "check_subject_args",
    "write_dataset",
]

MIN_SIZE = 16
_MASK_COLUMNS = tuple(c for c in PATH_COLUMNS if c.startswith("mask"))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_subject_args(subtype: str, subtypes: tuple[str, ...], size: int, dim: int) -> None:
    """The checks of the ``*_subject`` functions: ``subtype`` in ``subtypes``, ``dim`` 2 or 3, ``size`` an
    integer >= :data:`MIN_SIZE` (pixels per side). Raises ``ValueError`` naming the bad argument."""
    if subtype not in subtypes:
        raise ValueError(f"unknown subtype {subtype!r}; expected one of {subtypes}")
    if not _is_int(dim) or dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    if not _is_int(size) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")


@dataclass(frozen=True)
class DatasetRequest:
    """Checked arguments of one generator call (made by :meth:`DatasetSpec.resolve`).

    ``preset_name``: the preset's name in the spec's table, or ``"custom"`` for a preset object;
    ``preset``: the preset object; ``dim``: 2 or 3; ``size``: pixels per side of the written images;
    ``per_class``: subjects per class (the preset's unless overridden); ``seed``: integer >= 0.
    """

    spec: DatasetSpec
    preset_name: str
    preset: Any
    dim: int
    size: int
    per_class: int
    seed: int


@dataclass(frozen=True)
class DatasetSpec:
    """What one generator's data sets are made of (everything but how to make one subject).

    - ``name``: the generator's registry name (``"shepp-logan"``), used in messages.
    - ``presets``: ``{preset name: preset object}``; ``preset_type``: the class a custom preset must be.
      Preset objects have a ``per_class`` attribute (subjects per class unless the call overrides it).
    - ``subtype_counts``: ``(preset, per_class) -> {subtype: number of subjects}``, in the order the
      subjects are listed before shuffling (the order is part of the random stream: do not reorder).
    - ``default_size``: ``{dim: pixels per side}`` used when ``size`` is None; its keys are the dims the
      generator makes. ``max_size``: largest allowed ``size`` (None: no limit); the smallest is :data:`MIN_SIZE`.
    - ``progress_label``: start of the progress bar's text.
    - subject ids: ``id_prefix`` gives ``<id_prefix><dim>d-<preset name>-<index:06d>``; alternatively
      ``draw_id`` draws the id as the first draw of the subject's random stream (e.g. a UUID).
    """

    name: str
    presets: Mapping[str, Any]
    preset_type: type
    subtype_counts: Callable[[Any, int], dict[str, int]]
    default_size: Mapping[int, int]
    progress_label: str
    id_prefix: str | None = None
    draw_id: Callable[[np.random.Generator], str] | None = None
    max_size: int | None = None

    def __post_init__(self):
        if (self.id_prefix is None) == (self.draw_id is None):
            raise ValueError(f"{self.name}: give exactly one of id_prefix and draw_id")
        if not self.default_size or not set(self.default_size) <= {2, 3}:
            raise ValueError(f"{self.name}: default_size must map dims (2 and/or 3) to sizes, got {self.default_size}")

    @property
    def dims(self) -> tuple[int, ...]:
        """The dims the generator makes (the keys of ``default_size``)."""
        return tuple(self.default_size)

    def resolve(self, preset: Any, dim: Any, size: Any, per_class: Any, seed: Any) -> DatasetRequest:
        """Check a generator's arguments and fill in the defaults; returns a :class:`DatasetRequest`.

        ``preset``: a name in ``presets`` (``ValueError`` otherwise) or a ``preset_type`` instance (named
        ``custom``; any other type is a ``TypeError``). ``dim``: one of :attr:`dims`. ``size``: None (the
        default for ``dim``) or an integer in [:data:`MIN_SIZE`, ``max_size``]. ``per_class``: None (the
        preset's ``per_class``) or a positive integer. ``seed``: an integer >= 0. Raises ``ValueError``
        naming the bad argument.
        """
        if isinstance(preset, str):
            if preset not in self.presets:
                raise ValueError(
                    f"unknown preset {preset!r} for {self.name}; expected one of {sorted(self.presets)} "
                    f"or an instance of {self.preset_type.__name__}"
                )
            preset_name, composition = preset, self.presets[preset]
        elif isinstance(preset, self.preset_type):
            preset_name, composition = "custom", preset
        else:
            raise TypeError(
                f"preset must be a preset name or an instance of {self.preset_type.__name__}, "
                f"got {type(preset).__name__}"
            )
        if not _is_int(dim) or dim not in self.dims:
            only = " or ".join(f"{d}D" for d in self.dims)
            raise ValueError(f"{self.name} data are {only} only; got dim={dim!r}")
        size = self.default_size[dim] if size is None else size
        if not _is_int(size) or size < MIN_SIZE or (self.max_size is not None and size > self.max_size):
            allowed = f">= {MIN_SIZE}" if self.max_size is None else f"in [{MIN_SIZE}, {self.max_size}]"
            raise ValueError(f"size must be an integer {allowed}, got {size!r}")
        per_class = check_integer(composition.per_class if per_class is None else per_class, "per_class")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return DatasetRequest(self, preset_name, composition, int(dim), int(size), per_class, int(seed))


@dataclass(frozen=True)
class Subject:
    """One subject made by a generator, ready to be written by :func:`write_dataset`.

    - ``label``, ``subtype``: its manifest columns.
    - ``image``: array of shape ``(size,) * dim`` (written as float32 to ``images/<id>.nii.gz``).
    - ``masks``: ``{manifest column: bool array of the image's shape}``; ``"mask"`` is written to
      ``masks/<id>.nii.gz``, ``"mask_<region>"`` to ``masks/<id>_<region>.nii.gz`` (uint8).
    - ``evidence``: the key of ``masks`` whose file the manifest's ``mask`` column also names (for
      generators whose masks are per region; None: the ``mask`` column is ``masks["mask"]`` or empty).
    - ``affine``: (4, 4) voxel -> mm of image and masks; None: identity (1 mm voxels).
    """

    label: int
    subtype: str
    image: np.ndarray
    masks: Mapping[str, np.ndarray] = field(default_factory=dict)
    evidence: str | None = None
    affine: np.ndarray | None = None

    def __post_init__(self):
        unknown = sorted(set(self.masks) - set(_MASK_COLUMNS))
        if unknown:
            raise ValueError(f"unknown mask column(s) {unknown}; expected some of {_MASK_COLUMNS}")
        shapes = {column: np.shape(mask) for column, mask in self.masks.items()}
        if any(shape != np.shape(self.image) for shape in shapes.values()):
            raise ValueError(f"mask shapes {shapes} differ from the image's {np.shape(self.image)}")
        if self.evidence is not None and self.evidence not in self.masks:
            raise ValueError(f"evidence {self.evidence!r} is not one of the masks {sorted(self.masks)}")


def _write_subject(out_dir: Path, subject_id: str, subject: Subject) -> dict:
    """Write ``subject``'s NIfTI files under ``out_dir``; return its manifest row (paths relative to ``out_dir``)."""
    row = {
        "id": subject_id,
        "label": subject.label,
        "subtype": subject.subtype,
        "image": f"images/{subject_id}.nii.gz",
    }
    write_nifti(subject.image, out_dir / row["image"], affine=subject.affine)
    for column, mask in subject.masks.items():
        row[column] = f"masks/{subject_id}{column[len('mask') :]}.nii.gz"
        write_nifti(mask, out_dir / row[column], affine=subject.affine)
    if subject.evidence is not None:
        row["mask"] = row[subject.evidence]
    return row


def write_dataset(
    out_dir: str | os.PathLike,
    request: DatasetRequest,
    make_subject: Callable[[str, np.random.Generator, str], Subject],
    stream: str,
    progress: bool = True,
    finish: Callable[[], Any] | None = None,
) -> Path:
    """Write the data set of ``request`` under ``out_dir`` and return the manifest's path.

    The subtypes (``spec.subtype_counts``) are shuffled by a seeded permutation; subject ``index`` of the
    shuffled list gets its own generator ``rng``, its id (module docstring) and then
    ``make_subject(subtype, rng, subject_id) -> Subject``, whose files are written at once. ``stream``:
    name of the random stream (``SeedSequence([seed, crc32(stream)])``). ``finish``: called after the
    last subject, before the manifest is written (e.g. to write tables collected by ``make_subject``).
    """
    spec = request.spec
    subtypes = [s for s, count in spec.subtype_counts(request.preset, request.per_class).items() for _ in range(count)]
    stream_id = zlib.crc32(stream.encode())
    order_seed, *subject_seeds = np.random.SeedSequence([request.seed, stream_id]).spawn(len(subtypes) + 1)
    order = np.random.default_rng(order_seed).permutation(len(subtypes))
    out_dir = Path(out_dir)
    rows = []
    dims = f" {request.dim}D" if len(spec.dims) > 1 else ""
    description = f"{spec.progress_label}{dims} {request.preset_name}"
    for index in tqdm(range(len(subtypes)), desc=description, disable=not progress):
        rng = np.random.default_rng(subject_seeds[index])
        if spec.draw_id is not None:
            subject_id = spec.draw_id(rng)
        else:
            subject_id = f"{spec.id_prefix}{request.dim}d-{request.preset_name}-{index:06d}"
        rows.append(_write_subject(out_dir, subject_id, make_subject(subtypes[order[index]], rng, subject_id)))
    if finish is not None:
        finish()
    return write_manifest(out_dir / "manifest.csv", rows)
