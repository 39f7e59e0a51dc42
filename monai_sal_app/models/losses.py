"""Classification losses, chosen by name (see METHODS.md, "Training options for classifiers").

Each loss takes logits (N, K) and integer labels (N,) and returns a scalar tensor (mean over
batch and classes for the regression-style losses):

- ``ce``: cross-entropy on logits;
- ``l1``: mean |logits - onehot|;  ``l1norm``: mean |softmax - onehot|;
- ``smoothl1``: smooth L1 (beta 1) between logits and onehot;  ``smoothl1norm``: same on softmax;
- ``msenorm``: mean (softmax - onehot)^2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("ce", "l1", "l1norm", "smoothl1", "smoothl1norm", "msenorm")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (N,) with N={logits.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.dtype != torch.long:
        raise TypeError(f"labels must be torch.long, got {labels.dtype}")


def _onehot(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, num_classes=logits.shape[1]).to(logits.dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    _check(logits, labels)
    return F.cross_entropy(logits, labels)


def l1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    _check(logits, labels)
    return (logits - _onehot(labels, logits)).abs().mean()


def l1_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    _check(logits, labels)
    return (logits.softmax(dim=1) - _onehot(labels, logits)).abs().mean()


def smooth_l1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    _check(logits, labels)
    return F.smooth_l1_loss(logits, _onehot(labels, logits))


def smooth_l1_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    _check(logits, labels)
    return F.smooth_l1_loss(logits.softmax(dim=1), _onehot(labels, logits))


def mse_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    _check(logits, labels)
    return (logits.softmax(dim=1) - _onehot(labels, logits)).pow(2).mean()


_BY_NAME: dict[str, LossFn] = {
    "ce": cross_entropy,
    "l1": l1,
    "l1norm": l1_norm,
    "smoothl1": smooth_l1,
    "smoothl1norm": smooth_l1_norm,
    "msenorm": mse_norm,
}


def get_loss(name: str) -> LossFn:
    """The loss called ``name`` (one of :data:`LOSSES`): ``fn(logits (N, K), labels (N,) long) -> scalar``."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return _BY_NAME[name]
