"""``explainers``: do trained explainers find the pathology better than post-hoc maps, and how fast?

The similarity-adversarial explainer study (Charachon et al. 2020, docs/METHODS.md) on a built-in
model (``experiments.builtin_models``, the ``dataset`` setting: ``chest-xray``, simulated opacities
with exact masks on a real radiograph, or ``ct-lesions``, lung lesions in 3D CT crops). Rank 0
generates the classifier's training and test images and the explainers' training images
(``explainer_per_class`` more per class; ``None``: the classifier's own), trains the built-in
model's conv5-fc3 classifier at ``input_size`` pixels (None: the built-in model's) and each trained
explainer among ``methods`` for it (``experiments.explainer_training``). Every test image with a
mask is then explained for the pathology class by every method, one image at a time, and the
similarity-adversarial explainer again with test-time averaging over flips and rotations
(:func:`explain_with_tta`), in blocks of :data:`BLOCK_SIZE` images dealt to the ranks (meaningful
perturbation's random shifts drawn from the seed + the block's index, so a rerun gives the same
maps).

Rows (``results/explainers.csv``): one per test image x method x ``tta``: ``auprc`` (AUC_loc total,
in [0, 1]), ``partial_auprc`` (AUC_loc up to recall 0.5, in [0, 0.5]) and ``iou_p<p>`` for each of
``percentiles`` (IoU of the map's top 100 - p % with the mask), on the images' own grid.
``results/timing.csv``: the same rows' ``seconds_per_map`` (wall time of one map), apart because
timings differ between runs and the metric CSVs do not. The similarity-adversarial explainer's flip
rate (share of all test images whose x_adv the classifier assigns to another class) is in the
report's table of models. Figures: the first :data:`FIGURE_CASES` test images' maps by every
method, and the IoU against the percentile per method.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

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
from monai_sal_app.experiments.report import pyplot, save_figure, save_overlay_grid
from monai_sal_app.experiments.study import Recipe, Run, Section, check_integer
from monai_sal_app.experiments.workflows import explain_items, map_seconds
from monai_sal_app.explainers import load_explainer
from monai_sal_app.metrics.localization import DEFAULT_PERCENTILES, localization_metrics, partial_auprc
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.models.inputs import load_inputs
from monai_sal_app.models.sources import in_memory
from monai_sal_app.saliency import get_method
from monai_sal_app.saliency.core import model_device

PATHOLOGY_CLASS = 1  # the class whose evidence the masks outline (opacity, lesion)
TTA_METHODS = ("similarity_adversarial",)  # the methods that take tta=True (test-time averaging)
BLOCK_SIZE = 4  # test images per block of work: fixed, so results do not depend on the number of ranks
FIGURE_CASES = 3  # test images shown in the overlay figure

SETTINGS = {
    "dataset": "chest-xray",  # the built-in model whose data to generate: chest-xray (2D) or ct-lesions (3D)
    "per_class": 150,  # classifier training images per class (None: the built-in model's)
    "test_per_class": 20,  # test images per class; the pathology class's (those with a mask) are explained
    "explainer_per_class": None,  # explainer training images per class (None: the classifier's training images)
    "input_size": 64,  # the classifier's and explainers' input side in pixels (None: the built-in model's)
    "epochs": 60,  # classifier epochs
    "explainer_epochs": 20,
    "methods": ["gradient", "gradcam", "meaningful_perturbation", "mask_generator", "similarity_adversarial"],
    "mp_steps": 100,  # meaningful perturbation's Adam steps (the paper's 300)
    "percentiles": list(DEFAULT_PERCENTILES),  # IoU of each map's top 100 - p % with the mask
}


def _validate(settings: dict) -> None:

    spec = builtin_model_for(settings["dataset"])
    for key in ("test_per_class", "epochs", "explainer_epochs", "mp_steps"):
        check_integer(settings, key)
    for key in ("per_class", "explainer_per_class"):  # training holds out a validation share of each class
        if settings[key] is not None:
            check_integer(settings, key, 2)
    side = spec.input_size if settings["input_size"] is None else check_integer(settings, "input_size", 16)
    if side % 16:
        raise ValueError(f"input_size must be a multiple of 16 (the explainers' encoders), got {side}")
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


def _builtin(run: Run) -> DefaultModel:
    return builtin_model_for(run.settings["dataset"])


def localization_rows(maps_csv: str | os.PathLike, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[dict]:
    """One row per map of a ``maps.csv`` (``workflows.explain_items``) whose image has a mask, in the
    file's order: ``id``, ``method``, ``auprc`` (AUC_loc, in [0, 1]), ``partial_auprc`` (the AUPRC up
    to recall 0.5, in [0, 0.5]), ``iou_p<p>`` (IoU of the map's top ``100 - p`` % with the mask) for
    each of ``percentiles``, and ``seconds_per_map`` (wall time of one map, in seconds)."""
    with open(maps_csv, newline="") as handle:
        entries = [entry for entry in csv.DictReader(handle) if entry["mask"]]
    if not entries:
        raise ValueError(f"{maps_csv}: no map with a mask")
    seconds = map_seconds(maps_csv)
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
                "seconds_per_map": seconds[entry["id"], entry["method"]],
            }
        )
    return rows


def flip_rate(model, card, generator, items: list[dict]) -> dict:
    """How often the classifier's prediction for x_adv differs from its prediction for the image, over
    ``items`` (preprocessed as the classifier sees them): ``{"rate", "n"}``."""
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
    """The manifests (train, test, explainer) under ``folder``: the built-in model's training and
    test data (``builtin_models.generate_model_data``; ``None``: its sizes) and, with
    ``explainer_per_class``, that many more generated images per class to train the explainers on
    (``builtin_models.generate_explainer_data``); without it the explainers train on the training
    images."""
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
    model, card, items: list[dict], out: str | os.PathLike, methods: Sequence[str], params: dict
) -> tuple[Path, Path | None]:
    """Explain ``items`` for the pathology class with every method into ``out/maps``, then with the
    methods of :data:`TTA_METHODS` among them again with test-time averaging (``tta``) into
    ``out/maps_tta``. One image at a time, so that each map's time (``timings.csv``) is that of
    one image, as an interactive user sees it. ``params``: method -> its parameters (a trained
    explainer's module under ``explainer``, see :func:`with_explainers`). Returns the two
    ``maps.csv`` (the second None when no method averages)."""
    out = Path(out)
    source = in_memory(model, card)
    maps_csv = explain_items(
        source, items, out / "maps", methods=methods, params=params, target=PATHOLOGY_CLASS, batch_size=1,
        overlays=0, progress=False,
    )  # fmt: skip
    averaged = [method for method in methods if method in TTA_METHODS]
    if not averaged:
        return maps_csv, None
    tta_params = {method: {**params.get(method, {}), "tta": True} for method in averaged}
    tta_csv = explain_items(
        source, items, out / "maps_tta", methods=averaged, params=tta_params, target=PATHOLOGY_CLASS,
        batch_size=1, overlays=0, progress=False,
    )  # fmt: skip
    return maps_csv, tta_csv


def _generate(run: Run) -> dict:

    s = run.settings
    manifests = generate_study_data(
        _builtin(run), run.work / "data", s["per_class"], s["test_per_class"], s["explainer_per_class"],
        run.seed, progress=run.progress, log=run.log,
    )  # fmt: skip
    return dict(zip(("train", "test", "explainer"), map(str, manifests)))


def _train_classifier(run: Run) -> dict:

    s = run.settings
    checkpoint = run.work / "classifier.pt"
    _, card = train_builtin_model(
        _builtin(run), run.work / "data", checkpoint, epochs=s["epochs"], input_size=s["input_size"],
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
    maps_csv, tta_csv = explain_with_tta(model, card, items, _block_folder(run, block), run.settings["methods"], params)
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
    pathology = _builtin(run).labels[PATHOLOGY_CLASS]
    title = f"Maps for the {pathology} class; cyan: the {pathology} mask"
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
    ax.set_ylabel(f"IoU with the {_builtin(run).labels[PATHOLOGY_CLASS]} mask")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return save_figure(fig, run.figure("iou_by_percentile"))


def run_explainers(run: Run) -> None:

    s = run.settings
    spec = _builtin(run)
    pathology = spec.labels[PATHOLOGY_CLASS]
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
            f"Which method's map of the {pathology} class finds it best (AUC_loc total and "
            "partial, IoU of the map's top pixels with the mask), and how long does one map take?",
            [
                {**row, **{k: v for k, v in time.items() if k.startswith("seconds")}}
                for row, time in zip(summary, seconds)
            ],
            figures,
            note=f"{len(items)} test images with a {pathology} mask, explained one at a time at "
            f"{s['input_size'] or spec.input_size} px and "
            "scored on their own grid. auprc: AUC_loc, the area under the pixel precision-recall curve of "
            "the map against the mask (chance: the mask's area fraction); partial_auprc: the same area up to recall "
            "0.5 (at most 0.5); iou_pXX: IoU of the pixels above the map's XXth percentile with the mask. tta: the "
            "similarity-adversarial map averaged over the flips and rotations of the image (8 in 2D, 16 in 3D). "
            "seconds_per_map: wall "
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
