"""WILDCAT: a classifier head whose class maps are its saliency maps, 2D and 3D.

Durand, Mordan, Thome, Cord, "WILDCAT: Weakly Supervised Learning of Deep ConvNets for Image
Classification, Pointwise Localization and Segmentation", CVPR 2017. The head replaces the
classifier of a CNN backbone on its last feature block:

    features (N, K, *s) -> 1x1 conv (bias, no norm, no activation) -> (N, C x M, *s)
        -> ClassWisePool(M): mean over each class's M maps -> class maps (N, C, *s)
        -> WildcatPool(kmax, kmin, alpha): per class map, a score -> logits (N, C)

The 1x1 convolution stores its maps per class in contiguous blocks (channels c x M .. c x M + M - 1
belong to class c). Spatial pooling is the mean of the top k+ positions, and when k- > 0 and
alpha != 0, (mean of the top k+ + alpha x mean of the bottom k-) / 2, as the authors' code does it
(the paper has no /2). Unlike that code, alpha = 0 (or k- = 0) drops the bottom term and does not
halve. The class maps, upsampled to the input grid, are the saliency maps (method ``wildcat``).
Defaults (k+ = 0.2, k- = k+, alpha = 0.7, M = 8) are the reference's VOC settings.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import DenseNet, ResNet
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.models.conv5fc3 import Conv5FC3

__all__ = [
    "WILDCAT_DEFAULTS",
    "ClassWisePool",
    "WildcatClassifier",
    "WildcatPool",
    "positions_to_keep",
    "wildcat_settings",
]

WILDCAT_DEFAULTS = {"kmax": 0.2, "kmin": None, "alpha": 0.7, "maps": 8}


def _check_k(name: str, k: Any, allow_zero: bool) -> float | int:
    """A fraction in (0, 1) or a whole count (>= 1, or 0 when allowed); ValueError otherwise."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"{name} must be a fraction in (0, 1) or a whole count, got {k!r}")
    if 0 < k < 1:
        return float(k)
    if k == int(k) and (k >= 1 or (allow_zero and k == 0)):
        return int(k)
    low = "0" if allow_zero else "1"
    raise ValueError(f"{name} must be a fraction in (0, 1) or a whole count >= {low}, got {k!r}")


def positions_to_keep(k: float | int, positions: int) -> int:
    """How many of ``positions`` spatial positions ``k`` selects: a fraction in (0, 1) gives
    round(k x positions) and at least 1; a count is capped at ``positions``; 0 gives 0."""
    if 0 < k < 1:
        return max(1, round(k * positions))
    return min(int(k), positions)


class ClassWisePool(nn.Module):
    """Mean over each class's ``maps`` maps: (N, C x M, *spatial) -> (N, C, *spatial), any spatial dims.

    Channels c x M .. c x M + M - 1 belong to class c (the 1x1 convolution's contiguous blocks).
    """

    def __init__(self, maps: int) -> None:
        super().__init__()
        self.maps = check_integer(maps, "maps (M, maps per class)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3 or x.shape[1] % self.maps:
            raise ValueError(
                f"ClassWisePool({self.maps}) needs (N, C x {self.maps}, *spatial), got shape {tuple(x.shape)}"
            )
        n, channels = x.shape[:2]
        return x.reshape(n, channels // self.maps, self.maps, *x.shape[2:]).mean(dim=2)

    def extra_repr(self) -> str:
        return f"maps={self.maps}"


class WildcatPool(nn.Module):
    """Spatial pooling of class maps: (N, C, *spatial) -> (N, C), any spatial dims.

    Score = mean of the top ``kmax`` positions; when ``kmin`` > 0 and ``alpha`` != 0,
    (mean of the top ``kmax`` + ``alpha`` x mean of the bottom ``kmin``) / 2. ``kmax`` and ``kmin``
    are fractions of the positions in (0, 1) (round(k x positions), at least 1) or whole counts;
    ``kmin=None`` means ``kmin = kmax``; ``kmin=0`` or ``alpha=0`` means no bottom term (and no /2).
    Gradients reach only the selected positions.
    """

    def __init__(self, kmax: float | int = 0.2, kmin: float | int | None = None, alpha: float = 0.7) -> None:
        super().__init__()
        self.kmax = _check_k("kmax", kmax, allow_zero=False)
        self.kmin = self.kmax if kmin is None else _check_k("kmin", kmin, allow_zero=True)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha != alpha:
            raise ValueError(f"alpha must be a real number, got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"WildcatPool needs class maps (N, C, *spatial), got shape {tuple(x.shape)}")
        flat = x.flatten(start_dim=2)
        positions = flat.shape[-1]
        top = flat.topk(positions_to_keep(self.kmax, positions), dim=-1).values.mean(dim=-1)
        kmin = positions_to_keep(self.kmin, positions)
        if kmin == 0 or self.alpha == 0:
            return top
        bottom = flat.topk(kmin, dim=-1, largest=False).values.mean(dim=-1)
        return (top + self.alpha * bottom) / 2

    def extra_repr(self) -> str:
        return f"kmax={self.kmax}, kmin={self.kmin}, alpha={self.alpha}"


def wildcat_settings(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The WILDCAT options, defaults filled in and validated: {"kmax", "kmin", "alpha", "maps"}.

    Raises ValueError naming an unknown or invalid option (the model card and the CLI use this).
    """
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(WILDCAT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown WILDCAT option(s) {unknown}; known: {sorted(WILDCAT_DEFAULTS)}")
    merged = {**WILDCAT_DEFAULTS, **settings}
    pool = WildcatPool(merged["kmax"], merged["kmin"], merged["alpha"])
    ClassWisePool(merged["maps"])
    return {
        "kmax": pool.kmax,
        "kmin": None if merged["kmin"] is None else pool.kmin,
        "alpha": pool.alpha,
        "maps": int(merged["maps"]),
    }


def _backbone_features(network: nn.Module) -> nn.Module:
    """The feature extractor of a network built by ``models.factory``: everything before its
    global pooling, as a module whose output is (N, K, *spatial) and non-negative."""
    if isinstance(network, DenseNet):  # features end in norm5; the stock head starts with its ReLU
        return nn.Sequential(OrderedDict([*network.features.named_children(), ("relu", nn.ReLU())]))
    if isinstance(network, ResNet):
        parts = [("conv1", network.conv1), ("bn1", network.bn1), ("act", network.act)]
        if not network.no_max_pool:
            parts.append(("maxpool", network.maxpool))
        parts += [(name, getattr(network, name)) for name in ("layer1", "layer2", "layer3", "layer4")]
        return nn.Sequential(OrderedDict(parts))
    if isinstance(network, Conv5FC3):
        return network.features
    raise ValueError(f"a WILDCAT head needs a DenseNet, ResNet or conv5-fc3 backbone, got {type(network).__name__}")


def _feature_channels(features: nn.Module) -> int:
    """Channels K of the features' output: those of their last normalisation layer."""
    norms = [m for m in features.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
    if not norms:
        raise ValueError("cannot tell the backbone's feature channels (no BatchNorm layer)")
    return norms[-1].num_features


class WildcatClassifier(nn.Module):
    """A CNN backbone's feature blocks with a WILDCAT head; logits (N, num_classes) for (N, C_in, *spatial).

    Modules: ``features`` (the backbone up to its last feature block), ``classifier`` (the 1x1
    convolution to ``num_classes x maps`` maps), ``class_pool`` (:class:`ClassWisePool`),
    ``spatial_pool`` (:class:`WildcatPool`). :meth:`class_maps` gives the (N, num_classes, *s)
    maps on the feature grid. ``cam_layer`` names the layer Grad-CAM uses by default.
    """

    cam_layer = "features"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        kmax: float | int = WILDCAT_DEFAULTS["kmax"],
        kmin: float | int | None = WILDCAT_DEFAULTS["kmin"],
        alpha: float = WILDCAT_DEFAULTS["alpha"],
        maps: int = WILDCAT_DEFAULTS["maps"],
    ) -> None:
        super().__init__()
        self.features = _backbone_features(backbone)
        spatial_dims = 3 if any(isinstance(m, nn.Conv3d) for m in self.features.modules()) else 2
        convolution = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        class_pool, spatial_pool = ClassWisePool(maps), WildcatPool(kmax, kmin, alpha)
        self.spatial_dims = spatial_dims
        self.num_classes = int(num_classes)
        # registered in forward order (randomization checks walk the children from the logits down)
        self.classifier = convolution(_feature_channels(self.features), self.num_classes * class_pool.maps, 1)
        self.class_pool = class_pool
        self.spatial_pool = spatial_pool

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Class maps (N, num_classes, *feature_spatial) for images (N, C_in, *spatial)."""
        return self.class_pool(self.classifier(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_pool(self.class_maps(x))
