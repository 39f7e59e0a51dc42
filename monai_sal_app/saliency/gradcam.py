"""Grad-CAM (Selvaraju et al. 2017), 2D and 3D.

cam = ReLU(sum_k alpha_k A_k) with alpha_k the mean of d logit_target / d A_k over *all* spatial
dims of the layer (2 or 3), upsampled bi/trilinearly to the input grid. Never inverted.

Written here because monai.visualize's GradCAM is inverted by default and mixes targets across
a batch in monai 1.6.1; cross-checked against captum's LayerGradCam in the tests.

Definition and reference: docs/METHODS.md#grad-cam.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from monai_sal_app.saliency.core import chunks, register, target_scores

_POOLING = (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd)


def _capture_layer(model: nn.Module, layer: str | None, spatial_dims: int, x: torch.Tensor):
    """Forward ``x`` and capture the activation of ``layer`` (or of the last feature block).

    With ``layer=None`` the layer is the last module, in order of completion, whose output is a
    (N, K, *spatial) tensor and that is not a pooling layer: the last convolutional feature block
    (``class_layers.relu`` in MONAI's DenseNet, ``layer4`` in its ResNet, ``features`` in conv5-fc3),
    unless the model names its own with a ``cam_layer`` attribute (a WILDCAT head does).
    Returns (logits, name, activation). All hooks are removed before returning.
    """
    if layer is None and isinstance(getattr(model, "cam_layer", None), str):
        layer = model.cam_layer
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}")
    watched = {layer: modules[layer]} if layer is not None else {n: m for n, m in modules.items() if n}
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            if (
                isinstance(output, torch.Tensor)
                and output.ndim == spatial_dims + 2
                and not isinstance(module, _POOLING)
            ):
                seen.append((name, output))

        return hook

    try:
        for name, module in watched.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError(f"no {spatial_dims}D feature map found in {type(model).__name__} for Grad-CAM; pass layer=")
    name, activation = seen[-1]
    return logits, name, activation


def gradcam_layer_maps(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, layer: str | None, batch_size: int | None
) -> torch.Tensor:
    """ReLU(sum_k alpha_k A_k) on the layer's own grid, (N, 1, *layer_spatial)."""
    spatial_dims = images.ndim - 2
    maps = []
    for sl in chunks(images.shape[0], batch_size):
        x = images[sl].detach().clone().requires_grad_(True)
        logits, _, activation = _capture_layer(model, layer, spatial_dims, x)
        (grad,) = torch.autograd.grad(target_scores(logits, target[sl]).sum(), activation)
        maps.append(cam_from_gradient(activation, grad))
    return torch.cat(maps)


def cam_from_gradient(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of ``grad`` (both (N, K, *s)); (N, 1, *s), detached."""
    alpha = grad.mean(dim=tuple(range(2, grad.ndim)), keepdim=True)
    return F.relu((alpha * activation).sum(dim=1, keepdim=True)).detach()


def upsample_to(maps: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Bi/trilinear resize of (N, 1, *s) maps to ``spatial`` (align_corners=False)."""
    if tuple(maps.shape[2:]) == tuple(spatial):
        return maps
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(maps, size=tuple(spatial), mode=mode, align_corners=False)


@register("gradcam", "Grad-CAM on the last convolutional feature block, upsampled to the input grid", hooks=True)
def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    layer: str | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Grad-CAM maps (N, 1, *spatial), non-negative."""
    return upsample_to(gradcam_layer_maps(model, images, target, layer, batch_size), images.shape[2:])
