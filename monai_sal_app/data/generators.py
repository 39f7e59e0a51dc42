"""Registry of dataset generators, by the name the CLI uses (``monai-sal data <name>``).

Every generator has the signature
``generate(out_dir, preset=..., dim=..., size=None, per_class=None, seed=0, progress=True) -> Path``
and returns the path of the manifest it wrote (see ``data.manifest``); all of them write through the
skeleton of ``data.dataset_writer``. :data:`GENERATORS` maps each name to its :class:`GeneratorSpec`:
the function and its ``DatasetSpec`` (presets, dims and sizes), whose defaults the CLI's ``data``
sub-command and its help read from here.

The real-anatomy generators (``brain-atrophy``, ``chest-xray``, ``ct-lesions``) need the bases that
``scripts/install_data.sh`` installs (docs/DATA_REAL.md); a missing base is reported when one is called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from monai_sal_app.arguments import keyword_defaults
from monai_sal_app.data import brain_atrophy, chest_xray, ct_lesions, shepp_logan
from monai_sal_app.data.dataset_writer import DatasetSpec

__all__ = ["GENERATORS", "GeneratorSpec", "get_generator"]


@dataclass(frozen=True)
class GeneratorSpec:
    """A registered generator: ``generate(out_dir, preset, dim, size, per_class, seed, progress) ->
    manifest Path`` and the ``DatasetSpec`` of its data sets. Its defaults are read from them: the
    preset and dim from the signature of ``generate``, the side in pixels/voxels per dim from the spec."""

    generate: Callable[..., Path]
    dataset: DatasetSpec

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def presets(self) -> tuple[str, ...]:
        return tuple(self.dataset.presets)

    @property
    def default_preset(self) -> str:
        return keyword_defaults(self.generate)["preset"]

    @property
    def default_dim(self) -> int:
        return keyword_defaults(self.generate)["dim"]

    @property
    def default_size(self) -> Mapping[int, int]:
        """Pixels/voxels per side when ``size`` is None, per dim (its keys: the dims it makes)."""
        return self.dataset.default_size


GENERATORS: dict[str, GeneratorSpec] = {
    spec.name: spec
    for spec in (
        GeneratorSpec(shepp_logan.generate_shepp_logan, shepp_logan.DATASET_SPEC),
        GeneratorSpec(brain_atrophy.generate_brain_atrophy, brain_atrophy.DATASET_SPEC),
        GeneratorSpec(chest_xray.generate_chest_xray, chest_xray.DATASET_SPEC),
        GeneratorSpec(ct_lesions.generate_ct_lesions, ct_lesions.DATASET_SPEC),
    )
}


def get_generator(name: str) -> GeneratorSpec:
    """The :class:`GeneratorSpec` called ``name``; ValueError naming the known generators otherwise."""
    if name not in GENERATORS:
        raise ValueError(f"unknown data generator {name!r}; one of {', '.join(GENERATORS)}")
    return GENERATORS[name]
