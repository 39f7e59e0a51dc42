"""``trust``: do the saliency maps pass the sanity checks of the trustworthiness study?

The checks of Arun et al. 2021 (QTIM-Lab, "Assessing the Trustworthiness of Saliency Maps for
Localizing Abnormalities in Medical Imaging"; docs/METHODS.md#model-randomization,
#repeatability, #label-randomization) on the built-in chest X-ray model (``experiments.builtin_models``:
simulated opacities with exact masks on a real radiograph). Rank 0 generates the training and test
images, writes the training manifest again with its labels permuted
(``evaluation.repeatability.permuted_labels``) and trains, one step each, at ``input_size`` pixels
for ``epochs`` epochs with the built-in model's other training settings (:func:`trained_models`):

- ``reference``: the first of ``architectures``, seed ``seed``;
- ``replicate_1`` ...: ``replicates - 1`` more of it with seeds ``seed + 1`` ... (repeatability);
- one model of each other architecture, seed ``seed``, with its ``arch_kwargs`` (reproducibility);
- ``label_randomized``: the reference's architecture and seed on the permuted labels.

Each model is trained once, with no second try when its validation AUC is low (the
label-randomized model is not meant to learn); the report's first table shows what each reached.

The first ``images`` test images with an opacity mask are explained for the class the reference
model predicts (at its card's decision threshold), the same class for every model and every
randomized state. Each method is one block of work, dealt to the ranks: cascading and independent
``evaluation.randomization.model_randomization`` of the reference model, then
``evaluation.repeatability.map_agreement`` of the reference model's maps with the label-randomized
model's, the replicates' and the other architectures'. As in the study, two maps are compared as
|map| clipped at its 99th percentile (:data:`POSTPROCESS`). The re-initialised weights are drawn
from the run's seed, the same for every method, so that every method is checked on the same
randomized models; a method that takes a seed (SmoothGrad's noise) gets ``seed`` + its block's
index unless ``params`` gives one.

Each check is read twice (``results/verdicts.csv``):

- **as the study reads it** (``study_reading``): ``metric`` (SSIM by default) averaged over the
  conditions and images against the band of the reference model's maps of ``pairs`` random pairs
  of different test images (mean and Student-t 95% CI): "above the band" or "not above";
- **as monai-sal's trust card judges it** (``answer``, docs/METHODS.md#how-the-trust-card-judges):
  the retention share, with its bootstrap CI, over the states with at least half the blocks random
  (cascading; every state when independent), for label randomization over the images, and for
  repeatability and reproducibility only when the two models classify alike (ROC AUCs within 0.05,
  Cohen's kappa at least 0.6), on the images both classify alike; "yes" / "no" / "unclear", and
  for the retrained models "yes" / "partly" / "no" / "not assessable".

Rows (``results/similarity.csv``): one per method x check x condition x test image, the value
in a column named after ``metric``; ``condition`` is the randomized block (in cascading mode with
every block above it random too) or the other model. ``results/models.csv``: the trained models.
Figures: each method's retention share per randomized state (cascading, independent), the first
:data:`FIGURE_CASES` test images' maps by every method at a few cascading states, and the
retrained models' similarity per method against the random-pair band.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.patches import Patch

from monai_sal_app.data.manifest import read_manifest, write_manifest
from monai_sal_app.evaluation.inputs import mask_on_grid
from monai_sal_app.evaluation.randomization import model_randomization, randomization_blocks, randomized_models
from monai_sal_app.evaluation.repeatability import map_agreement, permuted_labels
from monai_sal_app.evaluation.trust import SCHEMA_VERSION
from monai_sal_app.experiments.builtin_models import builtin_model_for, generate_model_data, train_builtin_model
from monai_sal_app.experiments.report import pyplot, save_figure, save_overlay_grid
from monai_sal_app.experiments.study import Recipe, Run, Section, check_integer, check_names
from monai_sal_app.experiments.trust_report import randomization_figure
from monai_sal_app.metrics.similarity import SIMILARITY_METRICS, random_pair_baseline
from monai_sal_app.metrics.stats import mean_ci
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.models.factory import ARCHITECTURES, check_arch_kwargs
from monai_sal_app.models.inputs import load_inputs
from monai_sal_app.models.train import predict_probabilities
from monai_sal_app.saliency import explain, get_method
from monai_sal_app.saliency.postprocess import postprocess

DATA = "chest-xray"  # the built-in model (experiments.builtin_models.builtin_model_for)
POSTPROCESS = ("abs", "clip")  # |map| clipped at its 99th percentile, as the study compares maps
BLOCK_SIZE = 1  # methods per block of work: fixed, so that results do not depend on the number of ranks
FIGURE_CASES = 2  # test images whose maps are drawn at the cascading states
FIGURE_STATES = 4  # cascading states drawn beside the trained model's map
RANDOMIZATION = ("cascading", "independent")
RETRAINED = ("label_randomization", "repeatability", "reproducibility")
QUESTION = {
    "cascading": "depends on what the model learned",
    "independent": "depends on what the model learned",
    "label_randomization": "depends on the labels",
    "repeatability": "comes back from another training run",
    "reproducibility": "comes back from another architecture",
}
STUDY_EXPECTS = {  # what the study takes for a good method: the maps ... the random-pair band
    "cascading": "not above",
    "independent": "not above",
    "label_randomization": "not above",
    "repeatability": "above",
    "reproducibility": "above",
}
COLOURS = {"yes": "#2da44e", "no": "#cf222e"}  # any other answer: grey

SETTINGS = {
    "per_class": 80,  # training images per class (a validation share of each class is held out)
    "test_per_class": 16,  # test images per class; the opacity class's have a mask
    "images": 16,  # test images with a mask that are explained (the first ones of the test set)
    "input_size": 64,  # every model's input side in pixels
    "epochs": 20,  # training epochs of every model
    "architectures": ["conv5fc3", "resnet18"],  # the first is the reference; the others: reproducibility
    "arch_kwargs": {},  # architecture -> network options, e.g. {resnet18: {block_inplanes: [8, 16, 32, 64]}}
    "replicates": 2,  # models of the reference architecture, seeds seed, seed + 1, ... (repeatability)
    "methods": ["gradient", "smoothgrad", "integrated_gradients", "guided_backprop", "gradcam", "guided_gradcam"],
    "params": {},  # method -> explain parameters, e.g. {integrated_gradients: {steps: 16}}
    "metric": "ssim",  # map similarity (metrics.similarity.SIMILARITY_METRICS)
    "pairs": 50,  # random pairs of different images in the baseline
}


def _validate(settings: dict) -> None:

    for key, minimum in (("per_class", 2), ("test_per_class", 1), ("images", 2), ("input_size", 16)):
        check_integer(settings, key, minimum)
    for key in ("epochs", "replicates"):
        check_integer(settings, key, 1)
    check_integer(settings, "pairs", 2)
    if settings["images"] > settings["test_per_class"]:
        raise ValueError(
            f"images ({settings['images']}) must be at most test_per_class ({settings['test_per_class']}), "
            "the test images with an opacity mask"
        )
    for arch in check_names(settings, "architectures"):
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    check_arch_kwargs(settings["arch_kwargs"], settings["architectures"])
    for method in check_names(settings, "methods"):
        if get_method(method).explainer:
            raise ValueError(f"method {method!r} needs a trained explainer, which this study does not train")
    params = settings["params"]
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"params must map a method to its explain parameters, got {params!r}")
    for method, values in params.items():
        if method not in settings["methods"]:
            raise ValueError(f"params names method {method!r}, which is not in methods")
        unknown = sorted(set(values) - set(get_method(method).defaults))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for method {method!r}")
    if settings["metric"] not in SIMILARITY_METRICS:
        raise ValueError(f"unknown metric {settings['metric']!r}; choose from {', '.join(SIMILARITY_METRICS)}")


def trained_models(settings: dict, seed: int) -> list[dict]:
    """The models the study trains, the reference first: ``{"model", "architecture", "seed",
    "labels" ("true" or "permuted"), "check"}``, where ``check`` names the comparison the model is
    in (None for the reference)."""
    reference = settings["architectures"][0]
    models = [{"model": "reference", "architecture": reference, "seed": seed, "labels": "true", "check": None}]
    models += [
        {
            "model": f"replicate_{r}",
            "architecture": reference,
            "seed": seed + r,
            "labels": "true",
            "check": "repeatability",
        }
        for r in range(1, settings["replicates"])
    ]
    models += [
        {"model": arch, "architecture": arch, "seed": seed, "labels": "true", "check": "reproducibility"}
        for arch in settings["architectures"][1:]
    ]
    models.append(
        {
            "model": "label_randomized",
            "architecture": reference,
            "seed": seed,
            "labels": "permuted",
            "check": "label_randomization",
        }
    )
    return models


def _generate(run: Run) -> dict:
    """The training and test manifests, and the training manifest with its labels permuted."""

    s = run.settings
    train, test = generate_model_data(
        builtin_model_for(DATA), run.work / "data", s["per_class"], s["test_per_class"], run.seed,
        progress=run.progress, log=run.log,
    )  # fmt: skip
    items = read_manifest(train)
    labels = permuted_labels([item["label"] for item in items], run.seed).tolist()
    permuted = write_manifest(
        train.with_name("manifest_permuted_labels.csv"),
        [{**item, "label": label} for item, label in zip(items, labels)],
    )
    return {"train": str(train), "test": str(test), "train_permuted_labels": str(permuted)}


def _train(run: Run, model: dict, manifests: dict) -> dict:
    """Train one of :func:`trained_models`; its checkpoint and its card's metrics."""

    s = run.settings
    checkpoint = run.work / "models" / f"{model['model']}.pt"
    train = manifests["train_permuted_labels" if model["labels"] == "permuted" else "train"]
    _, card = train_builtin_model(
        builtin_model_for(DATA), run.work / "data", checkpoint, arch=model["architecture"],
        arch_kwargs=s["arch_kwargs"].get(model["architecture"]), epochs=s["epochs"], input_size=s["input_size"],
        train_manifest=train, attempts=1, seed=model["seed"], device=str(run.device), progress=run.progress,
        log=run.log,
    )  # fmt: skip
    return {"checkpoint": str(checkpoint), **card.metrics}


def _method_params(run: Run, method: str, block: int) -> dict:

    seeded = {"seed": run.seed + block} if "seed" in get_method(method).defaults else {}
    return {**seeded, **run.settings["params"].get(method, {})}


def _shown_states(count: int) -> list[int]:
    """Indices of the :data:`FIGURE_STATES` cascading states drawn, spread from the first to the last."""
    return sorted({int(i) for i in np.linspace(0, count - 1, min(FIGURE_STATES, count)).round()})


def _state_maps_file(run: Run, method: str) -> Path:
    return run.work / "state_maps" / f"{method}.npz"


def _save_state_maps(run: Run, reference, images, targets, method: str, params: dict, trained) -> None:
    """The first :data:`FIGURE_CASES` images' maps (raw) of the trained reference model and of a
    few cascading states, the same re-initialised weights as ``model_randomization``'s, in
    ``work/state_maps/<method>.npz`` (``maps`` (states, cases, *spatial), ``states`` names)."""

    shown = _shown_states(len(randomization_blocks(reference)))
    maps, names = [trained[:FIGURE_CASES, 0]], ["trained"]
    for index, (name, network) in enumerate(randomized_models(reference, mode="cascading", seed=run.seed)):
        if index in shown:
            maps.append(explain(network, images[:FIGURE_CASES], method, target=targets[:FIGURE_CASES], **params)[:, 0])
            names.append(f"to {name}")
        if index == shown[-1]:
            break
    path = _state_maps_file(run, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, maps=np.stack([m.cpu().numpy() for m in maps]), states=np.array(names))


def _check_method(run: Run, models: dict, aucs: dict, images, targets, method: str, block: int) -> dict:
    """Every check of ``method`` (in block ``block``) on ``images`` (N, 1, *input_size) for
    ``targets`` (N,), with the models' test ROC AUCs ``aucs``: ``{"method", "results": {check:
    the result's to_dict()}, "baseline": the study's random-pair band of the reference maps}``; a
    comparison without models (one replicate, one architecture) is left out."""

    s = run.settings
    params = _method_params(run, method, block)
    compare = {"metrics": [s["metric"]], "n_pairs": s["pairs"], "seed": run.seed, "postprocess_steps": POSTPROCESS}
    reference = models["reference"]
    trained = explain(reference, images, method, target=targets, **params)
    results = {
        mode: model_randomization(
            reference, images, method, targets, params, mode=mode, original_maps=trained, **compare
        ).to_dict()
        for mode in RANDOMIZATION
    }
    specs = trained_models(s, run.seed)
    for check in RETRAINED:
        others = {m["model"]: models[m["model"]] for m in specs if m["check"] == check}
        if others:
            expect = "different" if check == "label_randomization" else "similar"
            results[check] = map_agreement(
                {"reference": reference, **others}, images, method, targets, params, expect=expect, aucs=aucs,
                **compare,
            ).to_dict()  # fmt: skip
    _save_state_maps(run, reference, images, targets, method, params, trained)
    processed = postprocess(trained.cpu().double(), POSTPROCESS)
    band = random_pair_baseline(processed, s["metric"], n_pairs=s["pairs"], seed=run.seed)
    baseline = {key: float(band[key]) for key in ("mean", "ci_low", "ci_high")}
    return {"method": method, "results": results, "baseline": baseline}


def similarity_rows(method: str, check: str, result: dict, ids: list[str], metric: str) -> list[dict]:
    """One row per condition x image of one check's result (``to_dict()``): the randomized states of
    a randomization check, the other models of a comparison."""
    conditions = result["states"] if check in RANDOMIZATION else result["others"]
    return [
        {"method": method, "check": check, "condition": condition, "image": image, metric: value}
        for condition, values in zip(conditions, result["similarity"][metric])
        for image, value in zip(ids, values)
    ]


def verdict_row(method: str, check: str, result: dict, baseline: dict, metric: str) -> dict:
    """A check read as the study reads it (``metric``'s mean over conditions and images against the
    random-pair band ``baseline``) and as the trust card judges it (the retention share's answer)."""
    value = float(np.mean(result["similarity"][metric]))
    above = value > baseline["ci_high"]
    retention = result["retention"]
    return {
        "method": method,
        "check": check,
        metric: value,
        "band_mean": baseline["mean"],
        "band_ci_low": baseline["ci_low"],
        "band_ci_high": baseline["ci_high"],
        "study_reading": "above the band" if above else "not above",
        "study_expects": STUDY_EXPECTS[check],
        "retention_mean": retention["mean"],
        "retention_ci_low": retention["ci_low"],
        "retention_ci_high": retention["ci_high"],
        "question": QUESTION[check],
        "answer": result["verdict"],
        "why": result["reason"],
    }


def _state_maps_figures(run: Run, images, masks) -> list[Path]:
    """Per case, every method's maps (rows) of the trained model and at the cascading states
    (columns) over the image, |map| clipped at its 99th percentile, the opacity outlined."""

    saved = {method: np.load(_state_maps_file(run, method)) for method in run.settings["methods"]}
    states = [str(name) for name in next(iter(saved.values()))["states"]]
    figures = []
    for case in range(min(FIGURE_CASES, len(images))):
        rows = [
            {
                "id": method,
                "image": images[case, 0].numpy(),
                "mask": masks[case],
                "maps": dict(zip(states, maps["maps"][:, case])),
            }
            for method, maps in saved.items()
        ]
        title = (
            f"Test image {case + 1}: maps of the trained model and with every block from the logits down to the "
            "one named re-initialised; cyan: the opacity"
        )
        figures.append(save_overlay_grid(rows, states, run.figure(f"cascading_maps_{case + 1}"), title))
    return figures


def _retrained_figure(run: Run, verdicts: list[dict], rows: list[dict]) -> Path:
    """Per comparison with retrained models, each method's mean similarity to the reference model's
    maps (95% CI over images and models) over its random-pair band, coloured by the trust card's
    answer (green yes, red no, grey otherwise)."""
    metric, methods = run.settings["metric"], run.settings["methods"]
    checks = [check for check in RETRAINED if any(v["check"] == check for v in verdicts)]
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(checks), figsize=(0.5 * len(methods) * len(checks) + 2.4, 3.8), squeeze=False, sharey=True
    )
    for ax, check in zip(axes[0], checks):
        for x, method in enumerate(methods):
            verdict = next(v for v in verdicts if v["method"] == method and v["check"] == check)
            mean, low, high = mean_ci([r[metric] for r in rows if r["method"] == method and r["check"] == check])
            ax.fill_between(
                [x - 0.42, x + 0.42], verdict["band_ci_low"], verdict["band_ci_high"], color="grey",
                alpha=0.35, lw=0,
            )  # fmt: skip
            colour = COLOURS.get(verdict["answer"], "#8c959f")
            ax.bar(x, mean, width=0.5, color=colour, yerr=[[mean - low], [high - mean]])
        ax.set_xticks(range(len(methods)), [m.replace("_", " ") for m in methods], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{check.replace('_', ' ')}\n({QUESTION[check]}?)", fontsize=8)
    axes[0, 0].set_ylabel(f"{metric} with the reference model's map")
    handles = [Patch(color="grey", alpha=0.35, label="random pairs (95% CI)")]
    handles += [Patch(color=colour, label=answer) for answer, colour in COLOURS.items()]
    handles.append(Patch(color="#8c959f", label="other answers"))
    axes[0, 0].legend(handles=handles, fontsize=6, loc="best")
    return save_figure(fig, run.figure("retrained_models"))


def _load_test(manifests: dict, card, count: int):
    """The first ``count`` test images with a mask: ids, images (count, 1, *input_size) and masks
    on the input grid."""

    items = [item for item in read_manifest(manifests["test"]) if item.get("mask")][:count]
    images, _ = load_inputs(items, card.input_size, progress=False)
    return [item["id"] for item in items], images, [mask_on_grid(item, card.input_size) for item in items]


def run_trust(run: Run) -> None:
    s = run.settings
    manifests = run.step("data", lambda: _generate(run))
    for name, manifest in manifests.items():
        run.record_data(name, manifest)
    specs = trained_models(s, run.seed)
    trained = {m["model"]: run.step(f"train_{m['model']}", lambda m=m: _train(run, m, manifests)) for m in specs}
    loaded = {name: load_classifier(result["checkpoint"], device=str(run.device)) for name, result in trained.items()}
    models = {name: model for name, (model, _) in loaded.items()}
    card = loaded["reference"][1]
    ids, images, masks = _load_test(manifests, card, s["images"])
    aucs = {name: result["test_auc"] for name, result in trained.items() if result.get("test_auc") is not None}
    targets = torch.from_numpy(card.predict(predict_probabilities(models["reference"], images)))

    checked = run.map_blocks(
        f"checks_schema{SCHEMA_VERSION}",
        s["methods"],
        lambda indices, block: [
            _check_method(run, models, aucs, images, targets, method, index // BLOCK_SIZE)
            for index, method in zip(indices, block)
        ],
        BLOCK_SIZE,
    )
    metric = s["metric"]
    rows = [
        row
        for entry in checked
        for check, result in entry["results"].items()
        for row in similarity_rows(entry["method"], check, result, ids, metric)
    ]
    run.table("similarity", rows, group_by=("method", "check", "condition"), metrics=[metric])
    verdicts = [
        verdict_row(entry["method"], check, result, entry["baseline"], metric)
        for entry in checked
        for check, result in entry["results"].items()
    ]
    run.table("verdicts", verdicts)
    keep = ("val_auc", "test_auc", "test_balanced_accuracy", "best_epoch")
    model_rows = [
        {**{k: v for k, v in m.items() if k != "check"}, **{k: trained[m["model"]].get(k) for k in keep}} for m in specs
    ]
    run.table("models", model_rows)

    randomization_figures, retrained_figures = [], []
    if run.is_main:
        randomization_figures = [
            randomization_figure(
                {entry["method"]: entry["results"][mode] for entry in checked}, run.figure(f"randomization_{mode}")
            )
            for mode in RANDOMIZATION
        ] + _state_maps_figures(run, images, masks)
        retrained_figures = [_retrained_figure(run, verdicts, rows)]

    run.section(
        Section(
            "Models",
            "Did the compared models learn to find the opacities, and did the label-randomized one learn nothing?",
            model_rows,
            note="reference: the model whose maps every check starts from; replicate_k: the same architecture trained "
            "with seed + k (repeatability); an architecture's name: that architecture (reproducibility); "
            "label_randomized: the reference's architecture and seed trained on the permuted labels. val_auc, "
            "test_auc: ROC AUC on the held-out validation images and on the test images.",
        )
    )
    run.section(
        Section(
            "Model randomization",
            "Does each method's map depend on what the reference model learned: does it change when the model's "
            "weights are re-initialised, from the logits down (cascading) or one block at a time (independent)?",
            [v for v in verdicts if v["check"] in RANDOMIZATION],
            randomization_figures,
            verdict="answer",
            note=f"{len(ids)} test images with an opacity, explained for the reference model's predicted class; maps "
            f"compared as |map| clipped at its 99th percentile. As the study reads it: {metric}, its mean over the "
            f"randomized states and images, against the band of {s['pairs']} random pairs of different images' maps "
            "(the study: guided backprop and guided Grad-CAM stay above it, the gradient and Grad-CAM fall into it). "
            "As the trust card judges it (answer): the retention share, the part of each image's own map that the "
            "randomized model's map keeps, over the states with at least half the blocks random (cascading) or "
            "every state (independent), with its bootstrap 95% CI; the figures show it per state. Per image and "
            "state: results/similarity.csv.",
        )
    )
    run.section(
        Section(
            "Retrained models",
            "Does each method's map follow the labels (a model trained on permuted labels draws another picture), "
            "and does it come back when the model is trained again with another seed (repeatability) or as another "
            "architecture (reproducibility)?",
            [v for v in verdicts if v["check"] in RETRAINED],
            retrained_figures,
            verdict="answer",
            note=f"As the study reads it: {metric}, its mean over the images and the other models, against the band "
            "as above. As the trust card judges it: the retention share; repeatability and reproducibility only "
            "for models that classify alike (ROC AUCs within 0.05, Cohen's kappa at least 0.6), on the images both "
            "classify alike, else 'not assessable' with the reason (the why column).",
        )
    )


RECIPE = Recipe("trust", run_trust, SETTINGS, validate=_validate)
