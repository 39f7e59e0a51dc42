"""``trainable_vs_posthoc``: do trainable class maps (WILDCAT) find the pathology better than post-hoc maps?

The WILDCAT study (Durand et al. 2017: a classifier's own class maps against post-hoc maps, on
pneumonia opacities in chest X-rays) on a built-in model (``experiments.builtin_models``, the
``dataset`` setting: ``chest-xray``, simulated opacities with exact masks on a real radiograph, or
``ct-lesions``, lung lesions in 3D CT crops). Rank 0 generates the training and test images
(``image_size`` px per side; None: the generator's own) and trains, for each of ``backbones`` (with
its ``arch_kwargs``), the classifier twice from the image labels alone (``input_size`` px, None:
the built-in model's; ``epochs``, up to ``attempts`` seeds): with the backbone's own head ("plain")
and with a WILDCAT head (``wildcat``: its options, ``models.wildcat``). Every test image is then
explained for the pathology class (class :data:`PATHOLOGY_CLASS`), in blocks of :data:`BLOCK_SIZE`
images dealt to the ranks: the plain model by each post-hoc method of ``methods`` (parameters
``method_params``), the WILDCAT model by its class map as it is (``wildcat``) and against the other
class (``wildcat (contrast)``); the mean training mask (``baseline_mean_mask``) is the map that
knows where the pathology tends to lie but not where this image's is.

Rows (``results/localization.csv``): one per test image x method x backbone: ``head`` (the model
explained: plain, wildcat, none for the baseline), ``label`` (1: pathology), ``probability`` (that
model's probability of the pathology; the plain model's for the baseline), ``auprc`` (AUC_loc: area
under the pixel precision-recall curve of the map against the pathology mask, in [0, 1]) and
``pointwise_hit`` (the map's maximum lies in the mask), both empty for an image without pathology
and scored on the images' own grid; ``results/localization_summary.csv``: their mean and 95% CI per
backbone x method over the pathology images (``n``). ``results/detection.csv``: per backbone x
method the pointwise detection AP (Oquab et al. 2015, WILDCAT: all test images ranked by
``probability``, a hit on a pathology image is a true positive) and the test ROC AUC of the model
explained; ``results/classification.csv``: each model's test and validation scores. Figures: the
first ``figure_cases`` pathology images' maps by every method and backbone, and AUPRC and pointwise
AP per method and backbone.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.evaluation.inputs import mean_training_mask
from monai_sal_app.experiments.builtin_models import (
    DefaultModel,
    builtin_model_for,
    generate_model_data,
    train_builtin_model,
)
from monai_sal_app.experiments.report import pyplot, save_figure, save_overlay_grid
from monai_sal_app.experiments.study import Recipe, Run, Section, check_integer, check_names
from monai_sal_app.experiments.workflows import explain_items, map_seconds
from monai_sal_app.metrics.localization import auprc, pointwise_average_precision, pointwise_hit
from monai_sal_app.metrics.stats import summarize
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.models.factory import ARCHITECTURES, check_arch_kwargs, head_options
from monai_sal_app.models.sources import in_memory
from monai_sal_app.saliency import get_method

PATHOLOGY_CLASS = 1  # the class whose evidence the masks outline (opacity, lesion)
# How a WILDCAT model is explained: (folder of its maps, explain_items' params, suffix of the rows' method)
WILDCAT_MAPS = (
    ("wildcat", {}, ""),
    ("wildcat_contrast", {"wildcat": {"contrast": True}}, " (contrast)"),
)
BLOCK_SIZE = 8  # test images per block of work: fixed, so results do not depend on the number of ranks
BASELINE = "baseline_mean_mask"
HEADS = ("plain", "wildcat")
CLASSIFICATION = ("test_auc", "test_balanced_accuracy", "val_auc", "best_epoch", "n_test")

SETTINGS = {
    "dataset": "chest-xray",  # the built-in model whose data to generate: chest-xray (2D) or ct-lesions (3D)
    "backbones": ["conv5fc3", "resnet18"],  # models.factory.ARCHITECTURES, each trained plain and with WILDCAT
    "arch_kwargs": {"resnet18": {"block_inplanes": [32, 64, 128, 256]}},  # backbone -> its network's options
    "methods": [  # post-hoc methods run on each plain model
        "gradcam",
        "guided_gradcam",
        "gradient",
        "gradient_x_input",
        "guided_backprop",
        "integrated_gradients",
        "smoothgrad",
        "occlusion",
    ],
    "method_params": {  # method -> its parameters (others: the method's defaults)
        "integrated_gradients": {"steps": 20},
        "smoothgrad": {"n_samples": 10},
        "occlusion": {"window": 16, "stride": 8},
    },
    "wildcat": {},  # WILDCAT head options kmax, kmin, alpha, maps (not given: models.wildcat.WILDCAT_DEFAULTS)
    "per_class": 100,  # training images per class (a fifth of them held out for validation)
    "test_per_class": 25,  # test images per class (the pathology class's have a mask)
    "image_size": 64,  # side of the generated images and masks (None: the generator's); maps are scored on them
    "input_size": 64,  # the networks' input side (None: the built-in model's)
    "epochs": 20,
    "attempts": 1,  # trainings per model, the next seed while validation AUC < builtin_models.MIN_VAL_AUC
    "figure_cases": 2,  # pathology test images shown in the maps figure
}


def score_map(saliency: np.ndarray, mask: np.ndarray | None) -> dict:
    """Localization of one map: ``auprc`` (``metrics.localization.auprc``, in [0, 1]; None without a
    mask or with an empty one) and ``pointwise_hit`` (the map's maximum in the mask; False without
    one). ``saliency``: (H, W) or (D, H, W), any unit; ``mask``: boolean, the same grid, or None."""
    return {
        "auprc": auprc(saliency, mask) if mask is not None and mask.any() else None,
        "pointwise_hit": bool(pointwise_hit(saliency, mask)) if mask is not None else False,
    }


def image_scores(maps_csv: str | os.PathLike) -> list[dict]:
    """One row per map of a ``maps.csv`` (``workflows.explain_items``' output), in the file's order:
    ``id``, ``method``, ``label``, ``probability`` (the classifier's probability of
    :data:`PATHOLOGY_CLASS`), the :func:`score_map` of the map against its mask and
    ``seconds_per_map`` (wall time, seconds). ValueError when a map explains another class
    (``target`` column)."""
    with open(maps_csv, newline="") as handle:
        entries = list(csv.DictReader(handle))
    if not entries:
        raise ValueError(f"{maps_csv}: no maps listed")
    seconds = map_seconds(maps_csv)
    rows = []
    for entry in entries:
        if int(entry["target"]) != PATHOLOGY_CLASS:
            raise ValueError(f"{maps_csv}: {entry['id']} explains class {entry['target']}, not {PATHOLOGY_CLASS}")
        saliency, _ = read_image(entry["map"], allow_constant=True)
        rows.append(
            {
                "id": entry["id"],
                "method": entry["method"],
                "label": int(entry["label"]),
                "probability": float(entry["probability"]),
                **score_map(saliency, _read_mask(entry)),
                "seconds_per_map": seconds[entry["id"], entry["method"]],
            }
        )
    return rows


def pointwise_ap(rows: Sequence[dict]) -> float:
    """Pointwise detection AP (``metrics.localization.pointwise_average_precision``, in [0, 1]) of
    one method's rows of :func:`image_scores`: the images ranked by ``probability``, the positives
    those labelled :data:`PATHOLOGY_CLASS`. ValueError when no image is."""
    return pointwise_average_precision(
        [row["probability"] for row in rows],
        [row["pointwise_hit"] for row in rows],
        [int(row["label"] == PATHOLOGY_CLASS) for row in rows],
    )


def _posthoc(method: str) -> None:
    """ValueError unless ``method`` is a registered method that explains any classifier as it is."""

    spec = get_method(method)
    if spec.explainer or spec.requires:
        raise ValueError(f"{method} is not a post-hoc method of any classifier (it needs a trained explainer or head)")


def _validate(settings: dict) -> None:

    builtin_model_for(settings["dataset"])
    for backbone in check_names(settings, "backbones"):
        if backbone not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(ARCHITECTURES)}")
    check_arch_kwargs(settings["arch_kwargs"], settings["backbones"], "backbones")
    for method in check_names(settings, "methods"):
        _posthoc(method)
    params = settings["method_params"]
    if not isinstance(params, dict):
        raise ValueError(f"method_params must map methods to their parameters, got {params!r}")
    for method, values in params.items():
        _posthoc(method)
        known = get_method(method).defaults
        if not isinstance(values, dict) or set(values) - set(known):
            raise ValueError(f"method_params.{method} must map parameters of {', '.join(known)}; got {values!r}")
        if "seed" in values:
            raise ValueError(f"method_params.{method}: seed is set per block from the run's seed")
    if not isinstance(settings["wildcat"], dict):
        raise ValueError(f"wildcat must map WILDCAT head options to values, got {settings['wildcat']!r}")
    head_options({"name": "wildcat", **settings["wildcat"]})
    check_integer(settings, "per_class", 2)  # training holds out a validation image of each class
    for key in ("test_per_class", "epochs", "attempts", "figure_cases"):
        check_integer(settings, key)
    for key in ("image_size", "input_size"):
        if settings[key] is not None:
            check_integer(settings, key, 16)  # conv5-fc3 pools its input four times
    if settings["figure_cases"] > settings["test_per_class"]:
        raise ValueError(
            f"figure_cases ({settings['figure_cases']}) must not exceed test_per_class ({settings['test_per_class']})"
        )


def explanations(settings: dict, seed: int = 0) -> list[tuple[str, str, tuple[str, ...], dict, str]]:
    """The maps of one backbone: (head, folder, methods, their parameters, suffix of the rows'
    method) for the post-hoc methods on the plain model, ``seed`` given to those that draw random
    numbers, then each of ``wildcat.WILDCAT_MAPS``."""

    params = {}
    for method in settings["methods"]:
        params[method] = dict(settings["method_params"].get(method, {}))
        if "seed" in get_method(method).defaults:
            params[method]["seed"] = seed
    maps = [("plain", "plain", tuple(settings["methods"]), params, "")]
    return maps + [("wildcat", folder, ("wildcat",), values, suffix) for folder, values, suffix in WILDCAT_MAPS]


def _builtin(run: Run) -> DefaultModel:
    return builtin_model_for(run.settings["dataset"])


def _generate(run: Run) -> dict:

    s = run.settings
    train, test = generate_model_data(
        _builtin(run), run.work / "data", s["per_class"], s["test_per_class"], run.seed, size=s["image_size"],
        progress=run.progress, log=run.log,
    )  # fmt: skip
    return {"train": str(train), "test": str(test)}


def _train(run: Run, backbone: str, head: str) -> dict:

    s = run.settings
    checkpoint = run.work / "models" / f"{backbone}_{head}.pt"
    _, card = train_builtin_model(
        _builtin(run), run.work / "data", checkpoint, arch=backbone, arch_kwargs=s["arch_kwargs"].get(backbone),
        head={"name": "wildcat", **s["wildcat"]} if head == "wildcat" else None, epochs=s["epochs"],
        input_size=s["input_size"], attempts=s["attempts"], seed=run.seed, device=str(run.device),
        progress=run.progress, log=run.log,
    )  # fmt: skip
    return {"checkpoint": str(checkpoint), **card.metrics}


def _maps_folder(run: Run, backbone: str, folder: str, block: int) -> Path:
    return run.work / "maps" / backbone / folder / f"block{block:05d}"


def _read_mask(item: dict) -> np.ndarray | None:
    """The boolean mask of a manifest's or a ``maps.csv``'s row, or None when it has none."""
    return read_image(item["mask"], allow_constant=True)[0] > 0.5 if item.get("mask") else None


def _score_block(run: Run, models: dict, baseline: np.ndarray, indices: list[int], items: list[dict]) -> list[dict]:
    """The rows of one block of test images: every backbone's maps (``work/maps/<backbone>/<folder>/
    block<b>``, random draws seeded with the run's seed + b) and the baseline, scored, with
    ``seconds_per_map``."""

    block = indices[0] // BLOCK_SIZE
    rows = []
    for backbone in run.settings["backbones"]:
        mine = []
        for head, folder, methods, params, suffix in explanations(run.settings, run.seed + block):
            model, card = models[backbone, head]
            maps_csv = explain_items(
                in_memory(model, card), items, _maps_folder(run, backbone, folder, block), methods=methods,
                params=params, target=PATHOLOGY_CLASS, overlays=0, progress=False,
            )  # fmt: skip
            mine += [
                {"backbone": backbone, "head": head, **row, "method": row["method"] + suffix}
                for row in image_scores(maps_csv)
            ]
        probability = {row["id"]: row["probability"] for row in mine if row["head"] == "plain"}
        mine += [
            {
                "backbone": backbone,
                "head": "none",
                "id": item["id"],
                "method": BASELINE,
                "label": int(item["label"]),
                "probability": probability[item["id"]],
                **score_map(baseline, _read_mask(item)),
                "seconds_per_map": None,
            }
            for item in items
        ]
        rows += mine
    return rows


def _ordered(rows: list[dict], backbones: list[str]) -> list[dict]:
    """``rows`` by backbone, then method (in order of first appearance), then test image."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    return sorted(rows, key=lambda row: (backbones.index(row["backbone"]), methods.index(row["method"])))


def _detection(rows: list[dict], trained: dict) -> list[dict]:
    """Per backbone x method: the test AUC of the model explained (the plain one for the baseline),
    the number of images and of pathology images, the pointwise detection AP."""

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["backbone"], row["head"], row["method"]), []).append(row)
    return [
        {
            "backbone": backbone,
            "head": head,
            "method": method,
            "test_auc": trained[backbone, "plain" if head == "none" else head]["test_auc"],
            "n_images": len(group),
            "n_pathology": sum(row["label"] == PATHOLOGY_CLASS for row in group),
            "pointwise_ap": pointwise_ap(group),
        }
        for (backbone, head, method), group in groups.items()
    ]


def _maps_figure(run: Run, test_items: list[dict], baseline: np.ndarray) -> Path:
    """The first ``figure_cases`` pathology test images, each backbone's maps by every method over them."""

    s = run.settings
    shown = [(index, item) for index, item in enumerate(test_items) if item.get("mask")][: s["figure_cases"]]
    cases = []
    for backbone in s["backbones"]:
        maps: dict[str, dict[str, np.ndarray]] = {item["id"]: {} for _, item in shown}
        for _, folder, _, _, suffix in explanations(s):
            for block in sorted({index // BLOCK_SIZE for index, _ in shown}):
                with open(_maps_folder(run, backbone, folder, block) / "maps.csv", newline="") as handle:
                    entries = [entry for entry in csv.DictReader(handle) if entry["id"] in maps]
                for entry in entries:
                    maps[entry["id"]][entry["method"] + suffix] = read_image(entry["map"], allow_constant=True)[0]
        for _, item in shown:
            cases.append(
                {
                    "id": f"{backbone}\n{item['id'][:8]}",
                    "image": read_image(item["image"])[0],
                    "mask": _read_mask(item),
                    "maps": {**maps[item["id"]], BASELINE: baseline},
                }
            )
    pathology = _builtin(run).labels[PATHOLOGY_CLASS]
    title = f"Maps of the {pathology} class (post-hoc on the plain model, WILDCAT's own, the baseline); cyan: the mask"
    return save_overlay_grid(cases, list(cases[0]["maps"]), run.figure("maps"), title)


def _bars_figure(run: Run, summary: list[dict], detection: list[dict]) -> Path:
    """AUPRC (mean, 95% CI) and pointwise AP per method, one bar per backbone."""

    backbones = run.settings["backbones"]
    methods = list(dict.fromkeys(row["method"] for row in summary))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 0.22 * len(methods) * len(backbones) + 1.4), sharey=True)
    height = 0.8 / len(backbones)
    for k, backbone in enumerate(backbones):
        scores = {row["method"]: row for row in summary if row["backbone"] == backbone}
        ap = {row["method"]: row["pointwise_ap"] for row in detection if row["backbone"] == backbone}
        y = np.arange(len(methods)) + (k - (len(backbones) - 1) / 2) * height
        mean = np.array([scores[m]["auprc_mean"] for m in methods])
        low = np.array([scores[m]["auprc_ci_low"] for m in methods])
        high = np.array([scores[m]["auprc_ci_high"] for m in methods])
        error = np.nan_to_num(np.stack([mean - low, high - mean]))  # no interval from a single image
        axes[0].barh(y, mean, height, xerr=error, capsize=2, label=backbone, error_kw={"lw": 0.8})
        axes[1].barh(y, [ap[m] for m in methods], height, label=backbone)
    axes[0].set_yticks(range(len(methods)), methods, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"AUPRC against the {_builtin(run).labels[PATHOLOGY_CLASS]} mask (mean, 95% CI)")
    axes[1].set_xlabel("pointwise detection AP")
    axes[1].legend(fontsize=7, frameon=False)
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, run.figure("localization_by_method"))


def run_trainable_vs_posthoc(run: Run) -> None:

    s = run.settings
    spec = _builtin(run)
    normal, pathology = spec.labels[0], spec.labels[PATHOLOGY_CLASS]
    manifests = run.step("data", lambda: _generate(run))
    for name, manifest in manifests.items():
        run.record_data(name, manifest)
    trained = {
        (backbone, head): run.step(f"model_{backbone}_{head}", lambda b=backbone, h=head: _train(run, b, h))
        for backbone in s["backbones"]
        for head in HEADS
    }
    models = {key: load_classifier(result["checkpoint"], device=str(run.device)) for key, result in trained.items()}
    baseline = mean_training_mask(read_manifest(manifests["train"]))
    test_items = read_manifest(manifests["test"])
    rows = run.map_blocks(
        "maps",
        test_items,
        lambda indices, block: _score_block(run, models, baseline, indices, block),
        BLOCK_SIZE,
    )
    rows = _ordered(rows, s["backbones"])
    scores = [
        {
            **{key: value for key, value in row.items() if key != "seconds_per_map"},
            "pointwise_hit": row["pointwise_hit"] if row["auprc"] is not None else None,
        }
        for row in rows
    ]
    run.table("localization", scores)
    # Summarised over the pathology images only (the others have no mask to score), so n counts them.
    masked = [row for row in scores if row["auprc"] is not None]
    summary = run.table(
        "localization_summary",
        summarize(masked, group_by=("backbone", "head", "method"), metrics=("auprc", "pointwise_hit")),
    )
    detection = run.table("detection", _detection(rows, trained))
    classification = run.table(
        "classification",
        [
            {
                "backbone": backbone,
                "arch_kwargs": json.dumps(s["arch_kwargs"].get(backbone, {}), sort_keys=True),
                "head": head,
                **{key: result.get(key) for key in CLASSIFICATION},
            }
            for (backbone, head), result in trained.items()
        ],
    )
    figures = [_maps_figure(run, test_items, baseline), _bars_figure(run, summary, detection)] if run.is_main else []

    n_pathology = sum(int(item["label"]) == PATHOLOGY_CLASS for item in test_items)
    image_side = f"{s['image_size']} px" if s["image_size"] else "the generator's size"
    input_side = s["input_size"] or spec.input_size
    run.section(
        Section(
            "Classification",
            f"Does the WILDCAT head classify {pathology} against {normal} as well as each backbone's own head?",
            classification,
            note=f"Each model trained from the image labels alone on {2 * s['per_class']} generated images (a fifth "
            f"held out for validation) at {input_side} px for {s['epochs']} epochs, and scored on "
            f"{len(test_items)} test images: ROC AUC, and balanced accuracy at the validation-chosen threshold. "
            "arch_kwargs: the network's options (block_inplanes: the widths of a ResNet's four stages, "
            "64, 128, 256, 512 by default).",
        )
    )
    run.section(
        Section(
            "Localization",
            f"Which maps outline the {pathology} best, WILDCAT's own class maps or the post-hoc maps of the plain "
            "classifier, and which do better than the mean training mask?",
            summary,
            figures,
            note=f"auprc: area under the pixel precision-recall curve of the map against the {pathology} mask, on "
            f"the {n_pathology} {pathology} test images at {image_side} (chance: the mask's area fraction); "
            f"pointwise_hit: share of them whose map has its maximum inside the mask; n: those {pathology} images. "
            f"wildcat (contrast): the {pathology} class map minus the {normal} one. "
            f"{BASELINE}: the fraction of training masks covering each pixel, the same map for every image.",
        )
    )
    seconds: dict[tuple, list[float]] = {}
    for row in rows:
        if row["seconds_per_map"] is not None:
            seconds.setdefault((row["backbone"], row["method"]), []).append(row["seconds_per_map"])
    timing = {key: float(np.mean(values)) for key, values in seconds.items()}
    run.section(
        Section(
            "Pointwise detection",
            f"Ranked by the classifier's probability of {pathology}, how many test images show {pathology} whose "
            "map peaks inside it (pointwise AP)?",
            [{**row, "seconds_per_map": timing.get((row["backbone"], row["method"]))} for row in detection],
            note="pointwise_ap: average precision over all test images ranked by probability, an image counting as "
            f"a true positive when it shows {pathology} and its map's maximum lies in it (Oquab et al. 2015, as "
            f"WILDCAT reports it); {BASELINE} is ranked by the plain model's probability. test_auc: of the model explained. "
            f"seconds_per_map: wall time of one map on {run.device} (it varies from run to run and is not in the "
            "CSVs).",
        )
    )


RECIPE = Recipe("trainable_vs_posthoc", run_trainable_vs_posthoc, SETTINGS, validate=_validate)
