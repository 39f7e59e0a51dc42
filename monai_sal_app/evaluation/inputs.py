"""What the checks read from a manifest: the images at the model's input size with their labels,
the masks on the model's input grid, and the mean training mask (the map localization is judged
against). Used by ``monai-sal trust``, the server's trust scoring and the studies alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from monai_sal_app.data.io import read_image
from monai_sal_app.metrics.localization import mean_mask_baseline
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.inputs import load_inputs, resize_to
from monai_sal_app.models.sources import LoadedModel, mask_on_input_grid

__all__ = ["load_trust_inputs", "mask_on_grid", "mean_mask_on_grid", "mean_training_mask"]


def load_trust_inputs(
    items: list[dict],
    card: ModelCard,
    max_images: int | None = None,
    progress: bool = False,
    source: LoadedModel | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[np.ndarray | None] | None]:
    """Images (N, C, *input_size), labels (N,) when every item has one, and masks on the input grid.

    The first ``max_images`` items in manifest order are used. Images are min-max scaled and
    resized, or prepared by ``source`` (``models.sources``: a bundle's own preprocessing, a
    sidecar's intensity window). A mask is resized to the input grid (bi/trilinear, then ``> 0.5``;
    for a bundle, through its Orientation, Spacing and Resize steps: ``LoadedModel.prepare_mask``);
    items without a mask get None; None when no item has one.
    """
    items = items[:max_images] if max_images else items
    if source is not None and source.kind != "checkpoint":
        images = torch.cat([source.prepare(item["image"]).input for item in items])
        masks = [source.prepare_mask(item["mask"]) if item.get("mask") else None for item in items]
    else:
        images, _ = load_inputs(items, card.input_size, progress=progress)
        masks = [mask_on_grid(item, card.input_size) for item in items]
    has_label = all(item.get("label") not in (None, "") for item in items)
    labels = torch.tensor([int(item["label"]) for item in items]) if has_label else None
    return images, labels, (masks if any(m is not None for m in masks) else None)


def mask_on_grid(item: dict, input_size: Sequence[int]) -> np.ndarray | None:
    """The item's mask on the model's input grid, bool ``input_size``: resized bi/trilinearly, then
    ``> 0.5``; None when the item has no mask."""
    if not item.get("mask"):
        return None
    return mask_on_input_grid(read_image(item["mask"], allow_constant=True)[0] > 0.5, input_size)


def mean_mask_on_grid(items: list[dict], input_size: Sequence[int]) -> np.ndarray | None:
    """The mean of the items' masks (:func:`mean_training_mask`) on the model's
    input grid (bi/trilinear), values in [0, 1]; None when no item has a mask."""
    prior = mean_training_mask(items)
    if prior is None:
        return None
    return resize_to(torch.from_numpy(prior.astype(np.float32))[None, None], input_size)[0, 0].numpy()


def mean_training_mask(train_items: list[dict]) -> np.ndarray | None:
    """The baseline map 'mean training mask' (METHODS.md): the fraction of the items' masks that
    cover each pixel/voxel, in [0, 1], on the masks' grid ((H, W) or (D, H, W)); None when no item
    has a mask."""
    masks = [read_image(i["mask"], allow_constant=True)[0] > 0.5 for i in train_items if i.get("mask")]
    return mean_mask_baseline(masks) if masks else None
