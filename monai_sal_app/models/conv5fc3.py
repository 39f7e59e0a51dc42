"""conv5-fc3: the small CNN of the latent-subtype study (five convolution blocks, three fully
connected layers), 2D and 3D; ``models.factory`` builds it by the name "conv5fc3"."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["Conv5FC3"]


def _conv_block(spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """conv k3 pad1 (``stride``) -> BatchNorm -> ReLU; keeps the spatial size at stride 1, halves it at 2."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    return nn.Sequential(conv(in_channels, out_channels, 3, stride=stride, padding=1), norm(out_channels), nn.ReLU())


class Conv5FC3(nn.Module):
    """The ARAMIS "conv5-fc3" CNN, 2D or 3D.

    ``features``: 5 conv blocks (conv k3 -> BN -> ReLU) with ``channels`` output channels and a
    max-pool (kernel 2) before each of the blocks 2 to ``pools + 1`` (``pools`` 4: between every two
    consecutive blocks; fewer: the last blocks work on the same grid), the first block's convolution
    with stride ``first_stride`` (1, or 2 to halve a large input at once), so that its last module
    is a conv block, on a grid of the input's side / (first_stride * 2**pools) (Grad-CAM's grid);
    ``pool``: adaptive average pool to 2 voxels per spatial dim; ``classifier``: Flatten, Dropout,
    Linear(-> 1300), ReLU, Linear(1300 -> 50), ReLU, Linear(50 -> num_classes).

    Input (N, in_channels, *spatial) with every spatial side >= first_stride * 2**pools px; output
    logits (N, num_classes).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
        dropout: float = 0.5,
        pools: int = 4,
        first_stride: int = 1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5 or min(channels) < 1:
            raise ValueError(f"channels must be 5 positive ints, got {channels!r}")
        if isinstance(pools, bool) or not isinstance(pools, int) or not 1 <= pools <= 4:
            raise ValueError(f"pools must be an int from 1 to 4, got {pools!r}")
        if isinstance(first_stride, bool) or first_stride not in (1, 2):
            raise ValueError(f"first_stride must be 1 or 2, got {first_stride!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        max_pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        adaptive_pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d

        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            if 0 < index <= pools:
                layers.append(max_pool(2))
            layers.append(_conv_block(spatial_dims, previous, width, first_stride if index == 0 else 1))
            previous = width
        self.features = nn.Sequential(*layers)
        self.min_side = first_stride * 2**pools
        self.pool = adaptive_pool(2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels[-1] * 2**spatial_dims, 1300),
            nn.ReLU(),
            nn.Linear(1300, 50),
            nn.ReLU(),
            nn.Linear(50, num_classes),
        )

    def forward(self, x):
        if min(x.shape[2:]) < self.min_side:
            raise ValueError(f"Conv5FC3 needs every spatial side >= {self.min_side} px, got {tuple(x.shape[2:])}")
        return self.classifier(self.pool(self.features(x)))
