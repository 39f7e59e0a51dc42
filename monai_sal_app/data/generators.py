"""Registry of dataset generators, by the name the CLI uses (``monai-sal data <name>``).

Every generator has the signature
``generate(out_dir, preset=..., dim=..., size=None, per_class=None, seed=0, progress=True) -> Path``
and returns the path of the manifest it wrote (see ``data.manifest``).
"""

from __future__ import annotations

from typing import Callable

from monai_sal_app.data.shepp_logan import PRESETS as SHEPP_LOGAN_PRESETS
from monai_sal_app.data.shepp_logan import generate_shepp_logan

__all__ = ["GENERATORS", "PRESETS"]

GENERATORS: dict[str, Callable] = {"shepp-logan": generate_shepp_logan}
PRESETS: dict[str, tuple[str, ...]] = {"shepp-logan": tuple(SHEPP_LOGAN_PRESETS)}
