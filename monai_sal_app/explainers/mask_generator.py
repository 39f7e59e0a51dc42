"""Real-time saliency masks (Dabkowski and Gal 2017) for a frozen classifier, 2D and 3D.

One forward pass of :class:`MaskGenerator` gives, for an image and a target class, a mask in
[0, 1] at 1/4 of the input resolution (upsampled to the input grid for use): high where the class's
evidence is. It is trained (:func:`mask_generator_losses`, ``explainers.train``) with the loss of
the authors' code (PiotrDabkowski/pytorch-saliency), not the paper's formula:

    destroyer + area_weight x area + smoothness_weight x smoothness + preserver_weight x preserver

* destroyer: the image with the masked region replaced by an alternative image must lose the class,
  hinge max(0, z_target - z_best_other + destroyer_margin) on the logits (margin 5);
* preserver: the image keeping only the masked region (the rest replaced) must keep the class,
  hinge max(0, z_best_other - z_target + preserver_margin) (margin 1);
* area: mean((m + 5e-4)^area_power), area_power 0.3; weight 8;
* smoothness: squared differences between neighbouring mask values along every axis plus 0.3 x the
  squared border values, summed and divided by 2 x the batch size (the authors' total variation);
* the alternative image is, with probability 0.5 per image, the image blurred with sigma = 5% of
  its side, else Gaussian noise (std 0.055) plus a constant drawn from U(0.335, 0.665); the kept
  image gets noise of std 0.015 (the authors' values on [-1, 1] images, here on [0, 1] images).

The generator is a small encoder-decoder: four stride-2 stages to 1/16 of the input, where the
target class's embedding gates the features (the authors' class selector), and two upsampling
stages with skip connections back to 1/4; two output channels a, b give the mask |a| / (|a| + |b|).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monai_sal_app.models.filters import gaussian_blur

__all__ = ["MASK_GENERATOR_DEFAULTS", "MaskGenerator", "alternative_images", "mask_generator_losses"]

MASK_GENERATOR_DEFAULTS = {
    "channels": [16, 32, 64, 128],
    "area_weight": 8.0,
    "smoothness_weight": 0.5,
    "preserver_weight": 0.3,
    "area_power": 0.3,
    "destroyer_margin": 5.0,
    "preserver_margin": 1.0,
    "blur_probability": 0.5,
}
MASK_DOWNSAMPLE = 4  # the mask's grid is the input's divided by this
_DEPTH = 16  # the encoder divides the grid by this: input sides must be multiples of it


def _block(spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    return nn.Sequential(
        conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        norm(out_channels),
        nn.ReLU(),
        conv(out_channels, out_channels, 3, padding=1, bias=False),
        norm(out_channels),
        nn.ReLU(),
    )


class MaskGenerator(nn.Module):
    """Masks (N, 1, *spatial / 4) in [0, 1] for images (N, in_channels, *spatial) and target classes (N,).

    Every input side must be a multiple of 16. ``channels``: the four encoder widths.
    """

    def __init__(self, spatial_dims: int, num_classes: int, in_channels: int = 1, channels=(16, 32, 64, 128)):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        c = [int(v) for v in channels]
        if len(c) != 4 or min(c) < 1:
            raise ValueError(f"channels must be 4 positive widths, got {channels!r}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims = spatial_dims
        self.encoder = nn.ModuleList(
            [_block(spatial_dims, in_channels if i == 0 else c[i - 1], c[i], stride=2) for i in range(4)]
        )
        self.selector = nn.Embedding(num_classes, c[3])
        nn.init.normal_(self.selector.weight, 0.0, c[3] ** -0.5)
        self.up8 = _block(spatial_dims, c[3] + c[2], c[2])  # 1/16 -> 1/8, with the 1/8 skip
        self.up4 = _block(spatial_dims, c[2] + c[1], c[1])  # 1/8 -> 1/4, with the 1/4 skip
        self.to_mask = conv(c[1], 2, 1)

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if any(side % _DEPTH for side in images.shape[2:]):
            raise ValueError(
                f"the mask generator needs image sides that are multiples of {_DEPTH}, got {tuple(images.shape[2:])}"
            )
        skips = []
        x = images
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        embedding = self.selector(target).view(*target.shape, -1, *([1] * self.spatial_dims))
        gate = torch.sigmoid((x * embedding).sum(dim=1, keepdim=True))
        x = x * gate
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        x = F.interpolate(x, size=skips[2].shape[2:], mode=mode, align_corners=False)
        x = self.up8(torch.cat([x, skips[2]], dim=1))
        x = F.interpolate(x, size=skips[1].shape[2:], mode=mode, align_corners=False)
        x = self.up4(torch.cat([x, skips[1]], dim=1))
        a, b = self.to_mask(x).abs().unbind(dim=1)
        return (a / (a + b + 1e-8)).unsqueeze(1)


def upsampled_mask(mask: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """A (N, 1, *s) mask resized bi/trilinearly to ``spatial``."""
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(mask, size=tuple(spatial), mode=mode, align_corners=False)


def alternative_images(images: torch.Tensor, blur_probability: float, generator: torch.Generator) -> torch.Tensor:
    """Per image, with probability ``blur_probability`` the image blurred (sigma 5% of each side), else
    noise (std 0.055) plus a constant from U(0.335, 0.665); same shape as ``images`` (on [0, 1])."""

    n, spatial = images.shape[0], images.shape[2:]
    shape_one = (n, *([1] * (images.ndim - 1)))
    blurred = gaussian_blur(images, tuple(0.05 * side for side in spatial))
    noise = torch.randn(images.shape, generator=generator).to(images) * 0.055
    constant = (0.335 + 0.33 * torch.rand(shape_one, generator=generator)).to(images)
    use_blur = (torch.rand(shape_one, generator=generator) < blur_probability).to(images)
    return use_blur * blurred + (1 - use_blur) * (noise + constant)


def _margin_over_best_other(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z_target - max_{j != target} z_j per row, (N,)."""
    this = logits.gather(1, target.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, target.view(-1, 1), float("-inf"))
    return this - others.max(dim=1).values


def smoothness_loss(mask: torch.Tensor, border_weight: float = 0.3) -> torch.Tensor:
    """The authors' total variation: squared neighbour differences along every spatial axis plus
    ``border_weight`` x the squared values on the border, summed, divided by 2 x batch size."""
    total = mask.new_zeros(())
    for axis in range(2, mask.ndim):
        total = total + mask.diff(dim=axis).pow(2).sum()
        size = mask.shape[axis]
        total = total + border_weight * (
            mask.narrow(axis, 0, 1).pow(2).sum() + mask.narrow(axis, size - 1, 1).pow(2).sum()
        )
    return total / (2 * mask.shape[0])


def mask_generator_losses(
    generator: MaskGenerator,
    classifier: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    settings: dict,
    noise: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (scalars): ``destroyer``, ``area``, ``smoothness``, ``preserver`` and
    their weighted sum ``total`` (see the module docstring). ``classifier`` is frozen by the caller."""
    mask = upsampled_mask(generator(images, target), images.shape[2:])
    alternative = alternative_images(images, settings["blur_probability"], noise)
    kept = images + torch.randn(images.shape, generator=noise).to(images) * 0.015
    destroyed = (1 - mask) * kept + mask * alternative
    preserved = mask * kept + (1 - mask) * alternative
    destroyer = F.relu(_margin_over_best_other(classifier(destroyed), target) + settings["destroyer_margin"]).mean()
    preserver = F.relu(settings["preserver_margin"] - _margin_over_best_other(classifier(preserved), target)).mean()
    area = (mask + 5e-4).pow(settings["area_power"]).mean()
    smoothness = smoothness_loss(mask)
    total = (
        destroyer
        + settings["area_weight"] * area
        + settings["smoothness_weight"] * smoothness
        + settings["preserver_weight"] * preserver
    )
    return {"total": total, "destroyer": destroyer, "area": area, "smoothness": smoothness, "preserver": preserver}
