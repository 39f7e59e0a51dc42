"""``explainers``: do trained explainers find the opacities better than post-hoc maps, and how fast?

The similarity-adversarial explainer study (Charachon et al. 2020, docs/METHODS.md) on the built-in
chest X-ray recipe (``experiments.builtin_models``: simulated opacities with exact masks on a real
radiograph). Rank 0 generates the classifier's training and test images and the explainers'
training images (``explainer_per_class`` more per class; ``None``: the classifier's own), trains the
recipe's conv5-fc3 classifier at ``input_size`` pixels and each trained explainer among ``methods``
for it (``experiments.explainer_training``). Every test image with a mask is then explained for the
opacity class by every method, one image at a time, and the similarity-adversarial explainer again
with test-time averaging over flips and rotations (``experiments.explainers.explain_with_tta``), in
blocks of :data:`BLOCK_SIZE` images dealt to the ranks (meaningful perturbation's random shifts drawn
from the seed + the block's index, so a rerun gives the same maps).

Rows (``results/explainers.csv``): one per test image x method x ``tta``: ``auprc`` (AUC_loc total,
in [0, 1]), ``partial_auprc`` (AUC_loc up to recall 0.5, in [0, 0.5]) and ``iou_p<p>`` for each of
``percentiles`` (IoU of the map's top 100 - p % with the mask), on the images' own grid (256 px).
``results/timing.csv``: the same rows' ``seconds_per_map`` (wall time of one map), apart because
timings differ between runs and the metric CSVs do not. The similarity-adversarial explainer's flip
rate (share of all test images whose x_adv the classifier assigns to another class) is in the
report's table of models. Figures: the first :data:`FIGURE_CASES` test images' maps by every
method, and the IoU against the percentile per method.
"""

from __future__ import annotations

import csv
from pathlib import Path

from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.experiments.builtin_models import builtin_model_for, train_builtin_model
from monai_sal_app.experiments.explainer_training import train_explainer_from_manifest
from monai_sal_app.experiments.explainers import (
    explain_with_tta,
    flip_rate,
    generate_study_data,
    localization_rows,
    with_explainers,
)
from monai_sal_app.experiments.report import pyplot, save_figure, save_overlay_grid
from monai_sal_app.experiments.study import Recipe, Run, Section, check_integer
from monai_sal_app.metrics.localization import DEFAULT_PERCENTILES
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.saliency import get_method

DATA = "chest-xray"  # the built-in model (experiments.builtin_models.builtin_model_for)
BLOCK_SIZE = 4  # test images per block of work: fixed, so results do not depend on the number of ranks
FIGURE_CASES = 3  # test images shown in the overlay figure

SETTINGS = {
    "per_class": 150,  # classifier training images per class (None: the recipe's 300)
    "test_per_class": 20,  # test images per class; the opacity class's (those with a mask) are explained
    "explainer_per_class": None,  # explainer training images per class (None: the classifier's training images)
    "input_size": 64,  # the classifier's and explainers' input side in pixels
    "epochs": 60,  # classifier epochs
    "explainer_epochs": 20,
    "methods": ["gradient", "gradcam", "meaningful_perturbation", "mask_generator", "similarity_adversarial"],
    "mp_steps": 100,  # meaningful perturbation's Adam steps (the paper's 300)
    "percentiles": list(DEFAULT_PERCENTILES),  # IoU of each map's top 100 - p % with the mask
}


def _validate(settings: dict) -> None:

    for key in ("test_per_class", "epochs", "explainer_epochs", "mp_steps"):
        check_integer(settings, key)
    for key in ("per_class", "explainer_per_class"):  # training holds out a validation share of each class
        if settings[key] is not None:
            check_integer(settings, key, 2)
    check_integer(settings, "input_size", 16)
    if settings["input_size"] % 16:
        raise ValueError(
            f"input_size must be a multiple of 16 (the explainers' encoders), got {settings['input_size']}"
        )
    methods = settings["methods"]
    if not isinstance(methods, list) or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be a non-empty list of distinct saliency methods, got {methods!r}")
    for method in methods:
        get_method(method)
    percentiles = settings["percentiles"]
    valid = isinstance(percentiles, list) and len(set(percentiles)) == len(percentiles) > 0
    if not valid or any(
        isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100 for p in percentiles
    ):
        raise ValueError(f"percentiles must be a non-empty list of distinct numbers in [0, 100], got {percentiles!r}")


def trained_kinds(methods: list[str]) -> list[str]:
    """The methods that need a trained explainer (``mask_generator``, ``similarity_adversarial``)."""

    return [method for method in methods if get_method(method).explainer]


def label(method: str, tta: bool) -> str:
    """A method's name in the figures: ``similarity adversarial + TTA``."""
    return method.replace("_", " ") + (" + TTA" if tta else "")


def _generate(run: Run) -> dict:

    s = run.settings
    manifests = generate_study_data(
        builtin_model_for(DATA), run.work / "data", s["per_class"], s["test_per_class"], s["explainer_per_class"],
        run.seed, progress=run.progress, log=run.log,
    )  # fmt: skip
    return dict(zip(("train", "test", "explainer"), map(str, manifests)))


def _train_classifier(run: Run) -> dict:

    s = run.settings
    checkpoint = run.work / "classifier.pt"
    _, card = train_builtin_model(
        builtin_model_for(DATA), run.work / "data", checkpoint, epochs=s["epochs"], input_size=s["input_size"],
        seed=run.seed, device=str(run.device), progress=run.progress, log=run.log,
    )  # fmt: skip
    return {"checkpoint": str(checkpoint), **card.metrics}


def _train_explainer(run: Run, kind: str, classifier: str, manifest: str) -> dict:

    epochs = run.settings["explainer_epochs"]
    checkpoint = run.work / f"classifier.{kind}.pt"
    _, card = train_explainer_from_manifest(
        kind, classifier, manifest, checkpoint, epochs=epochs, patience=epochs, seed=run.seed,
        device=str(run.device), progress=run.progress, log=run.log,
    )  # fmt: skip
    return {
        "checkpoint": str(checkpoint),
        "history_figure": str(checkpoint.with_suffix(".history.png")),
        **card.metrics,
    }


def _block_folder(run: Run, block: int) -> Path:
    return run.work / "explained" / f"block{block:05d}"


def _explain_block(run: Run, model, card, params: dict, indices: list[int], items: list[dict]) -> list[dict]:
    """The rows of one block of test images: every method's maps (``work/explained/block<b>``), scored.
    Meaningful perturbation's random shifts are drawn from the run's seed + the block's index."""

    block = indices[0] // BLOCK_SIZE
    params = {**params, "meaningful_perturbation": {"steps": run.settings["mp_steps"], "seed": run.seed + block}}
    maps_csv, tta_csv = explain_with_tta(
        model, card, items, _block_folder(run, block), run.settings["methods"], params, overlays=0, progress=False
    )
    rows = []
    for tta, path in ((False, maps_csv), (True, tta_csv)):
        if path is not None:
            rows += [
                {"id": row["id"], "method": row["method"], "tta": tta, **row}
                for row in localization_rows(path, run.settings["percentiles"])
            ]
    return rows


def _overlay_figure(run: Run, items: list[dict]) -> Path:
    """The first :data:`FIGURE_CASES` test images, each with every method's map over it (mask outlined)."""

    shown = items[:FIGURE_CASES]
    maps: dict[str, dict[str, object]] = {item["id"]: {} for item in shown}
    for block in sorted({index // BLOCK_SIZE for index in range(len(shown))}):
        for tta, folder in ((False, "maps"), (True, "maps_tta")):
            path = _block_folder(run, block) / folder / "maps.csv"
            if not path.is_file():
                continue
            with open(path, newline="") as handle:
                for entry in csv.DictReader(handle):
                    if entry["id"] in maps:
                        saliency, _ = read_image(entry["map"], allow_constant=True)
                        maps[entry["id"]][label(entry["method"], tta)] = saliency
    cases = [
        {
            "id": item["id"][:8],
            "image": read_image(item["image"])[0],
            "mask": read_image(item["mask"], allow_constant=True)[0] > 0.5,
            "maps": maps[item["id"]],
        }
        for item in shown
    ]
    title = "Maps for the opacity class; cyan: the opacity mask"
    return save_overlay_grid(cases, list(cases[0]["maps"]), run.figure("maps"), title)


def _iou_figure(run: Run, summary: list[dict]) -> Path:
    """IoU with the mask against the percentile p that thresholds the map, per method (mean, 95% CI)."""

    percentiles = sorted(run.settings["percentiles"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for row in summary:
        keys = [f"iou_p{p:g}" for p in percentiles]
        line = ax.plot(percentiles, [row[f"{k}_mean"] for k in keys], marker="o", ms=3, lw=1.2)[0]
        low, high = [row[f"{k}_ci_low"] for k in keys], [row[f"{k}_ci_high"] for k in keys]
        ax.fill_between(percentiles, low, high, color=line.get_color(), alpha=0.12, lw=0)
        line.set_label(label(row["method"], row["tta"]))
    ax.set_xlabel("percentile p (the map's top 100 - p % of pixels)")
    ax.set_ylabel("IoU with the opacity mask")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return save_figure(fig, run.figure("iou_by_percentile"))


def run_explainers(run: Run) -> None:

    s = run.settings
    manifests = run.step("data", lambda: _generate(run))
    for name in ("train", "test", "explainer"):
        if name != "explainer" or manifests["explainer"] != manifests["train"]:
            run.record_data(name, manifests[name])
    classifier = run.step("classifier", lambda: _train_classifier(run))
    explainers = {
        kind: run.step(
            f"explainer_{kind}",
            lambda kind=kind: _train_explainer(run, kind, classifier["checkpoint"], manifests["explainer"]),
        )
        for kind in trained_kinds(s["methods"])
    }
    model, card = load_classifier(classifier["checkpoint"], device=str(run.device))
    params = with_explainers({}, model, {kind: result["checkpoint"] for kind, result in explainers.items()})
    if "similarity_adversarial" in explainers:
        generator = params["similarity_adversarial"]["explainer"]
        flip = run.step("flip_rate", lambda: flip_rate(model, card, generator, read_manifest(manifests["test"])))
        explainers["similarity_adversarial"]["test_flip_rate"] = flip["rate"]
        run.log(f"similarity-adversarial flip rate on the {flip['n']} test images: {flip['rate']:.3f}")

    items = [item for item in read_manifest(manifests["test"]) if item.get("mask")]
    rows = run.map_blocks(
        "maps", items, lambda indices, block: _explain_block(run, model, card, params, indices, block), BLOCK_SIZE
    )
    scores = [{key: value for key, value in row.items() if key != "seconds_per_map"} for row in rows]
    metrics = ["auprc", "partial_auprc", *(f"iou_p{p:g}" for p in s["percentiles"])]
    summary = run.table("explainers", scores, group_by=("method", "tta"), metrics=metrics)
    timing = [{key: row[key] for key in ("id", "method", "tta", "seconds_per_map")} for row in rows]
    seconds = run.table("timing", timing, group_by=("method", "tta"), metrics=["seconds_per_map"])
    figures = [_overlay_figure(run, items), _iou_figure(run, summary)] if run.is_main else []

    run.section(
        Section(
            "Localization and time per map",
            "Which method's map of the opacity class finds the simulated opacities best (AUC_loc total and "
            "partial, IoU of the map's top pixels with the mask), and how long does one map take?",
            [
                {**row, **{k: v for k, v in time.items() if k.startswith("seconds")}}
                for row, time in zip(summary, seconds)
            ],
            figures,
            note=f"{len(items)} test images with an opacity mask, explained one at a time at {s['input_size']} px and "
            "scored on their own grid. auprc: AUC_loc, the area under the pixel precision-recall curve of "
            "the map against the mask (chance: the mask's area fraction); partial_auprc: the same area up to recall "
            "0.5 (at most 0.5); iou_pXX: IoU of the pixels above the map's XXth percentile with the mask. tta: the "
            "similarity-adversarial map averaged over the 8 flips and rotations of the image. seconds_per_map: wall "
            f"time of one map on {run.device} (results/timing.csv; it varies from run to run).",
        )
    )
    models = [{"model": "classifier", **{k: classifier.get(k) for k in ("val_auc", "test_auc", "n_test")}}]
    for kind, result in explainers.items():
        keep = ("val_loss", "val_flip_rate", "test_flip_rate")
        models.append({"model": kind, **{k: result[k] for k in keep if k in result}})
    run.section(
        Section(
            "Models",
            "Did the classifier learn the task, and does the similarity-adversarial explainer's x_adv change the "
            "classifier's decision (flip rate)?",
            models,
            [Path(result["history_figure"]) for result in explainers.values()],
            note="val_auc, test_auc: the classifier's ROC AUC on its validation and test images. val_loss: the "
            "explainer's validation loss at its best epoch; val_flip_rate: the share of its validation images whose "
            "x_adv the classifier assigns to another class; test_flip_rate: the same on every test image (docs/"
            "STUDIES.md gives it with the study's amount of data). The figures are the explainers' training curves.",
        )
    )


RECIPE = Recipe("explainers", run_explainers, SETTINGS, validate=_validate)
