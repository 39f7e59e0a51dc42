"""Do the maps come back the same? Repeatability, reproducibility and label randomization.

Definitions and references: docs/METHODS.md#repeatability.

- **Repeatability**: the maps of the same images from models of the same architecture trained with
  other seeds; **reproducibility**: from models of other architectures. A method is repeatable
  when those maps are more alike than the maps of two different images (the random-pair baseline).
- **Label randomization**: the maps of a model retrained on permuted labels. A method that draws
  the same picture for a model that learnt nothing does not explain the decision: here the maps
  should *not* stay alike.

All models explain the same class per image: the reference model's prediction (or the given
target), so that the maps answer the same question. Maps come from ``saliency.explain``; the
models are never changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_sal_app.metrics.similarity import constant_maps, random_pair_baseline, similarity
from monai_sal_app.saliency import explain
from monai_sal_app.saliency.core import model_guard, resolve_target
from monai_sal_app.saliency.postprocess import checked_steps, postprocess

__all__ = ["DEFAULT_METRICS", "AgreementResult", "label_randomization", "map_agreement", "permuted_labels"]

DEFAULT_METRICS = ("ssim", "spearman_abs")


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class AgreementResult:
    """How alike the maps of other models are to the reference model's, per method.

    ``similarity``: metric -> (M, N) similarity of each other model's map to the reference map,
    per image; ``means``: metric -> (M,) mean over images; ``baseline``: metric -> the random-pair
    baseline of the reference maps (mean, 95% CI, pairs); ``statistic``: metric -> mean of
    ``means``. ``expect`` is "similar" (repeatability: passes when the statistic lies above the
    baseline's CI by ``margin``) or "different" (label randomization: passes when it does not).
    """

    method: str
    reference: str
    others: list[str]
    expect: str
    metrics: list[str]
    similarity: dict[str, np.ndarray]
    means: dict[str, list[float]]
    baseline: dict[str, dict]
    statistic: dict[str, float]
    verdict_metric: str
    margin: float
    verdict: str
    constant_maps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-safe: numbers as floats (None for NaN), arrays as lists; baselines without raw values."""
        return _json(
            {
                "method": self.method,
                "reference": self.reference,
                "others": self.others,
                "expect": self.expect,
                "metrics": self.metrics,
                "similarity": self.similarity,
                "means": self.means,
                "baseline": {m: {k: v for k, v in b.items() if k != "values"} for m, b in self.baseline.items()},
                "statistic": self.statistic,
                "verdict_metric": self.verdict_metric,
                "margin": self.margin,
                "verdict": self.verdict,
                "constant_maps": self.constant_maps,
                "seconds": self.seconds,
            }
        )


def _named(models) -> dict[str, nn.Module]:
    if isinstance(models, Mapping):
        named = dict(models)
    elif isinstance(models, Sequence):
        named = {f"model_{i}": m for i, m in enumerate(models)}
    else:
        raise TypeError("models must be a sequence or a {name: model} mapping")
    if len(named) < 2:
        raise ValueError(f"comparing maps needs a reference model and at least one other, got {len(named)}")
    for name, model in named.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name!r} is not a torch module")
    return named


def map_agreement(
    models,
    images: torch.Tensor,
    method: str = "gradient",
    target=None,
    params: dict | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    verdict_metric: str | None = None,
    margin: float = 0.0,
    expect: str = "similar",
    n_pairs: int = 50,
    seed: int = 0,
    postprocess_steps: Sequence[str] = (),
) -> AgreementResult:
    """Similarity of each other model's maps to the first (reference) model's maps.

    ``models``: ``{name: model}`` (the first is the reference) or a sequence; all take ``images``
    (N, C, *spatial) and predict the same classes. ``target``: None -> the reference model's
    predicted class, kept for every model. ``verdict_metric`` defaults to the first of ``metrics``.
    ``postprocess_steps``: named steps of ``saliency.postprocess`` applied to every map before it
    is compared (``("abs", "clip")``: |map| clipped at its 99th percentile); none by default.
    """
    named = _named(models)
    postprocess_steps = checked_steps(postprocess_steps)
    if expect not in ("similar", "different"):
        raise ValueError(f"expect must be 'similar' or 'different', got {expect!r}")
    metrics = list(metrics)
    verdict_metric = verdict_metric or metrics[0]
    if verdict_metric not in metrics:
        raise ValueError(f"verdict_metric {verdict_metric!r} is not one of the metrics {metrics}")
    if images.shape[0] < 2:
        raise ValueError(f"the random-pair baseline needs at least 2 images, got {images.shape[0]}")
    start = time.perf_counter()
    reference_name, reference = next(iter(named.items()))
    with model_guard(reference), torch.no_grad():
        fixed_target = resolve_target(reference, images.to(next(reference.parameters()).device), target).cpu()
    maps = {
        name: postprocess(
            explain(model, images, method, target=fixed_target, **(params or {})).cpu().double(), postprocess_steps
        ).numpy()
        for name, model in named.items()
    }
    reference_maps = maps[reference_name]
    others = [name for name in named if name != reference_name]
    per_metric = {m: np.stack([similarity(reference_maps, maps[o], m) for o in others]) for m in metrics}
    means = {m: per_metric[m].mean(axis=1).tolist() for m in metrics}
    baseline = {m: random_pair_baseline(reference_maps, m, n_pairs=n_pairs, seed=seed) for m in metrics}
    statistic = {m: float(np.mean(means[m])) for m in metrics}
    above = statistic[verdict_metric] > baseline[verdict_metric]["ci_high"] + margin
    verdict = "passes" if above == (expect == "similar") else "fails"
    constant = {name: int(constant_maps(m).sum()) for name, m in maps.items()}
    flagged = {name: count for name, count in constant.items() if count}
    return AgreementResult(
        method=method,
        reference=reference_name,
        others=others,
        expect=expect,
        metrics=metrics,
        similarity=per_metric,
        means=means,
        baseline=baseline,
        statistic=statistic,
        verdict_metric=verdict_metric,
        margin=float(margin),
        verdict=verdict,
        constant_maps=flagged,
        seconds=time.perf_counter() - start,
    )


def permuted_labels(labels, seed: int = 0) -> torch.Tensor:
    """``labels`` (N,) in an order drawn by a generator seeded with ``seed``: the training labels of
    a label-randomized model. ``ValueError`` unless they are a vector with at least two classes."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(torch.unique(labels)) < 2:
        raise ValueError("labels must be a (N,) vector with at least two classes to permute")
    generator = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(len(labels), generator=generator)]


def label_randomization(
    train_model: Callable[[torch.Tensor], nn.Module],
    trained_model: nn.Module,
    labels: torch.Tensor,
    images: torch.Tensor,
    method: str = "gradient",
    seed: int = 0,
    **agreement,
) -> AgreementResult:
    """Retrain with permuted labels and compare the maps with those of the trained model.

    ``train_model(labels) -> model`` is the training recipe (same data, same settings) called once
    with ``labels`` (N_train,) permuted by :func:`permuted_labels` with ``seed``. ``images`` are the
    images to explain. Passes when the maps of the label-randomized model are *not* more alike to
    the trained model's than random pairs (``expect="different"``); ``agreement``: further
    :func:`map_agreement` arguments (metrics, margin, n_pairs...).
    """
    randomized = train_model(permuted_labels(labels, seed))
    return map_agreement(
        {"trained": trained_model, "label_randomized": randomized},
        images,
        method,
        expect="different",
        seed=seed,
        **agreement,
    )
