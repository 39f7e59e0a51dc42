"""The trust card: per method, does the map depend on what the model learned, track what it uses,
point at the findings beyond where they usually are, and come back from another training run?
(Its JSON shape: docs/TRUST_CARD.md; the rules: docs/METHODS.md#how-the-trust-card-judges.)

:func:`trust_card` runs the checks of :mod:`.randomization`, :mod:`.fidelity`,
``metrics.localization`` and :mod:`.repeatability` for one model on one set of images and returns
one JSON-safe dict; :func:`write_trust_card` stores it beside the checkpoint as
``<model>.trust.json`` (atomically), where the server finds it. Every check explains the same class
per image: the model's prediction (or the given targets). The user's model is never changed.

Each check answers its question (:data:`QUESTIONS`) with "yes", "no" or "unclear" (repeatability:
"yes", "partly", "no" or "not assessable"), a meaning in a few words and the numbers behind it. A
"yes" is a minimum requirement, not proof that a map is right (:data:`MINIMUM`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_sal_app import distributed
from monai_sal_app.evaluation.fidelity import BASELINES, fidelity
from monai_sal_app.evaluation.randomization import model_randomization
from monai_sal_app.evaluation.repeatability import map_agreement
from monai_sal_app.metrics.localization import localization_metrics
from monai_sal_app.metrics.similarity import DISPLAYS
from monai_sal_app.metrics.stats import mean_ci
from monai_sal_app.models.checkpoint import atomic_write
from monai_sal_app.saliency import available_methods, explain
from monai_sal_app.saliency.core import get_method, model_guard, resolve_target
from monai_sal_app.version import __version__

__all__ = [
    "CHECKS",
    "DEFAULT_CHECKS",
    "DEFAULT_TRUST_METHODS",
    "MINIMUM",
    "QUESTIONS",
    "SCHEMA_VERSION",
    "OutdatedTrustCard",
    "TrustCardError",
    "check_lines",
    "read_trust_card",
    "trust_card",
    "trust_card_path",
    "trust_summary",
    "write_trust_card",
]

SCHEMA_VERSION = 2  # the card's JSON shape and rules; a card of another version is recomputed, never read
CHECKS = ("randomization", "fidelity", "localization", "repeatability")
DEFAULT_CHECKS = ("randomization", "fidelity", "localization")
# One or two passes per image: cheap enough to card every served model at first start.
DEFAULT_TRUST_METHODS = ("gradient", "gradient_x_input", "guided_backprop", "gradcam", "guided_gradcam")
LOCALIZATION_KEYS = ("roc_auc", "auprc", "soft_dice", "dice_area")
MIN_FIDELITY_IMAGES = 2  # fewer scored images: no confidence interval, "unclear"
MIN_FIDELITY = 0.05  # a "yes" needs a mean fidelity of at least this (a random-weights model's is ~1e-3)
QUESTIONS = {
    "randomization": "Depends on what the model learned",
    "fidelity": "Tracks what the model uses",
    "localization": "Localizes beyond where findings usually are",
    "repeatability": "Comes back from another training run",
}
MINIMUM = "'yes' is a minimum requirement for reading a map as this model's reasons, not proof that the map is right"
# What each answer means, in a few words (the reason with its numbers is given beside it).
MEANINGS = {
    ("randomization", "yes"): "the map changes when the model's learned weights are replaced by random ones",
    ("randomization", "no"): "the map stays much the same with random weights: it shows the image, not this "
    "model's reasons",
    ("randomization", "unclear"): "this check could not tell whether the map depends on the learned weights",
    ("fidelity", "yes"): "removing what the map ranks first hurts the decision more than removing what it ranks last",
    ("fidelity", "no"): "removing what the map ranks first hurts the decision less than removing what it ranks last",
    ("fidelity", "unclear"): "this check could not tell whether the map follows the evidence the model uses",
    ("localization", "yes"): "the map points at the findings better than a map of where findings usually are",
    ("localization", "no"): "the map points at the findings worse than a map of where findings usually are",
    ("localization", "unclear"): "these images cannot tell the map from a map of where findings usually are",
    ("localization (chance)", "yes"): "the map points at the findings better than chance; no training masks "
    "tell where findings usually are",
    ("localization (chance)", "no"): "the map points away from the findings",
    ("localization (chance)", "unclear"): "these images cannot tell the map from chance",
    ("repeatability", "yes"): "another training run of the model draws the same picture",
    ("repeatability", "partly"): "another training run of the model keeps part of the picture",
    ("repeatability", "no"): "another training run of the model draws another picture",
    ("repeatability", "not assessable"): "the models compared do not classify alike, so their maps need not agree",
}


class TrustCardError(ValueError):
    """The inputs cannot give a trust card (the message says why); nothing was written."""


class OutdatedTrustCard(ValueError):
    """A trust card of another schema version than :data:`SCHEMA_VERSION`: recompute it."""


def _float(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _interval(values) -> dict[str, float | None]:
    mean, low, high = mean_ci(values)
    finite = int(np.isfinite(np.asarray(values, dtype=float)).sum())
    return {"mean": _float(mean), "ci_low": _float(low), "ci_high": _float(high), "n": finite}


def _answer(check: str, answer: str, why: str, meanings: str | None = None) -> dict[str, str]:
    """One check's answer for the card: its question, the answer, what it means, and why (the numbers)."""
    return {
        "question": QUESTIONS[check],
        "answer": answer,
        "meaning": MEANINGS[(meanings or check, answer)],
        "why": why,
    }


def _against(interval: dict, reference: str, unit: str) -> tuple[str, str]:
    """("yes" / "no" / "unclear", why) of a difference's ``interval`` against 0."""
    mean, low, high = interval["mean"], interval["ci_low"], interval["ci_high"]
    if low is None or high is None:
        return "unclear", f"{interval['n']} image(s) scored: no confidence interval"
    shown = f"{unit} {mean:+.3f} [95% CI {low:+.3f}, {high:+.3f}] over {interval['n']} images"
    if low > 0:
        return "yes", f"{shown}, above {reference}"
    if high < 0:
        return "no", f"{shown}, below {reference}"
    return "unclear", f"{shown}: its CI includes {reference}"


def _localization(maps: np.ndarray, masks: Sequence, prior: np.ndarray | None) -> dict:
    """Localization metrics of |map| over the images that have a mask, and the answer: ROC AUC
    against the mean training mask used as a map (``prior``) when given, against chance (0.5)
    otherwise, per image, with a Student-t 95% CI of the difference."""
    pairs = [(np.abs(m[0]), mask) for m, mask in zip(maps, masks) if mask is not None]
    if not pairs:
        return {"available": False, "why": "no image has a mask"}
    rows = [localization_metrics(m, mask) for m, mask in pairs]
    summary: dict[str, Any] = {key: _interval([row[key] for row in rows]) for key in LOCALIZATION_KEYS}
    if prior is not None:
        reference_rows = [localization_metrics(prior, mask) for _, mask in pairs]
        summary["reference"] = "mean training mask"
        summary["reference_roc_auc"] = _interval([row["roc_auc"] for row in reference_rows])
        gains = [row["roc_auc"] - ref["roc_auc"] for row, ref in zip(rows, reference_rows)]
        reference = "the mean training mask's ROC AUC"
    else:
        summary["reference"] = "chance"
        gains = [row["roc_auc"] - 0.5 for row in rows]
        reference = "chance (0.5): no training masks tell where findings usually are"
    summary["roc_auc_gain"] = _interval(gains)
    answer, why = _against(summary["roc_auc_gain"], reference, "ROC AUC gain")
    summary["verdict"] = answer
    summary["check"] = _answer("localization", answer, why, None if prior is not None else "localization (chance)")
    if prior is None:
        summary["check"]["question"] = "Localizes better than chance"
    return summary


def _fidelity(result, method: str) -> dict:
    entry = {**result.to_dict(), "method": method}
    interval = {"mean": _float(result.mean), "ci_low": _float(result.ci_low), "ci_high": _float(result.ci_high)}
    interval["n"] = result.n_scored
    if result.replaced_as_target > 0.5:
        answer, why = (
            "unclear",
            (
                f"the fully replaced image ({result.baseline}) is classified as the explained class for "
                f"{result.replaced_as_target:.0%} of the images: the replacement is itself evidence for the class"
            ),
        )
    elif result.n_scored < MIN_FIDELITY_IMAGES:
        answer, why = "unclear", f"{result.n_scored} image(s) scored (the explained class is not the predicted one)"
    else:
        answer, why = _against(interval, "0", "fidelity")
        if answer == "yes" and interval["mean"] < MIN_FIDELITY:
            answer, why = "unclear", f"{why}, but below {MIN_FIDELITY}: too small an effect to say"
    entry["verdict"] = answer
    entry["check"] = _answer("fidelity", answer, why)
    return entry


def _targets(model: nn.Module, images: torch.Tensor, targets) -> torch.Tensor:
    """The class explained per image (N,), on the CPU."""
    device = next(model.parameters()).device
    with model_guard(model), torch.no_grad():
        return resolve_target(model, images.to(device), targets).cpu()


def _on_grid(mask, spatial: tuple[int, ...], what: str):
    """``mask`` as an array on the images' grid ``spatial``, a leading channel of 1 (MONAI's
    (1, *spatial)) dropped; TrustCardError otherwise."""
    if mask is None:
        return None
    array = np.asarray(mask)
    if array.ndim == len(spatial) + 1 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != spatial:
        raise TrustCardError(
            f"{what} has shape {tuple(np.shape(mask))}, the images {spatial}: it must be on the images' grid, "
            "(*spatial) or (1, *spatial)"
        )
    return array


def _check_inputs(images, labels, masks, mask_prior, methods, checks, compare_with, replacement, display):
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5):
        raise TrustCardError("images must be a float tensor (N, C, H, W) or (N, C, D, H, W)")
    if images.shape[0] < 2:
        raise TrustCardError(
            f"a trust card needs at least 2 images (maps compared across images), got {images.shape[0]}"
        )
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
    if replacement not in BASELINES:
        raise TrustCardError(f"unknown fidelity replacement {replacement!r}; choose one of {', '.join(BASELINES)}")
    if display not in DISPLAYS:
        raise TrustCardError(f"display must be one of {', '.join(DISPLAYS)}, got {display!r}")
    if labels is not None and len(labels) != images.shape[0]:
        raise TrustCardError(f"{len(labels)} labels for {images.shape[0]} images")
    spatial = tuple(images.shape[2:])
    if masks is not None:
        if len(masks) != images.shape[0]:
            raise TrustCardError(f"{len(masks)} masks for {images.shape[0]} images")
        masks = [_on_grid(mask, spatial, f"mask {index}") for index, mask in enumerate(masks)]
    prior = _on_grid(mask_prior, spatial, "mask_prior")
    return methods, checks, masks, prior


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
    mask_prior=None,
    fidelity_replacement: str = "zero",
    display: str = "abs",
    reset_batch_norm: bool = False,
    aucs: Mapping[str, float] | None = None,
    done: Mapping[str, dict] | None = None,
    on_entry: Callable[[str, dict], None] | None = None,
) -> dict:
    """Run the trust checks of ``methods`` for ``model`` on ``images``; a JSON-safe dict.

    ``images``: float tensor (N, C, *spatial), N >= 2, on any device. ``labels``: (N,) true classes
    (the fidelity accuracy curves; the repeatability check's model comparison). ``masks``: N masks
    on the images' grid, (*spatial) or MONAI's (1, *spatial), or None per image without one
    (localization). ``mask_prior``: the mean training mask on the same grid (values in [0, 1],
    ``metrics.localization.mean_mask_baseline``): localization is judged against it, against
    chance without it. ``targets``: the class to explain per image (default: the model's
    prediction). ``compare_with``: ``{name: model}`` other trained models (repeatability).
    ``data``: free-form description of the images (source, split, image ids) stored in the card.
    ``params``: per-method parameters for ``explain``. ``fidelity_replacement``: what replaces
    removed positions ("zero", "mean", "blur", "road"). ``display``: maps compared as shown, "abs"
    (|map|) or "signed". ``reset_batch_norm``: randomization resets batch-norm statistics too.
    ``aucs``: test ROC AUCs of the model (key "model") and of the ``compare_with`` models, from their
    cards, for the repeatability check (without them, computed on ``images`` against ``labels``).
    ``done``: ``{method: entry}`` of methods already checked with these very inputs and settings
    (an earlier run's, kept as they are, not computed again); ``on_entry(method, entry)`` is called
    with each method's entry as soon as it is computed (to keep it, e.g. for a rerun).

    Returns ``{"schema", "monai_sal_version", "created", "seconds", "data", "settings", "reading",
    "methods": {method: {"checks": {check: {"question", "answer", "meaning", "why"}}, "verdicts":
    {check: answer}, "randomization", "fidelity", "localization", "repeatability" (the checks
    run, with their numbers), "seconds_per_map"}}}``. Raises :class:`TrustCardError` for inputs
    it cannot use. Under ``torchrun`` the methods are dealt to the ranks
    (``distributed.gather_blocks``) and every rank returns the whole card.
    """
    methods, checks, masks, prior = _check_inputs(
        images, labels, masks, mask_prior, methods, checks, compare_with, fidelity_replacement, display
    )
    params = dict(params or {})
    start = time.perf_counter()
    fixed_targets = _targets(model, images, targets)

    def method_entry(method: str) -> dict[str, Any]:
        method_params = dict(params.get(method, {}))
        timer = time.perf_counter()
        maps = explain(model, images, method, target=fixed_targets, **method_params).cpu()
        entry: dict[str, Any] = {"seconds_per_map": (time.perf_counter() - timer) / images.shape[0]}
        answers: dict[str, dict] = {}
        if "randomization" in checks:
            result = model_randomization(
                model, images, method, target=fixed_targets, params=method_params, seed=seed, original_maps=maps,
                display=display, reset_batch_norm=reset_batch_norm,
            )  # fmt: skip
            entry["randomization"] = result.to_dict()
            answers["randomization"] = _answer("randomization", result.verdict, result.reason)
        if "fidelity" in checks:
            result = fidelity(
                model, images, maps=maps, target=fixed_targets, labels=labels, score="margin",
                baseline=fidelity_replacement, order_by="signed" if get_method(method).signed else "abs", seed=seed,
            )  # fmt: skip
            entry["fidelity"] = _fidelity(result, method)
            answers["fidelity"] = entry["fidelity"].pop("check")
        if "localization" in checks:
            entry["localization"] = (
                _localization(maps.numpy(), masks, prior)
                if masks is not None
                else {"available": False, "why": "no masks given"}
            )
            if "check" in entry["localization"]:
                answers["localization"] = entry["localization"].pop("check")
        if "repeatability" in checks:
            result = map_agreement(
                {"model": model, **dict(compare_with)}, images, method, target=fixed_targets, params=method_params,
                labels=labels, aucs=aucs, display=display, seed=seed,
            )  # fmt: skip
            entry["repeatability"] = result.to_dict()
            answers["repeatability"] = _answer("repeatability", result.verdict, result.reason)
        entry["checks"] = answers
        entry["verdicts"] = {check: answer["answer"] for check, answer in answers.items()}
        return entry

    def computed_entry(method: str) -> dict[str, Any]:
        entry = method_entry(method)
        if on_entry is not None:
            on_entry(method, entry)
        return entry

    # One method per block: under torchrun the ranks share the methods out (each needs every
    # image's map for its comparisons across images), in one process this is the plain loop.
    done = {method: entry for method, entry in (done or {}).items() if method in methods}
    todo = [method for method in methods if method not in done]
    computed = distributed.gather_blocks(len(todo), 1, lambda start, _: [computed_entry(todo[start])])
    entries = [done[method] if method in done else computed[todo.index(method)] for method in methods]
    return {
        "schema": SCHEMA_VERSION,
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
            "display": display,
            "fidelity_score": "margin",
            "fidelity_replacement": fidelity_replacement,
            "batch_norm_statistics": "reset" if reset_batch_norm else "kept as trained",
            "localization_reference": "mean training mask" if prior is not None else "chance",
        },
        "reading": MINIMUM,
        "methods": dict(zip(methods, entries)),
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
    """The trust card beside ``checkpoint``, or None when there is none; ``ValueError`` when it is
    corrupt, :class:`OutdatedTrustCard` when it was written under another :data:`SCHEMA_VERSION`
    (its verdicts follow other rules: recompute it, never read it as this version's)."""
    path = trust_card_path(checkpoint)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: corrupt trust card ({error})") from error
    if not isinstance(card, dict) or not isinstance(card.get("methods"), dict):
        raise ValueError(f"{path}: not a trust card (no 'methods')")
    version = card.get("schema", 1)
    if version != SCHEMA_VERSION:
        raise OutdatedTrustCard(
            f"{path}: a trust card of schema {version}, this monai-sal reads schema {SCHEMA_VERSION}: recompute it "
            "(monai-sal trust)"
        )
    return card


def check_lines(checks: Mapping[str, Mapping]) -> list[str]:
    """One line per check for a reader, in :data:`CHECKS` order: ``"<question>: <answer> (<meaning>)"``,
    a "yes" followed by what it is not (:data:`MINIMUM`)."""
    lines = []
    for name in CHECKS:
        if check := checks.get(name):
            minimum = "; a minimum requirement, not proof that the map is right" if check["answer"] == "yes" else ""
            lines.append(f"{check['question']}: {check['answer']} ({check['meaning']}{minimum})")
    return lines


def _method_summary(entry: Mapping) -> dict:
    """The answers and headline numbers of one method's entry (what a client shows next to a map)."""
    checks = {name: dict(answer) for name, answer in entry.get("checks", {}).items()}
    summary: dict[str, Any] = {
        "verdicts": dict(entry.get("verdicts", {})),
        "checks": checks,
        "lines": check_lines(checks),
    }
    if "randomization" in entry:
        r = entry["randomization"]
        summary["randomization"] = {
            "answer": r["verdict"],
            "retention_share": r["retention"]["mean"],
            "ci": [r["retention"]["ci_low"], r["retention"]["ci_high"]],
            "judged_states": len(r["judged_states"]),
            "states": len(r["states"]),
        }
    if "fidelity" in entry:
        f = entry["fidelity"]
        summary["fidelity"] = {
            "answer": f["verdict"],
            "mean": f["mean"],
            "ci": [f["ci_low"], f["ci_high"]],
            "score": f["score"],
            "replacement": f["baseline"],
        }
    localization = entry.get("localization", {})
    if "roc_auc" in localization:
        roc, gain = localization["roc_auc"], localization["roc_auc_gain"]
        summary["localization"] = {
            "answer": localization["verdict"],
            "roc_auc": roc["mean"],
            "reference": localization["reference"],
            "gain": gain["mean"],
            "ci": [gain["ci_low"], gain["ci_high"]],
            "n": roc["n"],
        }
    if "repeatability" in entry:
        rep = entry["repeatability"]
        summary["repeatability"] = {
            "answer": rep["verdict"],
            "retention_share": rep["retention"]["mean"],
            "ci": [rep["retention"]["ci_low"], rep["retention"]["ci_high"]],
        }
    summary["seconds_per_map"] = entry.get("seconds_per_map")
    return summary


def trust_summary(card: Mapping, method: str | None = None) -> dict:
    """A compact view of a trust card: when and on which images it was computed, how to read it,
    and per method (or for ``method`` only) the answers with their meaning and headline numbers.
    For ``method`` not in the card: ``{"available": False, "why": ...}``."""
    header = {
        "schema": card.get("schema"),
        "created": card.get("created"),
        "data": card.get("data"),
        "settings": card.get("settings"),
        "reading": card.get("reading", MINIMUM),
    }
    if method is None:
        return {"available": True, **header, "methods": {m: _method_summary(e) for m, e in card["methods"].items()}}
    if method not in card["methods"]:
        carded = ", ".join(card["methods"])
        return {"available": False, "why": f"the trust card has no entry for {method!r} (it covers {carded})"}
    return {"available": True, **header, **_method_summary(card["methods"][method])}
