"""WILDCAT class maps as saliency maps (Durand et al. 2017), 2D and 3D.

The map of class c is the WILDCAT head's class map c (after class-wise pooling, before spatial
pooling; ``models.wildcat``), upsampled bi/trilinearly from the feature grid to the input grid.
With ``contrast``, the mean of the other classes' maps is subtracted from it: the evidence for c
against the other classes, which is what a softmax decides on (a head with negative evidence,
alpha != 0, may put what tells the classes apart in another class's low values). One forward pass,
no gradient. Only for a model with a WILDCAT head (``monai-sal train --head wildcat``).
"""

from __future__ import annotations

import torch
from torch import nn

from monai_sal_app.models.wildcat import WildcatClassifier
from monai_sal_app.saliency.core import check_target_range, chunks, register
from monai_sal_app.saliency.gradcam import upsample_to


def _has_wildcat_head(model: nn.Module) -> bool:
    return isinstance(model, WildcatClassifier)


@register(
    "wildcat",
    "the WILDCAT head's class map of the target class, upsampled to the input grid (one forward pass)",
    requires=(_has_wildcat_head, "it needs a model with a WILDCAT head (monai-sal train --head wildcat)"),
    signed=True,
)
def wildcat(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    contrast: bool = False,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Class maps (N, 1, *spatial) of the target classes, signed (a class map's values are logit
    evidence); with ``contrast``, each minus the mean of the other classes' maps."""
    if not isinstance(contrast, bool):
        raise TypeError(f"contrast must be a bool, got {contrast!r}")
    maps = []
    with torch.no_grad():
        for sl in chunks(images.shape[0], batch_size):
            class_maps = model.class_maps(images[sl])
            check_target_range(target[sl], class_maps.shape[1])
            rows = torch.arange(class_maps.shape[0], device=class_maps.device)
            picked = class_maps[rows, target[sl]]
            if contrast:
                others = (class_maps.sum(dim=1) - picked) / (class_maps.shape[1] - 1)
                picked = picked - others
            maps.append(upsample_to(picked.unsqueeze(1), images.shape[2:]))
    return torch.cat(maps)
