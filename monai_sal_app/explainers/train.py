"""Training a trainable explainer against a frozen classifier, on images in memory.

The classifier's predicted class of each image (through its card's decision threshold) is the class
the explainer learns to explain, and the losses see the logits shifted by that threshold
(:class:`DecisionLogits`), so that "keeps" and "changes the class" mean what the card predicts. The
validation images' mean loss (with the same random draws every epoch) drives early stopping and
the choice of the epoch kept. ``experiments.explainer_training`` runs it on a manifest
(``monai-sal train-explainer``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from monai_sal_app.explainers.card import ExplainerCard, classifier_record
from monai_sal_app.explainers.kinds import build_explainer, explainer_settings, get_kind
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.device import default_device
from monai_sal_app.models.guard import model_guard

__all__ = ["train_explainer"]

Log = Callable[[str], object]


class DecisionLogits(nn.Module):
    """The classifier's logits shifted so that their argmax is the card's prediction: for a two-class
    model with decision threshold t on P(class 1), logit(t) = log(t / (1 - t)) is subtracted from
    class 1's logit (softmax then crosses 0.5 where P(class 1) crosses t). Without a threshold, the
    logits as they are. The losses' margins and cross-entropies are taken on these."""

    def __init__(self, classifier: nn.Module, decision_threshold: float | None) -> None:
        super().__init__()
        self.classifier = classifier
        self.shift = 0.0 if decision_threshold is None else math.log(decision_threshold / (1 - decision_threshold))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images)
        if self.shift == 0.0:
            return logits
        return logits - torch.tensor([0.0, self.shift], device=logits.device, dtype=logits.dtype)


def _mean_terms(
    losses, explainer, classifier, x, target, settings, batch_size, seed, device, train: bool, optimizer=None
):
    """One pass over (x, target) in batches: the mean of each loss term over images; with ``train``,
    an optimizer step per batch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator) if train else torch.arange(x.shape[0])
    sums: dict[str, float] = {}
    counted = 0
    explainer.train(train)
    for start in range(0, x.shape[0], batch_size):
        index = order[start : start + batch_size]
        if train and len(index) < 2:  # BatchNorm needs two images
            continue
        images, targets = x[index].to(device), target[index].to(device)
        with torch.set_grad_enabled(train):
            terms = losses(explainer, classifier, images, targets, settings, generator)
        if train:
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(index)
        counted += len(index)
    return {name: total / counted for name, total in sums.items()}


def train_explainer(
    kind: str,
    classifier: nn.Module,
    card: ModelCard,
    train_x: torch.Tensor,
    val_x: torch.Tensor,
    *,
    settings: dict | None = None,
    classifier_file: str | os.PathLike | None = None,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    patience: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Log | None = print,
) -> tuple[nn.Module, ExplainerCard]:
    """Train a ``kind`` explainer of ``classifier`` (left unchanged) on preprocessed images (N, C, *input_size).

    Returns (explainer in eval mode with its card as ``.card``, card). The card's ``history`` has
    one row per epoch: ``epoch``, ``train_<term>`` and ``val_<term>`` for every loss term, ``seconds``.
    """
    settings = explainer_settings(kind, settings)
    device = torch.device(device) if device is not None else default_device()
    say = log or (lambda message: None)
    losses = get_kind(kind).losses
    explainer_card = ExplainerCard(
        kind=kind,
        spatial_dims=card.spatial_dims,
        in_channels=card.in_channels,
        num_classes=card.num_classes,
        input_size=tuple(card.input_size),
        classifier=classifier_record(classifier, card, classifier_file),
        settings=settings,
    )
    torch.manual_seed(seed)
    explainer = build_explainer(explainer_card).to(device)
    optimizer = torch.optim.Adam(explainer.parameters(), lr=lr)
    with model_guard(classifier):
        classifier.to(device)
        train_t = _predicted(classifier, card, train_x, device)
        val_t = _predicted(classifier, card, val_x, device)
        classifier = DecisionLogits(classifier, card.decision_threshold)
        history: list[dict] = []
        best, best_epoch, best_state = math.inf, 0, None
        with tqdm(range(1, epochs + 1), desc=f"train {kind}", unit="epoch", disable=not progress) as bar:
            for epoch in bar:
                start = time.perf_counter()
                train_terms = _mean_terms(
                    losses, explainer, classifier, train_x, train_t, settings, batch_size, seed + epoch, device,
                    train=True, optimizer=optimizer,
                )  # fmt: skip
                val_terms = _mean_terms(
                    losses, explainer, classifier, val_x, val_t, settings, batch_size, seed, device, train=False
                )
                history.append(
                    {
                        "epoch": epoch,
                        **{f"train_{k}": v for k, v in train_terms.items()},
                        **{f"val_{k}": v for k, v in val_terms.items()},
                        "seconds": time.perf_counter() - start,
                    }
                )
                bar.set_postfix(train=f"{train_terms['total']:.3f}", val=f"{val_terms['total']:.3f}")
                if val_terms["total"] < best:
                    best, best_epoch, best_state = val_terms["total"], epoch, copy.deepcopy(explainer.state_dict())
                elif epoch - best_epoch >= patience:
                    say(f"early stopping at epoch {epoch}: no lower validation loss for {patience} epochs")
                    break
    explainer.load_state_dict(best_state)
    say(f"restored epoch {best_epoch} (validation loss {best:.4f})")
    explainer_card = explainer_card.replace(
        training={
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
        },
        metrics={"val_loss": best, **{k: v for k, v in history[best_epoch - 1].items() if k.startswith("val_")}},
        history=tuple(history),
    )
    explainer.card = explainer_card
    return explainer.eval(), explainer_card


def _predicted(classifier: nn.Module, card: ModelCard, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The classifier's predicted class of each image (through its card's decision threshold), (N,) long."""
    with torch.no_grad():
        probabilities = torch.cat([classifier(x[i : i + 64].to(device)).softmax(1).cpu() for i in range(0, len(x), 64)])
    return torch.from_numpy(np.asarray(card.predict(probabilities.numpy()))).long()
