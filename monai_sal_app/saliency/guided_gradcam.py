"""Guided Grad-CAM (Selvaraju et al. 2017), 2D and 3D: guided backprop times Grad-CAM.

map = sum_c GB_c(x) * CAM(x), with GB our guided backprop (every ReLU, module or functional,
see ``saliency.guided_backprop``) and CAM our Grad-CAM upsampled bi/trilinearly to the input grid
(``saliency.gradcam``, same ``layer`` choice). captum's ``GuidedGradCam`` computes the same product
(with ``interpolate_mode`` bilinear/trilinear) on networks whose ReLUs are modules; the tests
compare against it.

Both parts come from one forward pass per chunk: the ReLUs run through the guided autograd
function, whose backward is the plain ReLU's for Grad-CAM's layer gradient and the guided one for
the input gradient (captum and the two-call version run the network forward twice).

Definition and reference: docs/METHODS.md#guided-grad-cam.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_sal_app.saliency.core import auto_batch_size, chunks, register, target_scores
from monai_sal_app.saliency.gradcam import _capture_layer, cam_from_gradient, upsample_to
from monai_sal_app.saliency.guided_backprop import guided_relus, require_relu_calls


@register(
    "guided_gradcam",
    "guided backprop times Grad-CAM (upsampled to the input grid)",
    passes=lambda p, shape: 2,
    signed=True,
    hooks=True,
)
def guided_gradcam(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    layer: str | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Guided Grad-CAM maps (N, 1, *spatial), signed.

    Args:
        layer: Grad-CAM's layer (a module name); None = the last convolutional feature block.
        batch_size: images per pass; None picks it from free memory.
    """
    if batch_size is None:
        batch_size = auto_batch_size(model, images, 1)
    spatial_dims = images.ndim - 2
    maps = []
    with guided_relus() as mode:
        for sl in chunks(images.shape[0], batch_size):
            x = images[sl].detach().clone().requires_grad_(True)
            logits, _, activation = _capture_layer(model, layer, spatial_dims, x)
            score = target_scores(logits, target[sl]).sum()
            mode.guided = False
            (layer_grad,) = torch.autograd.grad(score, activation, retain_graph=True)
            mode.guided = True
            (input_grad,) = torch.autograd.grad(score, x)
            cam = upsample_to(cam_from_gradient(activation, layer_grad), images.shape[2:])
            maps.append(input_grad.sum(dim=1, keepdim=True) * cam)
    require_relu_calls(mode, model)
    return torch.cat(maps).detach()
