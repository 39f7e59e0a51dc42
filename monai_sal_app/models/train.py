"""Supervised training of a classifier on in-memory tensors, with early stopping on validation AUC.

Inputs are float images (N, C, *spatial) and long labels (N,), kept where they are (e.g. on the
CPU) and moved to the device one mini-batch at a time. Reproducible from ``seed``: the shuffling,
the augmentations and the dropout draws all come from seeded generators, and the caller's global
RNG state is left untouched (a model's initial weights are the caller's business).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from monai_sal_app.arguments import check_integer
from monai_sal_app.models.augment import build_augmentation
from monai_sal_app.models.card import predict_classes
from monai_sal_app.models.device import default_device
from monai_sal_app.models.losses import get_loss


def _check_data(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5) or not x.is_floating_point():
        raise TypeError(f"{name}_x must be a float tensor (N, C, H, W) or (N, C, D, H, W)")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.ndim != 1:
        raise TypeError(f"{name}_y must be a long tensor (N,)")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: {x.shape[0]} images for {y.shape[0]} labels (need the same number, > 0)")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def predict_probabilities(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Softmax probabilities (N, K) on the CPU, the model in eval mode (its mode is restored after)."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        probabilities = [
            model(x[i : i + batch_size].to(device)).softmax(dim=1).cpu() for i in range(0, x.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(probabilities)


def _metrics(probabilities: torch.Tensor, y: torch.Tensor, decision_threshold: float | None = None) -> dict:
    """AUC (class 1 vs rest when K == 2, macro one-vs-rest otherwise; nan unless every class is
    present in ``y``, at least 2), balanced accuracy and accuracy of the predicted class (the
    argmax, or P(class 1) >= ``decision_threshold`` for two classes, see ``card.predict_classes``)."""
    p = probabilities.double().numpy()
    labels = y.cpu().numpy()
    predicted = predict_classes(p, decision_threshold)
    num_classes = p.shape[1]
    present = np.unique(labels)
    if num_classes == 2 and len(present) == 2:
        auc = float(roc_auc_score(labels, p[:, 1]))
    elif num_classes > 2 and len(present) == num_classes:
        auc = float(roc_auc_score(labels, p, multi_class="ovr", labels=list(range(num_classes))))
    else:
        auc = math.nan
    with warnings.catch_warnings():  # sklearn warns when y and the predictions share a single class
        warnings.simplefilter("ignore", UserWarning)
        balanced_accuracy = float(balanced_accuracy_score(labels, predicted))
    return {
        "auc": auc,
        "balanced_accuracy": balanced_accuracy,
        "accuracy": float((predicted == labels).mean()),
    }


def evaluate_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, decision_threshold: float | None = None
) -> dict:
    """{"auc", "balanced_accuracy", "accuracy"} of ``model`` on images x (N, C, *spatial), labels y (N,).

    AUC is computed on the softmax probability of class 1 for two classes (macro one-vs-rest for
    more) and is nan when ``y`` lacks a class. The accuracies use the argmax, or for two classes
    ``decision_threshold`` on P(class 1) when given.
    """
    _check_data(x, y, "eval")
    return _metrics(predict_probabilities(model, x, batch_size), y, decision_threshold)


def choose_decision_threshold(probabilities: torch.Tensor, y: torch.Tensor) -> float | None:
    """The threshold on P(class 1) that maximises balanced accuracy on (validation) data.

    ``probabilities``: softmax (N, 2); ``y``: labels (N,) with both classes present. Candidates are
    the midpoints between consecutive distinct probabilities of class 1; among equally good ones
    the middle one is taken (the centre of the best plateau). None when there is no candidate
    (fewer than two distinct probabilities, or a class missing): the argmax is used then.
    """
    p1 = probabilities[:, 1].double().cpu().numpy()
    labels = y.cpu().numpy()
    if probabilities.shape[1] != 2 or len(np.unique(labels)) != 2:
        return None
    values = np.unique(p1)
    candidates = (values[:-1] + values[1:]) / 2
    candidates = candidates[(candidates > 0) & (candidates < 1)]
    if candidates.size == 0:
        return None
    positives, negatives = labels == 1, labels == 0
    predicted = p1[None, :] >= candidates[:, None]
    balanced = (predicted[:, positives].mean(1) + (~predicted[:, negatives]).mean(1)) / 2
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(candidates[best[len(best) // 2]])


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one image joins the previous one (BatchNorm needs 2)."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def train_classifier(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    loss: str = "ce",
    augmentations: Sequence[str] = (),
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], object] | None = print,
) -> tuple[nn.Module, list[dict]]:
    """Train ``model`` with Adam; early-stop on validation AUC; restore the best epoch's weights.

    Per epoch: shuffled mini-batches of ``batch_size`` (augmented with ``augmentations``, see
    :mod:`monai_sal_app.models.augment`), then validation AUC and balanced accuracy (see
    :func:`evaluate_classifier`). Training stops after ``patience`` epochs without a higher
    validation AUC (a nan AUC never counts as better). ``log`` receives the stopping and
    restoring messages (None: silent); ``progress`` shows a tqdm bar over epochs.

    Returns (model in eval mode on ``device``, history): one dict per epoch with ``epoch``
    (1-based), ``train_loss`` (mean over images), ``val_auc``, ``val_balanced_accuracy`` and
    ``seconds`` (wall time of the epoch).
    """
    _check_data(train_x, train_y, "train")
    _check_data(val_x, val_y, "val")
    if train_x.shape[1:] != val_x.shape[1:]:
        raise ValueError(
            f"train images {tuple(train_x.shape[1:])} and val images {tuple(val_x.shape[1:])} differ in shape"
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
        check_integer(value, name)
    loss_fn = get_loss(loss)
    augment = build_augmentation(list(augmentations), seed=seed)
    device = torch.device(device) if device is not None else default_device()
    say = log if log is not None else (lambda message: None)

    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    best_score, best_epoch, best_state = -math.inf, 0, None
    rng_devices = [device] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=rng_devices),
        tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress) as bar,
    ):
        torch.manual_seed(seed)  # dropout draws; fork_rng restores the caller's RNG state afterwards
        for epoch in bar:
            start = time.perf_counter()
            model.train()
            total_loss = 0.0
            for indices in _batches(train_x.shape[0], batch_size, shuffle):
                images = augment(train_x[indices].to(device))
                labels = train_y[indices].to(device)
                optimizer.zero_grad(set_to_none=True)
                batch_loss = loss_fn(model(images), labels)
                batch_loss.backward()
                optimizer.step()
                total_loss += float(batch_loss.detach()) * len(indices)
            val = evaluate_classifier(model, val_x, val_y)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": total_loss / train_x.shape[0],
                    "val_auc": val["auc"],
                    "val_balanced_accuracy": val["balanced_accuracy"],
                    "seconds": time.perf_counter() - start,
                }
            )
            bar.set_postfix(
                loss=f"{history[-1]['train_loss']:.4f}",
                val_auc=f"{val['auc']:.3f}",
                val_bacc=f"{val['balanced_accuracy']:.3f}",
            )
            score = -math.inf if math.isnan(val["auc"]) else val["auc"]
            if best_state is None or score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= patience:
                say(f"early stopping at epoch {epoch}: no better val AUC for {patience} epochs")
                break
    model.load_state_dict(best_state)
    say(f"restored epoch {best_epoch} (val AUC {history[best_epoch - 1]['val_auc']:.4f})")
    return model.eval(), history
