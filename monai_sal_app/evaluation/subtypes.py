"""Latent subtypes: does the model tell the patients' subtypes apart, and do its group maps show where?

Definitions, the reference and what an untrained model scores: docs/METHODS.md#latent-subtypes.

- **Feature-map subtyping** (:func:`feature_kmeans_ari`): k-means, k = the number of subtypes, on
  the flattened CNN feature maps of one label's images, one run per seed; the adjusted Rand index
  (ARI) of each run's clusters against the true subtypes, and their mean.
- **Group map** (:func:`group_saliency_map`): the mean over a group's images of the gradient of the
  *control* class logit with respect to the image: what would have to change for the group to look
  like controls.
- **Separability and specificity** of the typical and atypical groups' maps between the phantom's
  top and bottom regions (``b``, ``c``, ``b_dagger``, ``c_dagger``; computed by
  :mod:`monai_sal_app.metrics.subtypes`, which needs no model).

:func:`subtype_metrics` runs all of it on a Shepp-Logan set (subtype names of
``data.shepp_logan.SUBTYPES``). The feature maps are the output of the layer Grad-CAM uses
(``saliency.gradcam``: the last module whose output is a (N, K, *spatial) tensor and that is not a
pooling layer) unless ``layer`` names another. The model runs inside ``model_guard`` (eval mode,
nothing changed); gradients come from ``saliency.explain``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.data.shepp_logan import SUBTYPES
from monai_sal_app.metrics.subtypes import region_mask, separability, specificity
from monai_sal_app.saliency import explain
from monai_sal_app.saliency.core import auto_batch_size, chunks, model_device, model_guard, validate_images
from monai_sal_app.saliency.gradcam import _capture_layer

__all__ = [
    "feature_kmeans_ari",
    "feature_maps",
    "group_saliency_map",
    "kmeans_ari",
    "separability",
    "specificity",
    "subtype_metrics",
]


def _labels(subtypes, n: int, what: str) -> np.ndarray:
    """``subtypes`` as a 1-D array of N labels; ValueError when there are not exactly ``n``."""
    labels = np.asarray(list(subtypes))
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"subtypes has {labels.shape[0] if labels.ndim else 0} entries for {n} {what}")
    return labels


def kmeans_ari(features, subtypes: Sequence, n_clusters: int | None = None, seeds: int = 10) -> dict:
    """Adjusted Rand index of k-means clusters of ``features`` against the true ``subtypes``.

    Args:
        features: (N, F) array, one row per image, finite.
        subtypes: N labels (str or int), at least two distinct ones.
        n_clusters: k; default the number of distinct subtypes. 2 <= k <= N.
        seeds: number of k-means runs; run s is ``KMeans(n_clusters=k, n_init=1, random_state=s)``,
            s = 0 .. seeds - 1, so each seed is one k-means++ start and the spread over seeds shows
            how much the clustering depends on it.

    Returns:
        ``{"ari_mean": float, "ari_per_seed": [float] * seeds, "n_clusters": k, "n_images": N}``;
        ``sklearn.metrics.adjusted_rand_score``: 1 for the true partition, 0 in expectation for a
        partition drawn independently of the subtypes.
    """
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"features must be (N, F) with N >= 1, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or infinite values")
    n = array.shape[0]
    labels = _labels(subtypes, n, "feature rows")
    distinct = np.unique(labels)
    if distinct.size < 2:
        raise ValueError(f"need at least 2 subtypes to cluster, got {distinct.tolist()}")
    k = distinct.size if n_clusters is None else check_integer(n_clusters, "n_clusters")
    if not 2 <= k <= n:
        raise ValueError(f"n_clusters must be between 2 and the number of images ({n}), got {k}")
    seeds = check_integer(seeds, "seeds")
    per_seed = [
        float(adjusted_rand_score(labels, KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(array)))
        for seed in range(seeds)
    ]
    return {"ari_mean": float(np.mean(per_seed)), "ari_per_seed": per_seed, "n_clusters": int(k), "n_images": n}


def _layer_output(model: nn.Module, layer: str | None, spatial_dims: int, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(name, output) of ``layer`` (None: Grad-CAM's last feature block) for the input ``x``."""
    if layer is None:
        _, name, activation = _capture_layer(model, None, spatial_dims, x)
        return name, activation
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}")
    outputs: list = []
    handle = modules[layer].register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        model(x)
    finally:
        handle.remove()
    if not outputs or not isinstance(outputs[-1], torch.Tensor) or outputs[-1].ndim != spatial_dims + 2:
        raise ValueError(f"layer {layer!r} does not output a (N, K, *spatial) feature map of {spatial_dims}D images")
    return layer, outputs[-1]


def feature_maps(
    model: nn.Module, images: torch.Tensor, layer: str | None = None, batch_size: int | None = None
) -> tuple[np.ndarray, str]:
    """The flattened feature maps of ``images`` (N, C, *spatial): ``(features (N, F) float64, layer name)``.

    ``layer=None`` takes the last convolutional feature block by Grad-CAM's rule (module docstring);
    a name takes that module, whose output must be a (N, K, *spatial) feature map. One forward pass
    per chunk of ``batch_size`` images (None: ``auto_batch_size`` for forward-only passes), without
    gradients, in eval mode.
    """
    validate_images(model, images)
    if batch_size is not None:
        batch_size = check_integer(batch_size, "batch_size")
    x = images.detach().to(device=model_device(model), dtype=torch.float32)
    spatial_dims = x.ndim - 2
    rows, name = [], ""
    with model_guard(model):
        step = auto_batch_size(model, x, forward_only=True) if batch_size is None else batch_size
        with torch.no_grad():
            for sl in chunks(x.shape[0], step):
                name, activation = _layer_output(model, layer, spatial_dims, x[sl])
                rows.append(activation.flatten(1).double().cpu().numpy())
    return np.concatenate(rows), name


def feature_kmeans_ari(
    model: nn.Module,
    images: torch.Tensor,
    subtypes: Sequence,
    layer: str | None = None,
    n_clusters: int | None = None,
    seeds: int = 10,
    batch_size: int | None = None,
) -> dict:
    """k-means on the CNN feature maps of ``images`` (one label's images), scored by ARI per seed.

    ``images``: (N, C, *spatial); ``subtypes``: their N true subtypes; ``layer``, ``batch_size``: as
    :func:`feature_maps`; ``n_clusters``, ``seeds``: as :func:`kmeans_ari`.
    Returns ``{"ari_mean", "ari_per_seed", "n_clusters", "layer", "n_images"}``.
    """
    validate_images(model, images)
    labels = _labels(subtypes, images.shape[0], "images")
    features, name = feature_maps(model, images, layer, batch_size)
    result = kmeans_ari(features, labels, n_clusters, seeds)
    return {**result, "layer": name}


def group_saliency_map(
    model: nn.Module, images: torch.Tensor, control_class: int = 0, batch_size: int | None = None
) -> np.ndarray:
    """Mean over ``images`` (N, C, *spatial) of the gradient of the ``control_class`` logit.

    ``explain(model, images, "gradient", target=control_class)`` (the signed input gradient, summed
    over channels), averaged over the N images in float64: shape (*spatial), in logit units per
    image unit. Signs are kept; the scores take the absolute value of this mean.
    """
    maps = explain(model, images, "gradient", target=control_class, batch_size=batch_size)
    return maps[:, 0].double().mean(dim=0).cpu().numpy()


def _masks(masks, n: int, spatial: tuple[int, ...], name: str) -> np.ndarray:
    """Per-image masks as an array (N, *spatial); ValueError for another count or grid."""
    array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if array.ndim == len(spatial) + 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.shape != (n, *spatial):
        raise ValueError(
            f"{name} has shape {array.shape}: expected one mask per image on the images' grid, {(n, *spatial)}"
        )
    return array


def _rows(images: torch.Tensor, selected: np.ndarray) -> torch.Tensor:
    """The images whose entry in the boolean (N,) array ``selected`` is True, on their device."""
    return images[torch.from_numpy(np.flatnonzero(selected)).to(images.device)]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def subtype_metrics(
    model: nn.Module,
    images: torch.Tensor,
    subtypes: Sequence[str],
    top_masks,
    bottom_masks,
    control_class: int = 0,
    layer: str | None = None,
    seeds: int = 10,
    batch_size: int | None = None,
) -> dict:
    """All subtype metrics of ``model`` on a Shepp-Logan set.

    Args:
        model: a classifier returning logits; not changed.
        images: (N, C, *spatial) float tensor.
        subtypes: N names from ``data.shepp_logan.SUBTYPES`` ("control", "typical", "atypical", "error").
        top_masks, bottom_masks: per-image region masks (N, *spatial) or (N, 1, *spatial), boolean or
            0/1 (the manifest's ``mask_top`` / ``mask_bottom``), numpy or torch.
        control_class: class index of the controls, whose logit the group maps differentiate.
        layer, seeds, batch_size: as :func:`feature_kmeans_ari` (``batch_size`` also chunks the
            gradient passes).

    Regions: each region is the union of its masks over **all** N images, so it covers every pixel
    where the region lies in any subject; atrophy moves a region's edge inwards, and the
    control-class gradient sits where the region would have to grow back, which the atrophied
    group's own masks leave out.

    Returns a JSON-safe dict:
        ``ari``: :func:`feature_kmeans_ari` of the patients (every subtype but "control"), k = the
        number of patient subtypes present (at least 2 are needed);
        ``b``, ``c``: separability and specificity of the typical group's map; ``b_dagger``,
        ``c_dagger``: of the atypical group's map (None when the group is absent, or the ratio is
        not finite);
        ``group_sizes``: images per subtype; ``region_sizes``: pixels/voxels of the top and bottom
        regions; ``control_class``; ``seconds``: wall time.
    """
    start = time.perf_counter()
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    validate_images(model, images)
    n, spatial = images.shape[0], tuple(images.shape[2:])
    labels = _labels(subtypes, n, "images")
    unknown = sorted(set(labels.tolist()) - set(SUBTYPES))
    if unknown:
        raise ValueError(f"unknown subtype(s) {unknown}; expected names from {list(SUBTYPES)}")
    top = region_mask(_masks(top_masks, n, spatial, "top_masks"), spatial, "top_masks")
    bottom = region_mask(_masks(bottom_masks, n, spatial, "bottom_masks"), spatial, "bottom_masks")

    patients = labels != "control"
    if len(set(labels[patients].tolist())) < 2:
        raise ValueError(
            f"the ARI needs at least 2 patient subtypes, got {sorted(set(labels[patients].tolist()))} "
            f"among subtypes {sorted(set(labels.tolist()))}"
        )
    ari = feature_kmeans_ari(
        model, _rows(images, patients), labels[patients], layer, seeds=seeds, batch_size=batch_size
    )

    scores: dict[str, float | None] = {}
    for group, suffix in (("typical", ""), ("atypical", "_dagger")):
        members = labels == group
        b = c = None
        if members.any():
            group_map = group_saliency_map(model, _rows(images, members), control_class, batch_size)
            b = _finite(separability(group_map, top, bottom, group))
            c = _finite(specificity(group_map, top, bottom))
        scores[f"b{suffix}"], scores[f"c{suffix}"] = b, c
    return {
        "ari": ari,
        **scores,
        "group_sizes": {name: int((labels == name).sum()) for name in SUBTYPES},
        "region_sizes": {"top": int(top.sum()), "bottom": int(bottom.sum())},
        "control_class": int(control_class),
        "seconds": time.perf_counter() - start,
    }
