"""Train a classifier on the images of a manifest: load them at the input size, hold out a
stratified validation share, train with early stopping, choose the decision threshold, score the
test manifest, and save the weights with their card (``monai-sal train``, the server's train task
and the studies' recipes all train this way)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.checkpoint import save_classifier
from monai_sal_app.models.device import default_device
from monai_sal_app.models.factory import build_classifier
from monai_sal_app.models.inputs import load_inputs
from monai_sal_app.models.train import (
    choose_decision_threshold,
    evaluate_classifier,
    predict_probabilities,
    train_classifier,
)

__all__ = ["stratified_split", "train_from_manifest"]

Log = Callable[[str], None]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(len(idx) * val_fraction)))
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train)), np.sort(np.array(val))


def train_from_manifest(
    manifest: str | Path,
    out: str | Path,
    *,
    arch: str = "conv5fc3",
    arch_kwargs: dict | None = None,
    loss: str = "ce",
    augmentations: Sequence[str] = (),
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    patience: int = 5,
    val_fraction: float = 0.2,
    labels: Sequence[str] | None = None,
    test_manifest: str | Path | None = None,
    input_size: int | Sequence[int] | None = None,
    head: dict | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    log: Log = print,
) -> tuple[torch.nn.Module, ModelCard]:
    """Train a classifier on a manifest and save ``out`` (state_dict) + its model card (``.json``).

    A stratified ``val_fraction`` of the manifest is held out for validation AUC, balanced
    accuracy and early stopping. For two classes the decision threshold on P(class 1) that
    maximises validation balanced accuracy is recorded in the card (``decision_threshold``) and
    used for every prediction. ``test_manifest``, when given, is scored once at the end (AUC,
    balanced accuracy and accuracy at that threshold, ``n_test``).
    ``input_size``: the network's input grid in pixels/voxels (one int for every axis, or one per
    axis); images are resized to it (:func:`preprocess`). Default: the first image's shape.
    ``arch_kwargs``: the network's own options (``build_classifier``'s keywords, e.g. a ResNet's
    ``block_inplanes``), kept in the card. ``head``: None for the architecture's own classifier, or
    ``{"name": "wildcat", ...options}`` for a WILDCAT head (``models.wildcat``; options not given
    take their defaults, all in the card).
    """
    items = read_manifest(manifest)
    if isinstance(input_size, int):
        input_size = (input_size,) * read_image(items[0]["image"])[0].ndim
    if input_size is not None and (len(input_size) not in (2, 3) or min(input_size) < 1):
        raise ValueError(f"input_size must give 2 or 3 positive sides, got {input_size!r}")
    x, input_size = load_inputs(items, input_size, progress=progress)
    y = torch.tensor([int(i["label"]) for i in items])
    num_classes = int(y.max()) + 1
    if num_classes < 2:
        raise ValueError(f"{manifest}: a classifier needs at least two classes, found labels {sorted(set(y.tolist()))}")
    train_idx, val_idx = stratified_split(y.numpy(), val_fraction, seed)
    card = ModelCard(  # validated before the training, completed after it
        architecture=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        spatial_dims=len(input_size),
        in_channels=1,
        num_classes=num_classes,
        labels=tuple(labels) if labels else tuple(f"class_{c}" for c in range(num_classes)),
        input_size=tuple(input_size),
        head=head,
        loss=loss,
        augmentations=tuple(augmentations),
        data={
            "manifest": str(Path(manifest).resolve()),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            **({"test_manifest": str(Path(test_manifest).resolve())} if test_manifest is not None else {}),
        },
    )
    torch.manual_seed(seed)
    model = build_classifier(
        arch, spatial_dims=len(input_size), in_channels=1, num_classes=num_classes, head=card.head, **card.arch_kwargs
    )
    dev = torch.device(device) if device else default_device()
    model, history = train_classifier(
        model,
        x[train_idx],
        y[train_idx],
        x[val_idx],
        y[val_idx],
        loss=loss,
        augmentations=tuple(augmentations),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        seed=seed,
        device=dev,
        progress=progress,
        log=log,
    )
    best = max(history, key=lambda h: (np.nan_to_num(h["val_auc"], nan=-1.0), -h["epoch"]))
    threshold = choose_decision_threshold(predict_probabilities(model, x[val_idx]), y[val_idx])
    val = evaluate_classifier(model, x[val_idx], y[val_idx], decision_threshold=threshold)
    metrics: dict[str, Any] = {
        "val_auc": val["auc"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "best_epoch": best["epoch"],
    }
    if test_manifest is not None:
        test_items = read_manifest(test_manifest)
        tx, _ = load_inputs(test_items, input_size, progress=progress)
        ty = torch.tensor([int(i["label"]) for i in test_items])
        test = evaluate_classifier(model, tx, ty, decision_threshold=threshold)
        metrics.update({f"test_{k}": v for k, v in test.items()})
        metrics["n_test"] = len(test_items)
    card = card.replace(
        decision_threshold=threshold,
        training={"epochs_run": len(history), "batch_size": batch_size, "lr": lr, "seed": seed},
        metrics=metrics,
        history=tuple(history),
    )
    save_classifier(model, out, card)
    log(
        f"saved {out} ({arch}{' + WILDCAT head' if card.head else ''}, {len(input_size)}D, input {input_size}); "
        + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    )
    return model, card
