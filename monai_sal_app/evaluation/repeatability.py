"""Do the maps come back the same? Repeatability, reproducibility and label randomization.

Definitions and references: docs/METHODS.md#repeatability.

- **Repeatability**: the maps of the same images from models of the same architecture trained with
  other seeds; **reproducibility**: from models of other architectures. The question only makes
  sense for models that classify alike, so another model is compared only when its ROC AUC on the
  images is within :data:`MAX_AUC_GAP` of the reference's and their predictions agree (Cohen's
  kappa at least :data:`MIN_KAPPA`), and only on the images both classify alike; otherwise it is
  "not assessable", with the reason. The maps are compared by the retention share
  (``metrics.similarity.RetentionReference``): how much of the reference map's image-specific part
  the other model's map of the same image keeps. "Comes back from another training run": yes (its
  bootstrap CI above :data:`REPEATABLE_ABOVE`), partly (above ``randomization.RETENTION_CUT``,
  what a randomized model keeps at most), no.
- **Label randomization**: the maps of a model retrained on permuted labels, judged as model
  randomization is ("depends on the labels": yes when the retention share is low).

All models explain the same class per image: the reference model's prediction (or the given
target), so that the maps answer the same question. Maps come from ``saliency.explain``; the
models are never changed. The similarity metrics of ``metrics`` are reported per model as
curves, with the random-pair baseline of the reference maps (pairs of images explained for the
same class), outside the verdict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from monai_sal_app.evaluation.randomization import RETENTION_CUT, retention_interval, retention_verdict
from monai_sal_app.files import json_safe
from monai_sal_app.metrics.similarity import DISPLAYS, RetentionReference, random_pair_baseline, similarity
from monai_sal_app.saliency import explain
from monai_sal_app.saliency.core import model_guard, resolve_target
from monai_sal_app.saliency.postprocess import checked_steps, postprocess

__all__ = [
    "DEFAULT_METRICS",
    "MAX_AUC_GAP",
    "MIN_KAPPA",
    "REPEATABLE_ABOVE",
    "AgreementResult",
    "comparable_models",
    "label_randomization",
    "map_agreement",
    "permuted_labels",
]

DEFAULT_METRICS = ("ssim", "spearman_abs")
MAX_AUC_GAP = 0.05  # another model is compared only when its ROC AUC is within this of the reference's
MIN_KAPPA = 0.6  # ... and the two models' predictions agree at least this well (Cohen's kappa)
REPEATABLE_ABOVE = 0.5  # "yes" when the retention share's CI lies above this


@dataclass
class AgreementResult:
    """How alike the maps of other models are to the reference model's, for one method.

    ``similarity``: metric -> (M, N) similarity of each other model's map to the reference map,
    per image; ``means``: metric -> (M,) mean over images; ``baseline``: metric -> the random-pair
    baseline of the reference maps (pairs explained for the same class). ``models``: per other
    model, ``{"assessable", "why", "auc_reference", "auc", "kappa", "images" (compared),
    "retention" (mean, ci_low, ci_high, n)}``; ``retention``: the share over every compared
    (model, image) pair, with its bootstrap CI. ``expect`` is "similar" (repeatability: "yes" /
    "partly" / "no" / "not assessable") or "different" (label randomization: "yes" / "no" /
    "unclear", as model randomization). ``reason`` says why in words.
    """

    method: str
    reference: str
    others: list[str]
    expect: str
    display: str
    metrics: list[str]
    similarity: dict[str, np.ndarray]
    means: dict[str, list[float]]
    baseline: dict[str, dict]
    models: dict[str, dict]
    retention: dict
    verdict: str
    reason: str
    blank_maps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-safe: numbers as floats (None for NaN), arrays as lists; baselines without raw values."""
        return json_safe(
            {
                "method": self.method,
                "reference": self.reference,
                "others": self.others,
                "expect": self.expect,
                "display": self.display,
                "metrics": self.metrics,
                "similarity": self.similarity,
                "means": self.means,
                "baseline": {m: {k: v for k, v in b.items() if k != "values"} for m, b in self.baseline.items()},
                "models": self.models,
                "retention": self.retention,
                "verdict": self.verdict,
                "reason": self.reason,
                "blank_maps": self.blank_maps,
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


def _probabilities(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Softmax of ``model``'s logits on ``images``, (N, K) float64, without gradients."""
    with model_guard(model), torch.no_grad():
        x = images.to(next(model.parameters()).device)
        logits = torch.cat([model(x[i : i + 32]) for i in range(0, x.shape[0], 32)])
    return torch.softmax(logits.double(), 1).cpu().numpy()


def _auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``probabilities`` (N, K) against ``labels`` (N,): of class 1 for two classes,
    macro one-vs-rest otherwise (scikit-learn); NaN when a class present in the labels is missing."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    try:
        return float(
            roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(probabilities.shape[1])))
        )
    except ValueError:
        return float("nan")


def _kappa(first: np.ndarray, second: np.ndarray, classes: int) -> float:
    """Cohen's kappa of two predictions (N,): observed agreement beyond the agreement their class
    frequencies give by chance, (p_o - p_e) / (1 - p_e); 1 for identical predictions, and for two
    constant predictions 1 when equal, 0 otherwise (where the ratio is 0 / 0)."""
    observed = float(np.mean(first == second))
    chance = (
        float(np.dot(np.bincount(first, minlength=classes), np.bincount(second, minlength=classes))) / len(first) ** 2
    )
    if chance >= 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - chance) / (1.0 - chance)


def comparable_models(reference: np.ndarray, other: np.ndarray, labels=None, aucs=None) -> dict:
    """Whether two models classify alike enough for their maps to be compared.

    ``reference``, ``other``: (N, K) class probabilities of the two models on the same images.
    ``aucs``: the two models' test ROC AUCs ``(reference, other)`` when known (from their cards);
    otherwise they are computed on these images against ``labels`` (N,) true classes. Returns
    ``{"assessable", "why", "auc_reference", "auc", "kappa", "alike"}``: assessable when both ROC
    AUCs are within :data:`MAX_AUC_GAP` and Cohen's kappa of the predictions (argmax) on these
    images is at least :data:`MIN_KAPPA`; ``alike`` (N,) bool, the images both classify alike."""
    predicted, predicted_other = reference.argmax(1), other.argmax(1)
    agree = predicted == predicted_other
    kappa = _kappa(predicted, predicted_other, reference.shape[1])
    found = {"auc_reference": None, "auc": None, "kappa": kappa, "alike": agree}
    if aucs is not None:
        auc_reference, auc = (float(a) for a in aucs)
    elif labels is not None:
        labels = np.asarray(labels).reshape(-1)
        auc_reference, auc = _auc(reference, labels), _auc(other, labels)
    else:
        return {**found, "assessable": False, "why": "no test ROC AUCs and no true labels to compare the two models"}
    found.update(auc_reference=auc_reference, auc=auc)
    if not (np.isfinite(auc_reference) and np.isfinite(auc)):
        return {**found, "assessable": False, "why": "the images' labels hold one class: no ROC AUC to compare"}
    if abs(auc_reference - auc) > MAX_AUC_GAP:
        return {
            **found,
            "assessable": False,
            "why": f"the models do not classify equally well (ROC AUC {auc_reference:.2f} vs {auc:.2f}, "
            f"more than {MAX_AUC_GAP} apart)",
        }
    if kappa < MIN_KAPPA:
        return {
            **found,
            "assessable": False,
            "why": f"the models' predictions disagree (Cohen's kappa {kappa:.2f} < {MIN_KAPPA})",
        }
    return {**found, "assessable": True, "why": ""}


def _repeatability_verdict(interval: dict, models: dict) -> tuple[str, str]:
    """("yes" / "partly" / "no" / "not assessable", reason) of a comparison with retrained models."""
    if not any(m["assessable"] for m in models.values()):
        reasons = "; ".join(f"{name}: {m['why']}" for name, m in models.items())
        return "not assessable", reasons
    low, high, mean = interval["ci_low"], interval["ci_high"], interval["mean"]
    if low is None:
        return "not assessable", f"the retention share rests on {interval['n']} image(s): no confidence interval"
    shown = f"retention share {mean:.2f} [95% CI {low:.2f}, {high:.2f}] over {interval['n']} image(s)"
    if low > REPEATABLE_ABOVE:
        return "yes", f"{shown}, above {REPEATABLE_ABOVE}: another training run draws the same picture"
    if low > RETENTION_CUT:
        return "partly", (
            f"{shown}: another training run keeps part of the picture (above {RETENTION_CUT}, not above "
            f"{REPEATABLE_ABOVE})"
        )
    return "no", f"{shown}: another training run draws another picture"


def map_agreement(
    models,
    images: torch.Tensor,
    method: str = "gradient",
    target=None,
    params: dict | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    expect: str = "similar",
    labels=None,
    aucs: Mapping[str, float] | None = None,
    display: str = "abs",
    n_pairs: int = 50,
    seed: int = 0,
    postprocess_steps: Sequence[str] = (),
    n_resamples: int = 2000,
) -> AgreementResult:
    """The maps of each other model compared with the first (reference) model's.

    ``models``: ``{name: model}`` (the first is the reference) or a sequence; all take ``images``
    (N, C, *spatial) and predict the same classes. ``target``: None -> the reference model's
    predicted class, kept for every model. ``aucs``: ``{name: test ROC AUC}`` of the models (their
    cards' numbers), or ``labels``: (N,) true classes to compute them on ``images``;
    ``expect="similar"`` (repeatability) needs one of them to check that the models classify
    equally well. ``display``: maps
    compared as |map| ("abs") or signed. ``metrics``: similarity curves reported beside the
    verdict. ``postprocess_steps``: named steps of ``saliency.postprocess`` applied to every map
    before it is compared. ``expect="different"``: label randomization (no model check).
    """
    named = _named(models)
    postprocess_steps = checked_steps(postprocess_steps)
    if expect not in ("similar", "different"):
        raise ValueError(f"expect must be 'similar' or 'different', got {expect!r}")
    if display not in DISPLAYS:
        raise ValueError(f"display must be one of {DISPLAYS}, got {display!r}")
    metrics = list(metrics)
    if images.shape[0] < 2:
        raise ValueError(f"comparing maps across images needs at least 2 images, got {images.shape[0]}")
    if labels is not None and len(labels) != images.shape[0]:
        raise ValueError(f"{len(labels)} labels for {images.shape[0]} images")
    start = time.perf_counter()
    reference_name, reference = next(iter(named.items()))
    with model_guard(reference), torch.no_grad():
        fixed_target = resolve_target(reference, images.to(next(reference.parameters()).device), target).cpu()
    classes = fixed_target.numpy()
    maps = {
        name: postprocess(
            explain(model, images, method, target=fixed_target, **(params or {})).cpu().double(), postprocess_steps
        ).numpy()[:, 0]
        for name, model in named.items()
    }
    reference_maps = maps[reference_name]
    others = [name for name in named if name != reference_name]
    per_metric = {m: np.stack([similarity(reference_maps, maps[o], m) for o in others]) for m in metrics}
    means = {m: per_metric[m].mean(axis=1).tolist() for m in metrics}
    baseline = (
        {m: random_pair_baseline(reference_maps, m, n_pairs=n_pairs, seed=seed, groups=classes) for m in metrics}
        if (np.unique(classes, return_counts=True)[1] >= 2).any()
        else {}
    )
    reference_probabilities = _probabilities(reference, images) if expect == "similar" else None
    pooled, per_model, blank = [], {}, {}
    for name in others:
        if expect == "similar":
            known = (aucs[reference_name], aucs[name]) if aucs and reference_name in aucs and name in aucs else None
            check = comparable_models(reference_probabilities, _probabilities(named[name], images), labels, known)
            alike = check.pop("alike")
        else:
            check, alike = {"assessable": True, "why": ""}, np.ones(len(classes), dtype=bool)
        keep = np.flatnonzero(alike)
        shares = np.full(0, np.nan)
        if check["assessable"] and keep.size >= 2:
            retained = RetentionReference(reference_maps[keep], classes[keep], display)
            shares, blank_now = retained.shares(maps[name][keep])
            blank[name] = int(blank_now.sum())
            pooled.append(shares)
        per_model[name] = {
            **check,
            "images": int(keep.size),
            "retention": retention_interval(shares, seed, n_resamples),
        }
    values = np.concatenate(pooled) if pooled else np.full(0, np.nan)
    interval = retention_interval(values, seed, n_resamples)
    if expect == "similar":
        verdict, reason = _repeatability_verdict(interval, per_model)
    else:
        counts = {str(int(c)): int(n) for c, n in zip(*np.unique(classes, return_counts=True))}
        judged = sum(len(p) for p in pooled)
        verdict, reason = retention_verdict(
            interval,
            counts,
            sum(blank.values()) / max(1, judged),
            "a model trained on permuted labels draws another picture",
            "a model trained on permuted labels draws the same picture: the map does not follow the labels",
        )
    return AgreementResult(
        method=method,
        reference=reference_name,
        others=others,
        expect=expect,
        display=display,
        metrics=metrics,
        similarity=per_metric,
        means=means,
        baseline=baseline,
        models=per_model,
        retention=interval,
        verdict=verdict,
        reason=reason,
        blank_maps={k: v for k, v in blank.items() if v},
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
    images to explain. Judged as model randomization (``expect="different"``): "yes" when the
    label-randomized model's maps keep little of the trained model's image-specific part;
    ``agreement``: further :func:`map_agreement` arguments (metrics, display, n_pairs...).
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
