"""Trained explainers against post-hoc methods on one classifier: localization and time per map.

:func:`compare_explainers` generates a built-in model's data (``experiments.builtin_models``), trains the
recipe's classifier and each trained explainer for it (``monai-sal train-explainer``; on the
classifier's training images, or on ``explainer_per_class`` more generated ones), and explains
the held-out test images that have a pathology mask, for the pathology class, with every method.
Per method: localization against the masks (mean and 95% CI of the AUPRC, i.e. AUC_loc; the
partial AUC_loc up to recall 0.5; IoU at the 80th ... 98th percentiles) and the mean time per map;
the similarity-adversarial explainer with and without test-time averaging, and its flip rate (how
often the classifier assigns x_adv to another class than the image, over all test images).
Everything goes under ``out``: data, checkpoints, maps and overlays, ``per_image.csv`` and the table
``explainers.{csv,md}``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from monai_sal_app.arguments import check_integer
from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.experiments.builtin_models import (
    DefaultModel,
    builtin_model_for,
    generate_explainer_data,
    generate_model_data,
    train_builtin_model,
)
from monai_sal_app.experiments.explainer_training import train_explainer_from_manifest
from monai_sal_app.experiments.report import write_table
from monai_sal_app.experiments.workflows import explain_items
from monai_sal_app.explainers import load_explainer
from monai_sal_app.metrics.localization import DEFAULT_PERCENTILES, localization_metrics, partial_auprc
from monai_sal_app.metrics.stats import mean_ci, write_csv
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.models.inputs import load_inputs
from monai_sal_app.saliency.core import model_device

__all__ = [
    "PATHOLOGY_CLASS",
    "POSTHOC_BASELINES",
    "TTA_METHODS",
    "compare_explainers",
    "explain_with_tta",
    "flip_rate",
    "generate_study_data",
    "localization_rows",
    "localization_table",
    "with_explainers",
]

POSTHOC_BASELINES = ("gradient", "gradcam", "meaningful_perturbation")
TTA_METHODS = ("similarity_adversarial",)  # the methods that take tta=True (test-time averaging)
PATHOLOGY_CLASS = 1


def localization_rows(maps_csv: str | os.PathLike, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[dict]:
    """One row per map of a ``maps.csv`` (``workflows.explain_items``) whose image has a mask, in the
    file's order: ``id``, ``method``, ``auprc`` (AUC_loc, in [0, 1]), ``partial_auprc`` (the AUPRC up
    to recall 0.5, in [0, 0.5]), ``iou_p<p>`` (IoU of the map's top ``100 - p`` % with the mask) for
    each of ``percentiles``, and ``seconds_per_map`` (wall time of one map, in seconds)."""
    with open(maps_csv, newline="") as handle:
        entries = [entry for entry in csv.DictReader(handle) if entry["mask"]]
    if not entries:
        raise ValueError(f"{maps_csv}: no map with a mask")
    rows = []
    for entry in entries:
        saliency, _ = read_image(entry["map"], allow_constant=True)
        mask = read_image(entry["mask"], allow_constant=True)[0] > 0.5
        metrics = localization_metrics(saliency, mask, percentiles)
        rows.append(
            {
                "id": entry["id"],
                "method": entry["method"],
                "auprc": metrics["auprc"],
                "partial_auprc": partial_auprc(saliency, mask, 0.5),
                **{f"iou_p{p:g}": metrics[f"iou_p{p:g}"] for p in percentiles},
                "seconds_per_map": float(entry["seconds_per_image"]),
            }
        )
    return rows


def localization_table(maps_csv: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(per-image rows, one summary row per method) of a ``maps.csv`` whose images all have a mask:
    the rows of :func:`localization_rows` at the default percentiles (``iou_p80`` ... ``iou_p98``);
    per method their means with the AUPRC's 95% CI, ``n`` and ``seconds_per_map``."""
    rows = localization_rows(maps_csv)
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        mean, low, high = mean_ci([row["auprc"] for row in mine])
        summary.append(
            {
                "method": method,
                "n": len(mine),
                "auprc_mean": mean,
                "auprc_ci_low": low,
                "auprc_ci_high": high,
                "partial_auprc_mean": float(np.mean([row["partial_auprc"] for row in mine])),
                **{
                    f"iou_p{p:g}_mean": float(np.mean([row[f"iou_p{p:g}"] for row in mine]))
                    for p in DEFAULT_PERCENTILES
                },
                "seconds_per_map": float(np.mean([row["seconds_per_map"] for row in mine])),
            }
        )
    return rows, summary


def flip_rate(model, card, generator, items: list[dict]) -> dict:
    """How often the classifier's prediction for x_adv differs from its prediction for the image, over
    ``items`` (preprocessed as the classifier sees them): ``{"rate", "n"}``."""
    import torch

    x, _ = load_inputs(items, card.input_size, progress=False)
    device = model_device(model)
    flipped = 0
    with torch.no_grad():
        for start in range(0, len(x), 32):
            batch = x[start : start + 32].to(device)
            predicted = card.predict(model(batch).softmax(1).cpu().numpy())
            _, adversarial = generator(batch)
            flipped += int((card.predict(model(adversarial).softmax(1).cpu().numpy()) != predicted).sum())
    return {"rate": flipped / len(x), "n": len(x)}


def generate_study_data(
    spec: DefaultModel,
    folder: str | os.PathLike,
    per_class: int | None = None,
    test_per_class: int | None = None,
    explainer_per_class: int | None = None,
    seed: int = 0,
    *,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> tuple[Path, Path, Path]:
    """The manifests (train, test, explainer) of a comparison under ``folder``: the recipe's training
    and test data (``recipes.generate_model_data``; ``None``: the recipe's sizes) and, with
    ``explainer_per_class``, that many more generated images per class to train the explainers on
    (``recipes.generate_explainer_data``); without it the explainers train on the training images."""
    train, test = generate_model_data(spec, folder, per_class, test_per_class, seed, progress=progress, log=log)
    if explainer_per_class is None:
        return train, test, train
    return train, test, generate_explainer_data(spec, folder, explainer_per_class, seed, progress=progress, log=log)


def with_explainers(params: dict, model, checkpoints: Mapping[str, str | os.PathLike]) -> dict:
    """``params`` (method -> its parameters) with each trained explainer of ``checkpoints`` (kind ->
    its checkpoint) loaded on the model's device as that method's ``explainer``: loaded once, each
    map is then one forward pass of the explainer."""
    params = {name: dict(values) for name, values in params.items()}
    for kind, checkpoint in checkpoints.items():
        params.setdefault(kind, {})["explainer"] = load_explainer(checkpoint, model_device(model))[0]
    return params


def explain_with_tta(
    model,
    card,
    items: list[dict],
    out: str | os.PathLike,
    methods: Sequence[str],
    params: dict,
    *,
    overlays: int = 8,
    progress: bool = True,
) -> tuple[Path, Path | None]:
    """Explain ``items`` for the pathology class with every method into ``out/maps``, then with the
    methods of :data:`TTA_METHODS` among them again with test-time averaging (``tta``) into
    ``out/maps_tta``. One image at a time, so that each map's time (``seconds_per_image``) is that of
    one image, as an interactive user sees it. ``params``: method -> its parameters (a trained
    explainer's module under ``explainer``, see :func:`with_explainers`); ``overlays``: PNGs of the
    first that many items per method. Returns the two ``maps.csv`` (the second None when no method
    averages)."""
    out = Path(out)
    maps_csv = explain_items(
        model, card, items, out / "maps", methods=methods, params=params, target=PATHOLOGY_CLASS, batch_size=1,
        overlays=overlays, progress=progress,
    )  # fmt: skip
    averaged = [method for method in methods if method in TTA_METHODS]
    if not averaged:
        return maps_csv, None
    tta_params = {method: {**params.get(method, {}), "tta": True} for method in averaged}
    tta_csv = explain_items(
        model, card, items, out / "maps_tta", methods=averaged, params=tta_params, target=PATHOLOGY_CLASS,
        batch_size=1, overlays=overlays, progress=progress,
    )  # fmt: skip
    return maps_csv, tta_csv


def compare_explainers(
    out: str | os.PathLike,
    *,
    data: str = "chest-xray",
    methods: Sequence[str] = POSTHOC_BASELINES,
    explainers: Sequence[str] = ("mask_generator", "similarity_adversarial"),
    explainer_epochs: int = 20,
    epochs: int | None = None,
    per_class: int | None = None,
    test_per_class: int | None = None,
    explainer_per_class: int | None = None,
    max_images: int | None = None,
    params: dict | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> list[dict]:
    """Train ``data``'s recipe classifier and the ``explainers`` for it, then compare them with the
    post-hoc ``methods`` on the test images that have a mask (the first ``max_images`` of them).

    ``explainer_per_class``: train the explainers on that many more generated images per class
    (``recipes.generate_explainer_data``) instead of the classifier's training images.
    ``params``: method -> its parameters (e.g. fewer meaningful-perturbation steps). Checkpoints
    already in ``out`` are used as they are. Returns the table's rows (see the module docstring).
    """
    spec = builtin_model_for(data)
    if explainer_per_class is not None:
        check_integer(explainer_per_class, "explainer_per_class")
    out = Path(out)
    folder = out / "data"
    _, test_manifest, explainer_manifest = generate_study_data(
        spec, folder, per_class, test_per_class, explainer_per_class, seed, progress=progress, log=log
    )
    classifier = out / "classifier.pt"
    if classifier.is_file():
        log(f"using {classifier}")
    else:
        train_builtin_model(
            spec, folder, classifier, epochs=epochs, seed=seed, device=device, progress=progress, log=log
        )
    for kind in explainers:
        path = out / f"classifier.{kind}.pt"
        if path.is_file():
            log(f"using {path}")
        else:
            train_explainer_from_manifest(
                kind, classifier, explainer_manifest, path, epochs=explainer_epochs, patience=explainer_epochs,
                seed=seed, device=device, progress=progress, log=log,
            )  # fmt: skip
    model, card = load_classifier(classifier, device=device)
    method_params = with_explainers(params or {}, model, {kind: out / f"classifier.{kind}.pt" for kind in explainers})
    items = [item for item in read_manifest(test_manifest) if item.get("mask")][:max_images]
    maps_csv, tta_csv = explain_with_tta(
        model, card, items, out, [*methods, *explainers], method_params, progress=progress
    )
    rows, summary = localization_table(maps_csv)
    if tta_csv is not None:  # the similarity-adversarial explainer with test-time averaging, and its flip rate
        tta_rows, tta_summary = localization_table(tta_csv)
        for row in (*tta_rows, *tta_summary):
            row["method"] = f"{row['method']} (tta)"
        rows += tta_rows
        summary += tta_summary
        flip = flip_rate(
            model, card, method_params["similarity_adversarial"]["explainer"], read_manifest(test_manifest)
        )
        for row in summary:
            row["flip_rate"] = flip["rate"] if row["method"].startswith("similarity_adversarial") else None
        log(f"similarity-adversarial flip rate on the {flip['n']} test images: {flip['rate']:.3f}")
    write_csv(rows, out / "per_image.csv")
    write_table(summary, out, "explainers")
    log(f"wrote {out / 'explainers.md'}")
    return summary
