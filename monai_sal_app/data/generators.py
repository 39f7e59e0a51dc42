"""Registry of dataset generators, by the name the CLI uses (``monai-sal data <name>``).

Every generator has the signature
``generate(out_dir, preset=..., dim=..., size=None, per_class=None, seed=0, progress=True) -> Path``
and returns the path of the manifest it wrote (see ``data.manifest``); all of them write through the
skeleton of ``data.dataset_writer``. :data:`PRESETS` lists each generator's preset names (the first is
its default) and :data:`DEFAULT_DIM` its default ``dim`` (2 or 3).

The real-anatomy generators (``brain-atrophy``, ``chest-xray``, ``ct-lesions``) need the bases that
``scripts/install_data.sh`` installs (docs/DATA_REAL.md); their modules are imported only when called.
"""

from __future__ import annotations

from collections.abc import Callable

from monai_sal_app.data.shepp_logan import PRESETS as SHEPP_LOGAN_PRESETS
from monai_sal_app.data.shepp_logan import generate_shepp_logan

__all__ = ["DEFAULT_DIM", "GENERATORS", "PRESETS"]

DEFAULT_DIM: dict[str, int] = {
    "shepp-logan": 2,
    "brain-atrophy": 3,
    "chest-xray": 2,
    "ct-lesions": 3,
}


def generate_brain_atrophy(
    out_dir, preset="homogeneous", dim=DEFAULT_DIM["brain-atrophy"], size=None, per_class=None, seed=0, progress=True
):
    """Brain atrophy on the Colin27 T1 (see :func:`monai_sal_app.data.brain_atrophy.generate_brain_atrophy`)."""
    from monai_sal_app.data.brain_atrophy import generate_brain_atrophy as generate

    return generate(out_dir, preset=preset, dim=dim, size=size, per_class=per_class, seed=seed, progress=progress)


def generate_chest_xray(
    out_dir, preset="train", dim=DEFAULT_DIM["chest-xray"], size=None, per_class=None, seed=0, progress=True
):
    """Chest X-ray opacities in the RSNA layout (see :func:`monai_sal_app.data.chest_xray.generate_chest_xray`)."""
    from monai_sal_app.data.chest_xray import generate_chest_xray as generate

    return generate(out_dir, preset=preset, dim=dim, size=size, per_class=per_class, seed=seed, progress=progress)


def generate_ct_lesions(
    out_dir, preset="train", dim=DEFAULT_DIM["ct-lesions"], size=None, per_class=None, seed=0, progress=True
):
    """CT lesions on pyradiomics' lung CTs (see :func:`monai_sal_app.data.ct_lesions.generate_ct_lesions`)."""
    from monai_sal_app.data.ct_lesions import generate_ct_lesions as generate

    return generate(out_dir, preset=preset, dim=dim, size=size, per_class=per_class, seed=seed, progress=progress)


GENERATORS: dict[str, Callable] = {
    "shepp-logan": generate_shepp_logan,
    "brain-atrophy": generate_brain_atrophy,
    "chest-xray": generate_chest_xray,
    "ct-lesions": generate_ct_lesions,
}
PRESETS: dict[str, tuple[str, ...]] = {
    "shepp-logan": tuple(SHEPP_LOGAN_PRESETS),
    "brain-atrophy": ("homogeneous", "heterogeneous", "test", "mild"),
    "chest-xray": ("train", "test", "subtle"),
    "ct-lesions": ("train", "test"),
}
