"""Grad-CAM (Selvaraju et al. 2017), 2D and 3D.

cam = ReLU(sum_k alpha_k A_k) with alpha_k the mean of d logit_target / d A_k over *all* spatial
dims of the layer (2 or 3), upsampled bi/trilinearly to the input grid. Never inverted.

Written here because monai.visualize's GradCAM is inverted by default and mixes targets across
a batch in monai 1.6.1; cross-checked against captum's LayerGradCam in the tests.

Definition and reference: docs/METHODS.md#grad-cam.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from monai_sal_app.models.guard import in_place_activations_off
from monai_sal_app.saliency.core import chunks, register, target_scores

_POOLING = (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd)


# model -> {spatial dims: the name of its Grad-CAM layer}, found by the first pass that watched every
# module; weak, so that a model's entry goes with it.
_CAM_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[int, str]] = weakref.WeakKeyDictionary()


def _is_feature_map(module: nn.Module, output, spatial_dims: int) -> bool:
    return isinstance(output, torch.Tensor) and output.ndim == spatial_dims + 2 and not isinstance(module, _POOLING)


def _known_layer(model: nn.Module, layer: str | None, spatial_dims: int) -> str | None:
    """The Grad-CAM layer's name when it is known without a pass: ``layer``, the model's
    ``cam_layer``, or the one an earlier pass of this model found; else None."""
    if layer is not None:
        return layer
    if isinstance(getattr(model, "cam_layer", None), str):
        return model.cam_layer
    return _CAM_LAYERS.get(model, {}).get(spatial_dims)


def _capture_layer(
    model: nn.Module, layer: str | None, spatial_dims: int, x: torch.Tensor, graph_from_layer: bool = False
):
    """Forward ``x`` and capture the activation of ``layer`` (or of the last feature block).

    With ``layer=None`` the layer is the last module, in order of completion, whose output is a
    (N, K, *spatial) tensor and that is not a pooling layer: the last convolutional feature block
    (``class_layers.relu`` in MONAI's DenseNet, ``layer4`` in its ResNet, ``features`` in conv5-fc3),
    unless the model names its own with a ``cam_layer`` attribute (a WILDCAT head does). The first
    pass of a model watches every module to find it; later passes watch that one module only.

    ``graph_from_layer`` (only when the layer is known, see :func:`_known_layer`): the activation
    is taken out of the autograd graph and made to require gradients, so that the graph starts at
    the layer: nothing before it is recorded or kept, for gradients with respect to the activation
    only (``x`` and the parameters must not require gradients). The network's in-place
    activations may stay on: the layers after it receive a copy of the activation, and a pass in
    which the activation changed anyway (through another view of its memory) runs again with
    in-place activations off (``ValueError`` when it changes even then). Without it, the caller
    turns them off.
    Returns (logits, name, activation). All hooks are removed before returning.
    """
    known = _known_layer(model, layer, spatial_dims)
    if graph_from_layer and known is None:
        raise ValueError("graph_from_layer needs a known layer")
    if known is not None:
        try:
            watched = {known: model.get_submodule(known)}
        except AttributeError:
            raise ValueError(f"layer {known!r} is not a module of {type(model).__name__}") from None
    else:
        watched = {n: m for n, m in model.named_modules() if n}
    seen: list[tuple[str, torch.Tensor, int]] = []
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            if not _is_feature_map(module, output, spatial_dims):
                return None
            if graph_from_layer:
                activation = output.detach().requires_grad_(True)
                seen.append((name, activation, activation._version))
                return activation.clone()
            seen.append((name, output, output._version))
            return output

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
    name, activation, version = seen[-1]
    if graph_from_layer and activation._version != version:
        if not any(getattr(m, "inplace", None) is True for m in model.modules()):
            raise ValueError(
                f"the output of layer {name!r} is changed in place after Grad-CAM captures it; pass layer= "
                "a module whose output the network leaves as it is"
            )
        with in_place_activations_off(model):
            return _capture_layer(model, known, spatial_dims, x, graph_from_layer=True)
    if known is None:
        _CAM_LAYERS.setdefault(model, {})[spatial_dims] = name
    return logits, name, activation


def gradcam_layer_maps(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, layer: str | None, batch_size: int | None
) -> torch.Tensor:
    """ReLU(sum_k alpha_k A_k) on the layer's own grid, (N, 1, *layer_spatial).

    Only the activation's gradient is needed: once the layer is known the autograd graph starts at
    it (``_capture_layer``'s ``graph_from_layer``), so the layers before it run as in inference,
    with the network's in-place activations; the first pass of a model that names no layer
    records the whole graph, with in-place activations off, while it finds it.
    """
    spatial_dims = images.ndim - 2
    maps = []
    for sl in chunks(images.shape[0], batch_size):
        known = _known_layer(model, layer, spatial_dims) is not None
        x = images[sl].detach() if known else images[sl].detach().clone().requires_grad_(True)
        with contextlib.nullcontext() if known else in_place_activations_off(model):
            logits, _, activation = _capture_layer(model, layer, spatial_dims, x, graph_from_layer=known)
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


@register(
    "gradcam",
    "Grad-CAM on the last convolutional feature block, upsampled to the input grid",
    hooks=True,
    guards_in_place=True,
)
def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    layer: str | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Grad-CAM maps (N, 1, *spatial), non-negative."""
    return upsample_to(gradcam_layer_maps(model, images, target, layer, batch_size), images.shape[2:])
