"""Trained explainers against post-hoc methods on one classifier: localization and time per map.

:func:`compare_explainers` generates a built-in recipe's data (``experiments.recipes``), trains the
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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from monai_sal_app.data.dataset_writer import require_positive_int
from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.experiments.explainer_training import train_explainer_from_manifest
from monai_sal_app.experiments.recipes import (
    generate_explainer_data,
    generate_recipe_data,
    recipe_for,
    train_recipe,
)
from monai_sal_app.experiments.report import write_table
from monai_sal_app.experiments.workflows import explain_items
from monai_sal_app.explainers import load_explainer
from monai_sal_app.metrics.localization import DEFAULT_PERCENTILES, localization_metrics, partial_auprc
from monai_sal_app.metrics.stats import mean_ci, write_csv
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.saliency.core import model_device

__all__ = ["POSTHOC_BASELINES", "compare_explainers", "localization_table"]

POSTHOC_BASELINES = ("gradient", "gradcam", "meaningful_perturbation")
PATHOLOGY_CLASS = 1


def localization_table(maps_csv: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(per-image rows, one summary row per method) of a ``maps.csv`` whose images all have a mask:
    ``auprc`` (AUC_loc), ``partial_auprc`` (recall <= 0.5) and ``iou_p80`` ... ``iou_p98`` per image;
    per method their means with the AUPRC's 95% CI, ``n`` and ``seconds_per_map``."""
    with open(maps_csv, newline="") as handle:
        entries = [entry for entry in csv.DictReader(handle) if entry["mask"]]
    if not entries:
        raise ValueError(f"{maps_csv}: no map with a mask")
    rows = []
    for entry in entries:
        saliency, _ = read_image(entry["map"], allow_constant=True)
        mask = read_image(entry["mask"], allow_constant=True)[0] > 0.5
        metrics = localization_metrics(saliency, mask)
        rows.append(
            {
                "id": entry["id"],
                "method": entry["method"],
                "auprc": metrics["auprc"],
                "partial_auprc": partial_auprc(saliency, mask, 0.5),
                **{f"iou_p{p:g}": metrics[f"iou_p{p:g}"] for p in DEFAULT_PERCENTILES},
                "seconds_per_map": float(entry["seconds_per_image"]),
            }
        )
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

    from monai_sal_app.experiments.workflows import load_inputs

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
    spec = recipe_for(data)
    if explainer_per_class is not None:
        require_positive_int(explainer_per_class, "explainer_per_class")
    out = Path(out)
    folder = out / "data"
    train_manifest, test_manifest = generate_recipe_data(
        spec, folder, per_class, test_per_class, seed, progress=progress, log=log
    )
    explainer_manifest = train_manifest
    if explainer_per_class is not None:
        explainer_manifest = generate_explainer_data(
            spec, folder, explainer_per_class, seed, progress=progress, log=log
        )
    classifier = out / "classifier.pt"
    if classifier.is_file():
        log(f"using {classifier}")
    else:
        train_recipe(spec, folder, classifier, epochs=epochs, seed=seed, device=device, progress=progress, log=log)
    method_params = {name: dict(values) for name, values in (params or {}).items()}
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
    for kind in explainers:  # loaded once: each map is then one forward pass of the explainer
        method_params.setdefault(kind, {})["explainer"] = load_explainer(
            out / f"classifier.{kind}.pt", model_device(model)
        )[0]
    items = [item for item in read_manifest(test_manifest) if item.get("mask")][:max_images]
    maps_csv = explain_items(
        model,
        card,
        items,
        out / "maps",
        methods=[*methods, *explainers],
        params=method_params,
        target=PATHOLOGY_CLASS,
        batch_size=1,  # time per map is per image, as an interactive user sees it
        progress=progress,
    )
    rows, summary = localization_table(maps_csv)
    if "similarity_adversarial" in explainers:  # again with test-time averaging, and its flip rate
        tta_params = {"similarity_adversarial": {**method_params["similarity_adversarial"], "tta": True}}
        tta_csv = explain_items(
            model, card, items, out / "maps_tta", methods=["similarity_adversarial"], params=tta_params,
            target=PATHOLOGY_CLASS, batch_size=1, progress=progress,
        )  # fmt: skip
        tta_rows, tta_summary = localization_table(tta_csv)
        for row in (*tta_rows, *tta_summary):
            row["method"] = "similarity_adversarial (tta)"
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
