"""The trust card: per method, does the map depend on the model, track what it uses, point at the
lesion, and come back the same? (Its JSON shape: docs/TRUST_CARD.md.)

:func:`trust_card` runs the checks of :mod:`.randomization`, :mod:`.fidelity`,
``metrics.localization`` and :mod:`.repeatability` for one model on one set of images and returns
one JSON-safe dict; :func:`write_trust_card` stores it beside the checkpoint as
``<model>.trust.json`` (atomically), where the server finds it. Every check explains the same class
per image: the model's prediction (or the given targets). The user's model is never changed.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_sal_app import __version__, distributed
from monai_sal_app.evaluation.fidelity import MIN_REFERENCE_LOGIT, fidelity
from monai_sal_app.evaluation.randomization import model_randomization
from monai_sal_app.evaluation.repeatability import map_agreement
from monai_sal_app.metrics.localization import localization_metrics
from monai_sal_app.metrics.stats import mean_ci
from monai_sal_app.models.checkpoint import atomic_write
from monai_sal_app.saliency import available_methods, explain
from monai_sal_app.saliency.core import model_guard, resolve_target

__all__ = [
    "CHECKS",
    "DEFAULT_CHECKS",
    "DEFAULT_TRUST_METHODS",
    "TrustCardError",
    "read_trust_card",
    "trust_card",
    "trust_card_path",
    "trust_summary",
    "write_trust_card",
]

CHECKS = ("randomization", "fidelity", "localization", "repeatability")
DEFAULT_CHECKS = ("randomization", "fidelity", "localization")
# One or two passes per image: cheap enough to card every served model at first start.
DEFAULT_TRUST_METHODS = ("gradient", "gradient_x_input", "guided_backprop", "gradcam", "guided_gradcam")
LOCALIZATION_KEYS = ("roc_auc", "auprc", "soft_dice", "dice_area")


class TrustCardError(ValueError):
    """The inputs cannot give a trust card (the message says why); nothing was written."""


def _float(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _interval(values) -> dict[str, float | None]:
    mean, low, high = mean_ci(values)
    return {"mean": _float(mean), "ci_low": _float(low), "ci_high": _float(high), "n": int(np.size(values))}


def _localization(maps: np.ndarray, masks: Sequence) -> dict:
    """Mean and 95% CI of the localization metrics of |map| over the images that have a mask."""
    rows = [localization_metrics(np.abs(m[0]), mask) for m, mask in zip(maps, masks) if mask is not None]
    if not rows:
        return {"available": False, "why": "no image has a mask"}
    summary = {key: _interval([row[key] for row in rows]) for key in LOCALIZATION_KEYS}
    roc = summary["roc_auc"]
    localizes = roc["ci_low"] is not None and roc["ci_low"] > 0.5
    summary["verdict"] = "localizes" if localizes else "not better than chance"
    return summary


def _targets(model: nn.Module, images: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(class explained per image (N,), its logit (N,)), on the CPU."""
    device = next(model.parameters()).device
    with model_guard(model), torch.no_grad():
        x = images.to(device)
        resolved = resolve_target(model, x, targets)
        logits = torch.cat([model(x[i : i + 32]) for i in range(0, x.shape[0], 32)])
    return resolved.cpu(), logits.gather(1, resolved.view(-1, 1)).squeeze(1).cpu()


def _check_inputs(images, labels, masks, methods, checks, compare_with) -> tuple[list[str], list[str]]:
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5):
        raise TrustCardError("images must be a float tensor (N, C, H, W) or (N, C, D, H, W)")
    if images.shape[0] < 2:
        raise TrustCardError(f"a trust card needs at least 2 images (the random-pair baseline), got {images.shape[0]}")
    known = available_methods()
    methods = list(methods or DEFAULT_TRUST_METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise TrustCardError(f"unknown method(s) {unknown}; available: {', '.join(known)}")
    checks = list(checks)
    bad = [c for c in checks if c not in CHECKS]
    if bad or not checks:
        raise TrustCardError(f"checks must be drawn from {', '.join(CHECKS)}, got {checks}")
    if "repeatability" in checks and not compare_with:
        raise TrustCardError("the repeatability check needs other models to compare with (compare_with)")
    if labels is not None and len(labels) != images.shape[0]:
        raise TrustCardError(f"{len(labels)} labels for {images.shape[0]} images")
    if masks is not None:
        if len(masks) != images.shape[0]:
            raise TrustCardError(f"{len(masks)} masks for {images.shape[0]} images")
        for index, mask in enumerate(masks):
            if mask is not None and tuple(np.shape(mask)) != tuple(images.shape[2:]):
                raise TrustCardError(
                    f"mask {index} has shape {tuple(np.shape(mask))}, the images {tuple(images.shape[2:])}: "
                    "masks must be on the images' grid"
                )
    return methods, checks


def trust_card(
    model: nn.Module,
    images: torch.Tensor,
    labels=None,
    masks: Sequence | None = None,
    methods: Sequence[str] | None = None,
    checks: Sequence[str] = DEFAULT_CHECKS,
    seed: int = 0,
    targets=None,
    compare_with: Mapping[str, nn.Module] | None = None,
    data: Mapping[str, Any] | None = None,
    params: Mapping[str, dict] | None = None,
) -> dict:
    """Run the trust checks of ``methods`` for ``model`` on ``images``; a JSON-safe dict.

    ``images``: float tensor (N, C, *spatial), N >= 2, on any device. ``labels``: (N,) true classes
    (accuracy curves of the fidelity check; default: the model's prediction). ``masks``: N masks
    on the images' grid, or None per image without one (localization). ``targets``: the class to
    explain per image (default: the model's prediction). ``compare_with``: ``{name: model}`` other
    trained models for the repeatability check. ``data``: free-form description of the images
    (source, split) stored in the card. ``params``: per-method parameters for ``explain``.

    Returns ``{"monai_sal_version", "created", "seconds", "data", "settings", "methods": {method:
    {"randomization", "fidelity", "localization", "repeatability" (the checks run), "verdicts",
    "seconds_per_map"}}}``; the verdict strings are "passes"/"fails" (randomization,
    repeatability), "tracks the model"/"does not track the model" (fidelity), "localizes"/"not
    better than chance" (localization). Raises :class:`TrustCardError` for inputs it cannot use.
    Under ``torchrun`` the methods are dealt to the ranks (``distributed.gather_blocks``) and
    every rank returns the whole card.
    """
    methods, checks = _check_inputs(images, labels, masks, methods, checks, compare_with)
    params = dict(params or {})
    start = time.perf_counter()
    fixed_targets, target_logits = _targets(model, images, targets)
    # The logit ratio when every target logit is positive; else the target's probability (softmax
    # lets the predicted class of a two-class model have a negative logit, and a ratio to it is
    # meaningless). Probabilities of a saturated model barely move, which is why it is the fallback.
    fidelity_score = "logit_ratio" if bool((target_logits > MIN_REFERENCE_LOGIT).all()) else "probability"

    def method_entry(method: str) -> dict[str, Any]:
        method_params = dict(params.get(method, {}))
        timer = time.perf_counter()
        maps = explain(model, images, method, target=fixed_targets, **method_params).cpu()
        entry: dict[str, Any] = {"seconds_per_map": (time.perf_counter() - timer) / images.shape[0]}
        verdicts: dict[str, str] = {}
        if "randomization" in checks:
            result = model_randomization(
                model, images, method, target=fixed_targets, params=method_params, seed=seed, original_maps=maps
            )
            entry["randomization"] = result.to_dict()
            verdicts["randomization"] = result.verdict
        if "fidelity" in checks:
            result = fidelity(
                model, images, maps=maps, target=fixed_targets, labels=labels, score=fidelity_score, seed=seed
            )
            entry["fidelity"] = {**result.to_dict(), "method": method}
            tracks = result.ci_low is not None and np.isfinite(result.ci_low) and result.ci_low > 0
            entry["fidelity"]["verdict"] = "tracks the model" if tracks else "does not track the model"
            verdicts["fidelity"] = entry["fidelity"]["verdict"]
        if "localization" in checks:
            entry["localization"] = (
                _localization(maps.numpy(), masks)
                if masks is not None
                else {"available": False, "why": "no masks given"}
            )
            if "verdict" in entry["localization"]:
                verdicts["localization"] = entry["localization"]["verdict"]
        if "repeatability" in checks:
            result = map_agreement(
                {"model": model, **dict(compare_with)},
                images,
                method,
                target=fixed_targets,
                params=method_params,
                seed=seed,
            )
            entry["repeatability"] = result.to_dict()
            verdicts["repeatability"] = result.verdict
        entry["verdicts"] = verdicts
        return entry

    # One method per block: under torchrun the ranks share the methods out (each needs every
    # image's map for its random-pair baseline), in one process this is the plain loop.
    entries = distributed.gather_blocks(len(methods), 1, lambda start, _: [method_entry(methods[start])])
    card_methods = dict(zip(methods, entries))
    return {
        "monai_sal_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - start,
        "data": {
            "n_images": int(images.shape[0]),
            "image_shape": [int(s) for s in images.shape[1:]],
            "n_masks": 0 if masks is None else sum(m is not None for m in masks),
            **dict(data or {}),
        },
        "settings": {
            "checks": checks,
            "methods": methods,
            "seed": seed,
            "targets": "given" if targets is not None else "predicted",
            "fidelity_score": fidelity_score,
        },
        "methods": card_methods,
    }


def trust_card_path(checkpoint: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.trust.json`` (beside the checkpoint and its card)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.trust.json")


def write_trust_card(card: Mapping, checkpoint: str | os.PathLike) -> Path:
    """Write ``card`` to ``<checkpoint stem>.trust.json`` atomically (a temporary file renamed)."""
    path = trust_card_path(checkpoint)
    text = json.dumps(card, indent=2, allow_nan=False)  # fails before anything is written
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


def read_trust_card(checkpoint: str | os.PathLike) -> dict | None:
    """The trust card beside ``checkpoint``, or None when there is none; ValueError when it is corrupt."""
    path = trust_card_path(checkpoint)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: corrupt trust card ({error})") from error
    if not isinstance(card, dict) or not isinstance(card.get("methods"), dict):
        raise ValueError(f"{path}: not a trust card (no 'methods')")
    return card


def _method_summary(entry: Mapping) -> dict:
    """The verdicts and headline numbers of one method's entry (what a client shows next to a map)."""
    summary: dict[str, Any] = {"verdicts": dict(entry.get("verdicts", {}))}
    if "randomization" in entry:
        r = entry["randomization"]
        metric = r["verdict_metric"]
        summary["randomization"] = {
            "verdict": r["verdict"],
            "metric": metric,
            "mean_similarity_over_states": r["statistic"][metric],
            "random_pairs_ci": [r["baseline"][metric]["ci_low"], r["baseline"][metric]["ci_high"]],
            "states": len(r["states"]),
        }
    if "fidelity" in entry:
        f = entry["fidelity"]
        summary["fidelity"] = {
            "verdict": f["verdict"],
            "mean": f["mean"],
            "ci": [f["ci_low"], f["ci_high"]],
            "score": f["score"],
        }
    localization = entry.get("localization", {})
    if "roc_auc" in localization:
        roc = localization["roc_auc"]
        summary["localization"] = {
            "verdict": localization["verdict"],
            "roc_auc": roc["mean"],
            "ci": [roc["ci_low"], roc["ci_high"]],
            "n": roc["n"],
        }
    if "repeatability" in entry:
        rep = entry["repeatability"]
        summary["repeatability"] = {
            "verdict": rep["verdict"],
            "metric": rep["verdict_metric"],
            "mean": rep["statistic"][rep["verdict_metric"]],
        }
    summary["seconds_per_map"] = entry.get("seconds_per_map")
    return summary


def trust_summary(card: Mapping, method: str | None = None) -> dict:
    """A compact view of a trust card: when and on what it was computed, and per method (or for
    ``method`` only) the verdicts and headline numbers. For ``method`` not in the card:
    ``{"available": False, "why": ...}``."""
    header = {"created": card.get("created"), "data": card.get("data"), "settings": card.get("settings")}
    if method is None:
        return {"available": True, **header, "methods": {m: _method_summary(e) for m, e in card["methods"].items()}}
    if method not in card["methods"]:
        carded = ", ".join(card["methods"])
        return {"available": False, "why": f"the trust card has no entry for {method!r} (it covers {carded})"}
    return {"available": True, **header, **_method_summary(card["methods"][method])}
