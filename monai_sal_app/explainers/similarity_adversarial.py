"""The similarity-adversarial explainer (after Charachon et al. 2020), 2D and 3D.

One U-Net encoder and decoder shared by two one-channel heads turn the min-max normalised image x
into x_sim (an image close to x that the frozen classifier still assigns to x's predicted class)
and x_adv (an image close to x that it assigns to another class), both in [0, 1]. The explanation
is E(x) = |x_sim - x_adv|: what has to change, and where, to change the decision. Optionally E is
averaged over geometric transforms T and their inverses, mean_T T^-1(E(T(x))), with T running over
the dihedral group of the image plane (4 rotations by 90 degrees, each with and without a flip; in
3D also with and without a flip along the depth axis), so the averaged map commutes with every T.

Loss (weights are settings; the 2020 training code is not public, the weights and the same-class
term are ours):

    adversarial_weight x CE(classifier(x_adv), other class)
    + same_class_weight x CE(classifier(x_sim), predicted class)
    + similarity_weight x (mean |x_sim - x| + mean (x_sim - x)^2 + mean |x_adv - x| + mean (x_adv - x)^2)
    + tv_weight x total variation of (x_sim - x_adv) (mean absolute neighbour difference, summed over axes)

The other class is the classifier's most likely class for x other than its predicted one. The loss
terms also report ``flip_rate`` (not a loss: the share of images whose x_adv the classifier assigns
to another class than the target), so a training history shows it per epoch on training and
validation images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

__all__ = [
    "SIMILARITY_ADVERSARIAL_DEFAULTS",
    "SimilarityAdversarialGenerator",
    "explanation_map",
    "similarity_adversarial_losses",
]

SIMILARITY_ADVERSARIAL_DEFAULTS = {
    "channels": [16, 32, 64, 128],
    "adversarial_weight": 1.0,
    "same_class_weight": 1.0,
    "similarity_weight": 10.0,
    "tv_weight": 1.0,
}


def minmax_images(images: torch.Tensor) -> torch.Tensor:
    """Each image of (N, C, *spatial) scaled to [0, 1] (a constant image becomes 0)."""
    flat = images.flatten(1)
    low = flat.min(dim=1).values.view(-1, *[1] * (images.ndim - 1))
    span = (flat.max(dim=1).values.view(-1, *[1] * (images.ndim - 1)) - low).clamp_min(1e-12)
    return (images - low) / span


class SimilarityAdversarialGenerator(nn.Module):
    """(x_sim, x_adv), each (N, 1, *spatial) in [0, 1], for images (N, in_channels, *spatial).

    MONAI's UNet (``channels`` widths, stride 2 between them, one residual unit each) to
    ``channels[0]`` features on the input grid, then two 1x1 convolution heads and a sigmoid.
    Input sides must be multiples of 2^(len(channels) - 1).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, channels=(16, 32, 64, 128)):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels must be at least 2 positive widths, got {channels!r}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.depth = 2 ** (len(channels) - 1)
        self.unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=channels[0],
            channels=channels,
            strides=[2] * (len(channels) - 1),
            num_res_units=1,
        )
        self.similar_head = conv(channels[0], 1, 1)
        self.adversarial_head = conv(channels[0], 1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if any(side % self.depth for side in images.shape[2:]):
            raise ValueError(
                f"the similarity-adversarial generator needs image sides that are multiples of {self.depth}, "
                f"got {tuple(images.shape[2:])}"
            )
        features = F.relu(self.unet(minmax_images(images)))
        return torch.sigmoid(self.similar_head(features)), torch.sigmoid(self.adversarial_head(features))


def _dihedral_transforms(spatial_dims: int, square: bool):
    """(forward, inverse) pairs on tensors (N, C, *spatial): rotations by 90 degrees in the last two
    axes (only when they are equal; else by 180), each with and without a flip of the last axis; in
    3D each of those with and without a flip of the depth axis."""
    planes = (-2, -1)
    turns = (0, 1, 2, 3) if square else (0, 2)
    pairs = []
    for depth_flip in (False, True) if spatial_dims == 3 else (False,):
        for flip in (False, True):
            for k in turns:

                def forward(x, k=k, flip=flip, depth_flip=depth_flip):
                    x = torch.flip(x, (-3,)) if depth_flip else x
                    x = torch.flip(x, (-1,)) if flip else x
                    return torch.rot90(x, k, planes)

                def inverse(x, k=k, flip=flip, depth_flip=depth_flip):
                    x = torch.rot90(x, -k, planes)
                    x = torch.flip(x, (-1,)) if flip else x
                    return torch.flip(x, (-3,)) if depth_flip else x

                pairs.append((forward, inverse))
    return pairs


def explanation_map(generator: SimilarityAdversarialGenerator, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """E(x) = |x_sim - x_adv| (N, 1, *spatial); with ``tta`` its mean over the dihedral transforms."""
    if not tta:
        similar, adversarial = generator(images)
        return (similar - adversarial).abs()
    square = images.shape[-1] == images.shape[-2]
    maps = [
        inverse(explanation_map(generator, forward(images)))
        for forward, inverse in _dihedral_transforms(images.ndim - 2, square)
    ]
    return torch.stack(maps).mean(dim=0)


def other_class(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The most likely class other than ``predicted`` for each row of ``logits`` (N, K), (N,)."""
    return logits.scatter(1, predicted.view(-1, 1), float("-inf")).argmax(dim=1)


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbours, summed over the spatial axes."""
    return sum(maps.diff(dim=axis).abs().mean() for axis in range(2, maps.ndim))


def similarity_adversarial_losses(
    generator: SimilarityAdversarialGenerator,
    classifier: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    settings: dict,
    noise: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (scalars): ``adversarial``, ``same_class``, ``similarity``, ``tv`` and
    their weighted sum ``total`` (module docstring). ``target``: the classifier's predicted classes."""
    x = minmax_images(images)
    similar, adversarial_image = generator(images)
    with torch.no_grad():
        other = other_class(classifier(x), target)
    adversarial_logits = classifier(adversarial_image)
    adversarial = F.cross_entropy(adversarial_logits, other)
    same_class = F.cross_entropy(classifier(similar), target)
    similarity = sum((image - x).abs().mean() + (image - x).pow(2).mean() for image in (similar, adversarial_image))
    tv = total_variation(similar - adversarial_image)
    total = (
        settings["adversarial_weight"] * adversarial
        + settings["same_class_weight"] * same_class
        + settings["similarity_weight"] * similarity
        + settings["tv_weight"] * tv
    )
    with torch.no_grad():
        flip = (adversarial_logits.argmax(dim=1) != target).float().mean()
    return {
        "total": total,
        "adversarial": adversarial,
        "same_class": same_class,
        "similarity": similarity,
        "tv": tv,
        "flip_rate": flip,
    }
