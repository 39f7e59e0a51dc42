"""WILDCAT against post-hoc maps: one recipe, two heads, the same held-out images and masks.

:func:`compare_wildcat` generates a built-in model's data (``experiments.builtin_models``), trains the
recipe's classifier twice from image labels alone, once with the backbone's own head ("plain") and
once with a WILDCAT head, and scores on the held-out test set:

* each model's test ROC AUC (from its model card);
* localization of the pathology class (class 1) against its masks: the mean AUPRC over the test
  images that have a mask, with its 95% CI, and the pointwise detection average precision over all
  test images ranked by the classifier's probability of class 1 (``metrics.localization``);
* time per map.

The WILDCAT model is explained by its class maps (method ``wildcat``), as they are and against the
other class (``wildcat (contrast)``, the method's ``contrast`` parameter), the plain model by
post-hoc methods (Grad-CAM, guided Grad-CAM and the gradient by default). Everything is written
under ``out``: the data, both checkpoints with their cards, the maps and overlays of each model
(``maps/plain/``, ``maps/wildcat/wildcat/`` and ``maps/wildcat/wildcat_contrast/``, as
``monai-sal explain`` writes them), ``per_image.csv`` and the
table ``comparison.{csv,md}``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.experiments.builtin_models import builtin_model_for, generate_model_data, train_builtin_model
from monai_sal_app.experiments.report import write_table
from monai_sal_app.experiments.workflows import explain_items
from monai_sal_app.metrics.localization import auprc, pointwise_average_precision, pointwise_hit
from monai_sal_app.metrics.stats import mean_ci, write_csv
from monai_sal_app.models.checkpoint import load_classifier, read_card
from monai_sal_app.models.factory import head_options

__all__ = [
    "PATHOLOGY_CLASS",
    "POSTHOC_METHODS",
    "WILDCAT_MAPS",
    "compare_wildcat",
    "image_scores",
    "pointwise_ap",
    "score_map",
    "score_maps",
]

POSTHOC_METHODS = ("gradcam", "guided_gradcam", "gradient")
PATHOLOGY_CLASS = 1  # the class whose evidence the masks outline (opacity, lesion)
# How a WILDCAT model is explained: (folder of its maps, explain_items' params, suffix of the rows' method)
WILDCAT_MAPS = (
    ("wildcat", {}, ""),
    ("wildcat_contrast", {"wildcat": {"contrast": True}}, " (contrast)"),
)


def score_map(saliency: np.ndarray, mask: np.ndarray | None) -> dict:
    """Localization of one map: ``auprc`` (``metrics.localization.auprc``, in [0, 1]; None without a
    mask or with an empty one) and ``pointwise_hit`` (the map's maximum in the mask; False without
    one). ``saliency``: (H, W) or (D, H, W), any unit; ``mask``: boolean, the same grid, or None."""
    return {
        "auprc": auprc(saliency, mask) if mask is not None and mask.any() else None,
        "pointwise_hit": bool(pointwise_hit(saliency, mask)) if mask is not None else False,
    }


def image_scores(maps_csv: str | os.PathLike, positive_class: int = PATHOLOGY_CLASS) -> list[dict]:
    """One row per map of a ``maps.csv`` (``explain_items``' output), in the file's order: ``id``,
    ``method``, ``label``, ``probability`` (the classifier's probability of ``positive_class``), the
    :func:`score_map` of the map against its mask and ``seconds_per_map`` (wall time, seconds).
    ValueError when a map explains another class than ``positive_class`` (``target`` column)."""
    with open(maps_csv, newline="") as handle:
        entries = list(csv.DictReader(handle))
    if not entries:
        raise ValueError(f"{maps_csv}: no maps listed")
    rows = []
    for entry in entries:
        if int(entry["target"]) != positive_class:
            raise ValueError(f"{maps_csv}: {entry['id']} explains class {entry['target']}, not {positive_class}")
        saliency, _ = read_image(entry["map"], allow_constant=True)
        mask = read_image(entry["mask"], allow_constant=True)[0] > 0.5 if entry["mask"] else None
        rows.append(
            {
                "id": entry["id"],
                "method": entry["method"],
                "label": int(entry["label"]),
                "probability": float(entry["probability"]),
                **score_map(saliency, mask),
                "seconds_per_map": float(entry["seconds_per_image"]),
            }
        )
    return rows


def pointwise_ap(rows: Sequence[dict], positive_class: int = PATHOLOGY_CLASS) -> float:
    """Pointwise detection AP (``metrics.localization.pointwise_average_precision``, in [0, 1]) of
    one method's rows of :func:`image_scores`: the images ranked by ``probability``, the positives
    those labelled ``positive_class``. ValueError when no image is."""
    return pointwise_average_precision(
        [row["probability"] for row in rows],
        [row["pointwise_hit"] for row in rows],
        [int(row["label"] == positive_class) for row in rows],
    )


def score_maps(maps_csv: str | os.PathLike, positive_class: int = PATHOLOGY_CLASS) -> tuple[list[dict], list[dict]]:
    """Localization of ``positive_class`` by every method of a ``maps.csv`` (``explain_items``' output).

    The maps must explain ``positive_class`` on every image (``target`` column), and ``probability``
    must be the classifier's probability of it. Returns (per-image rows, one summary row per method):
    per image the rows of :func:`image_scores`, grouped by method; per method ``n_images``,
    ``n_masks``, ``auprc_mean`` with ``auprc_ci_low``/``auprc_ci_high``, ``pointwise_hit_rate`` (over
    the masked images), ``pointwise_ap`` (:func:`pointwise_ap` over all images) and ``seconds_per_map``.
    """
    scored = image_scores(maps_csv, positive_class)
    per_image, summary = [], []
    for method in dict.fromkeys(row["method"] for row in scored):
        rows = [row for row in scored if row["method"] == method]
        masked = [r for r in rows if r["auprc"] is not None]
        mean, low, high = mean_ci([r["auprc"] for r in masked])
        summary.append(
            {
                "method": method,
                "n_images": len(rows),
                "n_masks": len(masked),
                "auprc_mean": mean,
                "auprc_ci_low": low,
                "auprc_ci_high": high,
                "pointwise_hit_rate": float(np.mean([r["pointwise_hit"] for r in masked])) if masked else None,
                "pointwise_ap": pointwise_ap(rows, positive_class),
                "seconds_per_map": float(np.mean([r["seconds_per_map"] for r in rows])),
            }
        )
        per_image += rows
    return per_image, summary


def compare_wildcat(
    out: str | os.PathLike,
    *,
    data: str = "chest-xray",
    head: dict | None = None,
    methods: Sequence[str] = POSTHOC_METHODS,
    epochs: int | None = None,
    input_size: int | None = None,
    per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> list[dict]:
    """Train a plain and a WILDCAT classifier with ``data``'s built-in model and compare their maps.

    ``data``: ``chest-xray`` (2D) or ``ct-lesions`` (3D); ``head``: the WILDCAT options (``kmax``,
    ``kmin``, ``alpha``, ``maps``; defaults ``models.wildcat.WILDCAT_DEFAULTS``); ``methods``: the
    post-hoc methods run on the plain model; ``epochs``, ``input_size`` (the network's input side),
    ``per_class``, ``test_per_class``: override the recipe's. A checkpoint already in ``out`` is used as it is (delete it to train again).
    Returns the table's rows (one per model and method; see the module docstring), also written to
    ``out/comparison.csv`` and ``out/comparison.md``.
    """
    spec = builtin_model_for(data)
    out = Path(out)
    head = {"name": "wildcat", **(head or {})}
    folder = out / "data"
    _, test_manifest = generate_model_data(spec, folder, per_class, test_per_class, seed, progress=progress, log=log)
    # model -> (head, [(folder under maps/<model>/, methods, their parameters, suffix of the rows' method)])
    runs = {
        "plain": (None, [("", tuple(methods), {}, "")]),
        "wildcat": (
            head,
            [(folder, ("wildcat",), params, suffix) for folder, params, suffix in WILDCAT_MAPS],
        ),
    }
    table, per_image = [], []
    for name, (model_head, model_runs) in runs.items():
        checkpoint = out / f"{name}.pt"
        wanted = head_options(model_head) if model_head else None
        side = input_size or spec.input_size
        if (
            checkpoint.is_file()
            and read_card(checkpoint).head == wanted
            and read_card(checkpoint).input_size[0] == side
        ):
            log(f"using {checkpoint}")
        else:
            train_builtin_model(
                spec,
                folder,
                checkpoint,
                head=model_head,
                epochs=epochs,
                input_size=side,
                seed=seed,
                device=device,
                progress=progress,
                log=log,
            )
        model, card = load_classifier(checkpoint, device=device)
        for subfolder, model_methods, params, suffix in model_runs:
            maps_csv = explain_items(
                model,
                card,
                read_manifest(test_manifest),
                out / "maps" / name / subfolder,
                methods=model_methods,
                params=params,
                target=PATHOLOGY_CLASS,
                progress=progress,
            )
            rows, summary = score_maps(maps_csv)
            per_image += [{"model": name, **row, "method": row["method"] + suffix} for row in rows]
            test_auc = card.metrics.get("test_auc")
            table += [{"model": name, "test_auc": test_auc, **row, "method": row["method"] + suffix} for row in summary]
    write_csv(per_image, out / "per_image.csv")
    write_table(table, out, "comparison")
    log(f"wrote {out / 'comparison.md'}")
    return table
