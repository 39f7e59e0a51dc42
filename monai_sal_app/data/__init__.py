"""Data: the Shepp-Logan subtype generator, image I/O with clear errors, and the dataset manifest.

Importing this package imports neither torch nor MONAI (about 1 s and 5 s at start-up): the few
functions that return tensors or a ``monai.data.Dataset`` (:func:`load_images`, :func:`load_labels`,
the ``*_dataset`` readers) import them when called.
"""

from monai_sal_app.data.io import SUPPORTED_SUFFIXES, ImageError, check_image, read_image, write_nifti
from monai_sal_app.data.manifest import COLUMNS, load_images, load_labels, read_manifest, write_manifest
from monai_sal_app.data.shepp_logan import (
    EVIDENCE_REGION,
    PRESETS,
    SUBTYPE_LABELS,
    SUBTYPES,
    Preset,
    Variation,
    generate_shepp_logan,
    shepp_logan_phantom,
    subtype_counts,
)

__all__ = [
    "COLUMNS",
    "EVIDENCE_REGION",
    "PRESETS",
    "SUBTYPES",
    "SUBTYPE_LABELS",
    "SUPPORTED_SUFFIXES",
    "ImageError",
    "Preset",
    "Variation",
    "check_image",
    "generate_shepp_logan",
    "load_images",
    "load_labels",
    "read_image",
    "read_manifest",
    "shepp_logan_phantom",
    "subtype_counts",
    "write_manifest",
    "write_nifti",
]
