"""Guided Grad-CAM (Selvaraju et al. 2017), 2D and 3D: guided backprop times Grad-CAM.

map = sum_c GB_c(x) * CAM(x), with GB our guided backprop (every ReLU, module or functional,
see ``saliency.guided_backprop``) and CAM our Grad-CAM upsampled bi/trilinearly to the input grid
(``saliency.gradcam``, same ``layer`` choice). captum's ``GuidedGradCam`` computes the same product
(with ``interpolate_mode`` bilinear/trilinear) on networks whose ReLUs are modules; the tests
compare against it.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_sal_app.saliency.core import auto_batch_size, register
from monai_sal_app.saliency.gradcam import gradcam
from monai_sal_app.saliency.guided_backprop import guided_backprop


@register("guided_gradcam", "guided backprop times Grad-CAM (upsampled to the input grid)")
def guided_gradcam(model: nn.Module, images: torch.Tensor, target: torch.Tensor, layer: str | None = None, batch_size: int | None = None) -> torch.Tensor:
    """Guided Grad-CAM maps (N, 1, *spatial), signed.

    Args:
        layer: Grad-CAM's layer (a module name); None = the last convolutional feature block.
        batch_size: images per pass; None picks it from free memory.
    """
    if batch_size is None:
        batch_size = auto_batch_size(model, images, 1)
    cam = gradcam(model, images, target, layer=layer, batch_size=batch_size)
    return guided_backprop(model, images, target, batch_size=batch_size) * cam
