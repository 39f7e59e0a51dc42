"""``monai-sal train-explainer``: train a trainable explainer of a classifier checkpoint on a manifest.

Images are preprocessed as the classifier sees them (its card's input size); a stratified share is
held out for validation (``explainers.train``). Writes the explainer (``out``, a state_dict), its
card (``out`` with ``.json``), each loss term per epoch (``<out stem>.history.csv``) and their
curves (``<out stem>.history.png``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import nn

from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.experiments.report import pyplot, save_figure
from monai_sal_app.explainers.card import ExplainerCard, save_explainer
from monai_sal_app.explainers.train import train_explainer
from monai_sal_app.metrics.stats import write_csv
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.models.inputs import load_inputs
from monai_sal_app.models.manifest_training import Log, stratified_split

__all__ = ["train_explainer_from_manifest"]


def train_explainer_from_manifest(
    kind: str,
    classifier_path: str | os.PathLike,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    settings: dict | None = None,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    patience: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    log: Log = print,
) -> tuple[nn.Module, ExplainerCard]:
    """Train a ``kind`` explainer of the classifier checkpoint ``classifier_path`` on a manifest's
    images; writes ``out`` (state_dict), its card ``out.json``, ``out.history.csv`` and ``.png``."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    classifier, card = load_classifier(classifier_path, device=device)
    items = read_manifest(manifest)
    x, _ = load_inputs(items, card.input_size, progress=progress)
    if x.shape[0] < 4:
        raise ValueError(f"{manifest}: training an explainer needs at least 4 images, got {x.shape[0]}")
    strata = np.array([int(item["label"]) if item.get("label") not in (None, "") else 0 for item in items])
    train_idx, val_idx = stratified_split(strata, val_fraction, seed)
    explainer, explainer_card = train_explainer(
        kind, classifier, card, x[train_idx], x[val_idx], settings=settings, classifier_file=classifier_path,
        epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, device=device,
        progress=progress, log=log,
    )  # fmt: skip
    explainer_card = explainer_card.replace(
        data={"manifest": str(Path(manifest).resolve()), "n_train": len(train_idx), "n_val": len(val_idx)}
    )
    out = Path(out)
    stem = out.with_suffix("")
    history = list(explainer_card.history)
    write_csv(history, stem.with_name(stem.name + ".history.csv"))
    save_figure(_history_figure(history, kind), stem.with_name(stem.name + ".history.png"))
    save_explainer(explainer, out, explainer_card)
    explainer.card = explainer_card
    log(
        f"saved {out} ({kind} for {Path(classifier_path).name}); validation loss {explainer_card.metrics['val_loss']:.4f}"
    )
    return explainer, explainer_card


def _history_figure(history: list[dict], kind: str):
    """One panel per loss term: train and validation by epoch."""
    plt = pyplot()
    terms = [key.removeprefix("train_") for key in history[0] if key.startswith("train_")]
    figure, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for axis, term in zip(axes[0], terms, strict=True):
        axis.plot(epochs, [row[f"train_{term}"] for row in history], label="train")
        axis.plot(epochs, [row[f"val_{term}"] for row in history], label="validation")
        axis.set_title(term)
        axis.set_xlabel("epoch")
    axes[0][0].legend()
    figure.suptitle(f"{kind} training")
    figure.tight_layout()
    return figure
