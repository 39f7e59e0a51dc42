"""What the checks read from a manifest: the images at the model's input size with their labels,
the masks on the model's input grid, and the mean training mask (the map localization is judged
against). Used by ``monai-sal trust``, the server's trust scoring and the studies alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from monai_sal_app.data.io import read_image
from monai_sal_app.distributed import read_ahead
from monai_sal_app.metrics.localization import mean_mask_baseline
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.inputs import resize_to
from monai_sal_app.models.sources import LoadedModel, array_input, mask_on_input_grid

__all__ = [
    "TrustInputs",
    "load_trust_inputs",
    "mask_on_grid",
    "mean_mask_on_grid",
    "mean_training_mask",
    "read_trust_inputs",
]


@dataclass
class TrustInputs:
    """What the checks read from a manifest (:func:`read_trust_inputs`): ``images`` (N, C,
    *input_size), ``labels`` (N,) when every item read has one, ``masks`` on the input grid (bool
    *input_size, None for an item without one; None when no item has one), ``ids`` of the N items
    read, and ``unreadable``: ``{"id", "image", "error"}`` of each item left out."""

    images: torch.Tensor
    labels: torch.Tensor | None
    masks: list[np.ndarray | None] | None
    ids: list[str]
    unreadable: list[dict]


def read_trust_inputs(
    items: list[dict],
    card: ModelCard,
    max_images: int | None = None,
    progress: bool = False,
    source: LoadedModel | None = None,
    workers: int = 0,
) -> TrustInputs:
    """The first ``max_images`` items in manifest order, read by ``workers`` processes
    (``distributed.read_ahead``; 0: here), as :class:`TrustInputs`. An item whose image or mask
    cannot be read is left out and listed in ``unreadable``; ``ValueError`` when none can be read.

    Images are min-max scaled and resized, or prepared by ``source`` (``models.sources``: a
    bundle's own preprocessing, a sidecar's intensity window). A mask is resized to the input grid
    (bi/trilinear, then ``> 0.5``; for a bundle, through its Orientation, Spacing and Resize steps:
    ``LoadedModel.prepare_mask``).
    """
    items = items[:max_images] if max_images else items

    def read(index: int) -> dict:
        item = items[index]
        try:
            if source is not None:
                image = source.read_input(item["image"]).input
                mask = source.prepare_mask(item["mask"]) if item.get("mask") else None
            else:
                image = array_input(card, read_image(item["image"])[0]).input
                mask = mask_on_grid(item, card.input_size)
        except (ValueError, OSError, RuntimeError) as error:  # what reading raises (module docstring of sources)
            return {"error": " ".join(str(error).split()) or type(error).__name__}
        return {"image": image, "mask": mask}

    readable, unreadable = [], []
    for index, entry in tqdm(
        read_ahead(range(len(items)), read, workers),
        total=len(items),
        desc="loading",
        disable=not progress,
        leave=False,
    ):
        item = items[index]
        if "error" in entry:
            unreadable.append({"id": item["id"], "image": item["image"], "error": entry["error"]})
        else:
            readable.append((item, entry))
    if not readable:
        raise ValueError(
            "no image could be read" + (f" ({unreadable[0]['id']}: {unreadable[0]['error']})" if unreadable else "")
        )
    masks = [entry["mask"] for _, entry in readable]
    has_label = all(item.get("label") not in (None, "") for item, _ in readable)
    return TrustInputs(
        images=torch.cat([entry["image"] for _, entry in readable]),
        labels=torch.tensor([int(item["label"]) for item, _ in readable]) if has_label else None,
        masks=masks if any(m is not None for m in masks) else None,
        ids=[str(item["id"]) for item, _ in readable],
        unreadable=unreadable,
    )


def load_trust_inputs(
    items: list[dict],
    card: ModelCard,
    max_images: int | None = None,
    progress: bool = False,
    source: LoadedModel | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[np.ndarray | None] | None]:
    """Images (N, C, *input_size), labels (N,) when every item has one, and masks on the input grid
    of the first ``max_images`` items (:func:`read_trust_inputs`, read here); ``ValueError``
    naming the first item that cannot be read."""
    inputs = read_trust_inputs(items, card, max_images, progress, source)
    if inputs.unreadable:
        first = inputs.unreadable[0]
        raise ValueError(f"{first['id']}: {first['error']}")
    return inputs.images, inputs.labels, inputs.masks


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
