"""Classifier factory over ``monai.networks.nets`` (2D and 3D), plus the ARAMIS conv5-fc3 CNN.

Every network returns logits of shape (N, num_classes) for images (N, in_channels, *spatial).
Nothing is ever pretrained or downloaded: weights come from :mod:`monai_sal_app.models.checkpoint`.

Grad-CAM contract: the last module (in order of forward completion) whose output is a
(N, K, *spatial) tensor and that is not a pooling layer is ``class_layers.relu`` for the DenseNets,
``layer4`` for the ResNets and ``features`` for :class:`Conv5FC3`. A network with a WILDCAT head
names its own (``cam_layer = "features"``, the backbone's last feature block, before the 1x1
convolution to the class maps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monai.networks.nets import DenseNet121, DenseNet169, ResNet
from monai.networks.nets.resnet import get_inplanes
from torch import nn

from monai_sal_app.models.conv5fc3 import Conv5FC3
from monai_sal_app.models.wildcat import WILDCAT_DEFAULTS, WildcatClassifier, wildcat_settings

ARCHITECTURES = (
    "densenet121",
    "densenet169",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "conv5fc3",
)


@dataclass(frozen=True)
class Head:
    """A classifier head put on a network's last feature block instead of its own classifier.

    ``defaults``: every option with its default; ``settings(options) -> options``: the options
    validated, defaults filled in (ValueError naming an unknown or invalid one); ``build(network,
    num_classes, options) -> nn.Module``: the network with the head, returning logits (N, num_classes).
    """

    name: str
    defaults: Mapping[str, Any]
    settings: Callable[[Mapping[str, Any]], dict[str, Any]]
    build: Callable[[nn.Module, int, dict[str, Any]], nn.Module]


# The classifier on top of the feature blocks: the network's own (no head), or one of these.
HEADS: dict[str, Head] = {
    "wildcat": Head(
        "wildcat",
        WILDCAT_DEFAULTS,
        wildcat_settings,
        lambda network, num_classes, options: WildcatClassifier(network, num_classes, **options),
    ),
}


def get_head(name: Any) -> Head:
    """The registered head called ``name``; ValueError naming the known heads otherwise."""
    if not isinstance(name, str) or name not in HEADS:
        raise ValueError(f"unknown head {name!r}; one of {', '.join(HEADS)} (or none for the network's own)")
    return HEADS[name]


# arch -> (block type, blocks per stage), as in monai.networks.nets.resnet18 ... resnet152.
_RESNET_LAYOUTS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
    "resnet152": ("bottleneck", [3, 8, 36, 3]),
}
_DENSENETS = {"densenet121": DenseNet121, "densenet169": DenseNet169}


def build_classifier(
    arch: str,
    spatial_dims: int,
    in_channels: int = 1,
    num_classes: int = 2,
    head: Mapping[str, Any] | None = None,
    **kwargs,
) -> nn.Module:
    """Build an untrained classifier returning logits (N, num_classes).

    ``head``: None for the network's own classifier, or ``{"name": <a key of HEADS>, **options}`` to
    put that head on the network's last feature block (``"wildcat"``: a
    :class:`~monai_sal_app.models.wildcat.WildcatClassifier`, options ``kmax``, ``kmin``, ``alpha``,
    ``maps``; defaults filled in).
    ``arch`` is one of :data:`ARCHITECTURES`; ``kwargs`` go to the network: for the DenseNets
    e.g. ``init_features``, ``growth_rate``, ``block_config``, ``dropout_prob``; for the ResNets
    ``block_inplanes`` (4 widths) and any ``monai.networks.nets.ResNet`` option
    (``conv1_t_stride``, ``no_max_pool``, ...); for conv5fc3 ``channels``, ``dropout``, ``pools`` and ``first_stride``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if "pretrained" in kwargs:
        raise ValueError("pretrained weights are not supported: load a checkpoint with load_classifier instead")
    if head is None:
        return _build_network(arch, spatial_dims, in_channels, num_classes, **kwargs)
    options = head_options(head)
    network = _build_network(arch, spatial_dims, in_channels, num_classes, **kwargs)
    return get_head(options.pop("name")).build(network, num_classes, options)


def head_options(head: Mapping[str, Any]) -> dict[str, Any]:
    """A head description validated, defaults filled in: ``{"name": <head>, **its options}`` (for
    ``"wildcat"``: ``kmax``, ``kmin``, ``alpha``, ``maps``).

    Raises ValueError naming an unknown head or an invalid option.
    """
    if not isinstance(head, Mapping):
        raise ValueError(f"a head is a mapping {{'name': <head>, **options}}, got {head!r}")
    spec = get_head(head.get("name"))
    options = {key: value for key, value in head.items() if key != "name"}
    return {"name": spec.name, **spec.settings(options)}


def _build_network(arch: str, spatial_dims: int, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    if arch in _DENSENETS:
        return _DENSENETS[arch](
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, pretrained=False, **kwargs
        )
    if arch in _RESNET_LAYOUTS:
        block, layers = _RESNET_LAYOUTS[arch]
        block_inplanes = list(kwargs.pop("block_inplanes", get_inplanes()))
        return ResNet(
            block,
            layers,
            block_inplanes,
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=num_classes,
            **kwargs,
        )
    return Conv5FC3(spatial_dims, in_channels=in_channels, num_classes=num_classes, **kwargs)


def check_arch_kwargs(arch_kwargs: Any, architectures: Sequence[str], what: str = "architectures") -> None:
    """ValueError unless ``arch_kwargs`` maps names among ``architectures`` to keyword options that
    :func:`build_classifier` accepts for them (a 2D, 1-channel, 2-class network is built to check)."""
    if not isinstance(arch_kwargs, Mapping) or not all(isinstance(v, Mapping) for v in arch_kwargs.values()):
        raise ValueError(f"arch_kwargs must map an architecture to its network's options, got {arch_kwargs!r}")
    unused = sorted(set(arch_kwargs) - set(architectures))
    if unused:
        raise ValueError(f"arch_kwargs names architecture(s) {unused} that are not in {what}")
    for arch, options in arch_kwargs.items():
        try:
            build_classifier(arch, 2, **options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"arch_kwargs.{arch}: {err}") from err
