"""``ct_importance``: do fidelity and localization rank the importance estimators of a CT classifier alike?

The CT study (Brocki et al. 2022, arXiv:2209.15398; docs/METHODS.md) on 3D lesion crops: every
method explains the lesion class of every test crop that has a lesion mask, and each map is scored
three ways, model-centric (fidelity) and human-centric (voxel ROC AUC, XRAI-region Dice against the
mask); the methods are then ranked by each score and the rankings compared.

Data and model. Without ``--data``/``--model``, rank 0 generates the built-in ``ct-lesions`` recipe's
crops (``experiments.builtin_models.builtin_model_for("ct-lesions")``: real and synthetic lung lesions and
lesion-free crops on pyradiomics' lung CTs, ``size`` voxels per side at 1.5 mm, ``per_class``
training and ``test_per_class`` test crops per class) and trains its conv5-fc3 at ``input_size``
voxels (``train_builtin_model``: ``epochs``, again with the next seed up to ``attempts`` times while the
validation AUC stays below 0.75). ``--model M.pt`` (a 3D classifier) replaces the training: only the
test crops are generated, and the model's own input size is used. ``--data MANIFEST`` (columns id,
image, label, mask) replaces the test crops and needs ``--model``: a model trained here on the
built-in crops says nothing about another data set. Only crops with a lesion mask are scored
(at most ``max_images``, in manifest order), for their own label as the target class.

Scores, on the model's input grid (masks resized to it, then > 0.5). Each map is ranked by |map|
(``order_by: abs``) or the signed map (``signed``), the same ranking for every score:

- fidelity (``evaluation.fidelity``): ``auc_mif`` and ``auc_lif``, the areas under the curves of
  the ``score`` (default the target's probability, in [0, 1]) as the most and the least important
  voxels first are set to ``baseline``, at fractions 0, ``fraction_step``, ... below 1 of the
  voxels; ``fidelity`` = ``auc_lif - auc_mif`` (score x fraction, in [-1, 1]; higher is better);
- ``roc_auc``: voxel ROC AUC of the ranking key against the mask (0.5 is chance);
- XRAI-region Dice (``metrics.localization.xrai_region_dice``): Dice of the mask and the fewest
  top-ranked regions covering the mask's own volume (``xrai_dice_area``) or ``p`` of the crop
  (``xrai_dice_p<100 p>`` for each of ``region_fractions``). The regions are XRAI's, as in the study:
  XRAI's multi-scale SLIC segments of the crop (``saliency.xrai.xrai_segments``, with ``params.xrai``)
  chosen greedily by each method's ranking key (``saliency.xrai.attribution_regions``, PAIR's base
  attribution); XRAI itself keeps its own regions (its integrated gradients, signed gains).

Work: the crops in blocks of :data:`BLOCK_SIZE` dealt to the ranks, seeded with the run's seed plus
the block index (``smoothgrad``, ``smoothgrad_ig`` and ``meaningful_perturbation`` noise, the
fidelity's tie order). Rows (``results/ct_importance.csv``): one per crop x method; summary: mean and
95% CI per method. ``results/ranks.csv``: each method's mean fidelity, ROC AUC and XRAI-region Dice
with its rank by each (1 = best); ``results/rank_agreement.csv``: Spearman's rho and Kendall's tau
between the rankings. Figures: the first :data:`FIGURE_CASES` crops' maps by every method (cut at
the mask's largest axial slice), the mean MIF/LIF curves, and the method means of fidelity against
localization.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.evaluation.fidelity import BASELINES, ORDERS, SCORES, fidelity
from monai_sal_app.evaluation.inputs import load_trust_inputs
from monai_sal_app.experiments.builtin_models import builtin_model_for, generate_model_data, train_builtin_model
from monai_sal_app.experiments.report import pyplot, save_figure, save_overlay_grid
from monai_sal_app.experiments.study import ExperimentError, Recipe, Run, Section, check_integer
from monai_sal_app.experiments.trust_report import fidelity_figure
from monai_sal_app.metrics.localization import roc_auc, xrai_region_dice
from monai_sal_app.models.sources import LoadedModel, load_model_source
from monai_sal_app.saliency import explain, get_method
from monai_sal_app.saliency.xrai import attribution_regions, xrai_regions, xrai_segments

GENERATOR = "ct-lesions"  # the built-in model (experiments.builtin_models.builtin_model_for)
BLOCK_SIZE = 4  # crops per block of work: fixed, so results do not depend on the number of ranks
FIGURE_CASES = 3  # crops shown in the overlay figure
# Methods that need more than the classifier: a trained explainer or a WILDCAT head.
UNSUPPORTED = ("mask_generator", "similarity_adversarial", "wildcat")
RANKED = ("fidelity", "roc_auc", "xrai_dice_area")  # the scores the methods are ranked by (higher is better)
CURVES = ("mif_curve", "lif_curve")  # per-row fidelity curves, kept for the figure and out of the CSV

SETTINGS = {
    "methods": [
        "gradient",
        "gradient_x_input",
        "guided_backprop",
        "gradcam",
        "guided_gradcam",
        "integrated_gradients",
        "smoothgrad",
        "smoothgrad_ig",
        "xrai",
        "occlusion",
        "meaningful_perturbation",
    ],
    "params": {},  # method -> explain() parameters (not "seed": it is set per block)
    "size": 32,  # generated crops' side in voxels (1.5 mm voxels)
    "input_size": 32,  # the classifier's input side in voxels (--model: the model's own)
    "per_class": 100,  # training crops per class
    "test_per_class": 20,  # test crops per class; those with a lesion mask are scored
    "epochs": 15,
    "attempts": 3,  # trainings (seed, seed + 1, ...) while the validation AUC stays below 0.75
    "max_images": None,  # at most this many crops with a mask are scored (None: all)
    "fraction_step": 0.05,  # fidelity fractions 0, step, 2 step, ... below 1
    "baseline": "zero",  # fidelity baseline: zero, mean or blur
    "score": "probability",  # fidelity score: probability, logit_ratio or accuracy
    "order_by": "abs",  # rank voxels by |map| (abs) or the signed map (signed), for every score
    "region_fractions": [0.01, 0.02, 0.05, 0.1],  # XRAI-region Dice at these fractions of the crop
}


def _validate(settings: dict) -> None:

    methods = settings["methods"]
    if not isinstance(methods, list) or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be a non-empty list of distinct saliency methods, got {methods!r}")
    for method in methods:
        if method in UNSUPPORTED:
            raise ValueError(f"method {method!r} needs a trained explainer or a WILDCAT head; this study has neither")
        get_method(method)
    params = settings["params"]
    if not isinstance(params, dict):
        raise ValueError(f"params must map methods to their parameters, got {params!r}")
    for method, values in params.items():
        defaults = get_method(method).defaults
        if not isinstance(values, dict):
            raise ValueError(f"params.{method} must be a mapping of parameters, got {values!r}")
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise ValueError(f"params.{method}: unknown parameter(s) {unknown}; it takes {sorted(defaults)}")
        if "seed" in values:
            raise ValueError(f"params.{method}: seed is set per block from the run's seed")
    for key in ("test_per_class", "epochs", "attempts"):
        check_integer(settings, key)
    check_integer(settings, "per_class", 2)  # training holds out a validation share of each class
    check_integer(settings, "size", 16)
    check_integer(settings, "input_size", 16)
    if settings["max_images"] is not None:
        check_integer(settings, "max_images")
    step = settings["fraction_step"]
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 0.5:
        raise ValueError(f"fraction_step must be a number in (0, 0.5], got {step!r}")
    for key, choices in (("baseline", BASELINES), ("score", SCORES), ("order_by", ORDERS)):
        if settings[key] not in choices:
            raise ValueError(f"{key} must be one of {', '.join(choices)}, got {settings[key]!r}")
    region_fractions = settings["region_fractions"]
    if not isinstance(region_fractions, list) or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in region_fractions
    ):
        raise ValueError(f"region_fractions must be a list of numbers in (0, 1], got {region_fractions!r}")


def _check_inputs(data: Path | None, models: list[Path]) -> None:
    """ValueError for a combination of ``--data`` and ``--model`` the study cannot use."""

    if len(models) > 1:
        raise ValueError(f"ct_importance explains one model; got {len(models)} --model checkpoints")
    if data is not None and not models:
        raise ValueError(
            "--data needs --model: the classifier trained here on the built-in CT crops would be scored on "
            "another data set; give the checkpoint of a 3D classifier of that data"
        )
    if models:
        card = load_model_source(models[0], device="cpu").card
        if card.spatial_dims != 3:
            raise ValueError(f"{models[0]}: a {card.spatial_dims}D model; ct_importance needs a 3D one")
        if data is None and card.num_classes != 2:
            raise ValueError(
                f"{models[0]}: {card.num_classes} classes ({', '.join(card.labels)}); the built-in CT crops "
                "have two (0 no lesion, 1 lesion)"
            )


def _spec():

    return builtin_model_for(GENERATOR)


def _data(run: Run) -> dict:
    """Manifests ``{"train": path or None, "test": path}``: ``--data``, or the built-in crops."""

    if run.data is not None:
        return {"train": None, "test": str(run.data)}
    s = run.settings
    train, test = generate_model_data(
        _spec(),
        run.work / "data",
        s["per_class"],
        s["test_per_class"],
        run.seed,
        size=s["size"],
        train=not run.models,
        progress=run.progress,
        log=run.log,
    )
    return {"train": None if train is None else str(train), "test": str(test)}


def _model(run: Run) -> dict:
    """The checkpoint explained (``--model``, or the built-in model's classifier trained here) and its card's scores."""

    s = run.settings
    if run.models:
        checkpoint, source = run.models[0], "--model"
        card = load_model_source(checkpoint, device="cpu").card
    else:
        checkpoint, source = run.work / "model.pt", "trained here"
        _, card = train_builtin_model(
            _spec(),
            run.work / "data",
            checkpoint,
            epochs=s["epochs"],
            input_size=s["input_size"],
            attempts=s["attempts"],
            seed=run.seed,
            device=str(run.device),
            progress=run.progress,
            log=run.log,
        )
    metrics = ("val_auc", "test_auc", "test_balanced_accuracy", "n_test")
    return {
        "checkpoint": str(checkpoint),
        "model": Path(checkpoint).name,
        "source": source,
        "input_size": "x".join(str(side) for side in card.input_size),
        **{key: card.metrics.get(key) for key in metrics},
    }


def _cases(manifest: str, source: LoadedModel, max_images: int | None) -> dict:
    """The test items scored: those with a label and a mask that is neither empty nor everything on
    the input grid (voxel ROC AUC needs both classes; ``source.prepare_mask``), in manifest order,
    at most ``max_images``."""

    cases, unusable = [], 0
    for item in read_manifest(manifest):
        if not item.get("mask") or item.get("label") is None:
            continue
        mask = source.prepare_mask(item["mask"])
        if mask is None or not mask.any() or mask.all():
            unusable += 1
            continue
        cases.append({key: item.get(key) for key in ("id", "image", "mask", "label", "subtype")})
        if max_images is not None and len(cases) == max_images:
            break
    if not cases:
        raise ExperimentError(f"{manifest}: no image with a label and a usable lesion mask to score")
    return {"cases": cases, "unusable_masks": unusable}


def _method_params(settings: dict, method: str, seed: int) -> dict:

    params = dict(settings["params"].get(method, {}))
    if "seed" in get_method(method).defaults:
        params["seed"] = seed
    return params


def fractions(settings: dict) -> np.ndarray:
    """The fidelity's fractions of the voxels perturbed: 0, ``fraction_step``, ... below 1, (F,)."""
    return np.arange(0.0, 1.0, settings["fraction_step"])


def _score_block(run: Run, source: LoadedModel, indices: list[int], cases: list[dict]) -> list[dict]:
    """Rows of one block of crops: every method's map of each crop, scored (module docstring)."""
    s = run.settings
    seed = run.seed + indices[0] // BLOCK_SIZE
    model, card = source.network, source.card
    images, labels, masks = load_trust_inputs(cases, card, source=source)
    images = images.to(run.device)
    xrai_params = s["params"].get("xrai", {})
    selection = {
        key: {**get_method("xrai").defaults, **xrai_params}[key] for key in ("area_threshold", "min_pixel_diff")
    }
    segments = None
    scored: dict[str, list[dict]] = {}
    for method in s["methods"]:
        params = _method_params(s, method, seed)
        if method == "xrai":
            regions = xrai_regions(model, images, target=labels, **params)
            maps = torch.from_numpy(np.stack([r.gains[r.ranks - 1] for r in regions])[:, None]).float()
        else:
            maps = explain(model, images, method, target=labels, **params).cpu()
        keys = maps[:, 0].double().numpy()
        keys = np.abs(keys) if s["order_by"] == "abs" else keys
        if method != "xrai":
            if segments is None:
                segments = [xrai_segments(image, **xrai_params) for image in images.cpu().double().numpy()]
            regions = [attribution_regions(key, seg, **selection)[1] for key, seg in zip(keys, segments)]
        result = fidelity(
            model,
            images,
            maps=maps,
            target=labels,
            labels=labels,
            fractions=fractions(s),
            baseline=s["baseline"],
            score=s["score"],
            order_by=s["order_by"],
            seed=seed,
        )
        scored[method] = [
            {
                "auc_mif": result.auc_mif[k],
                "auc_lif": result.auc_lif[k],
                "fidelity": result.fidelity[k],
                "roc_auc": roc_auc(keys[k], masks[k]),
                **xrai_region_dice(regions[k].ranks, masks[k], s["region_fractions"]),
                "mif_curve": result.mif[k].tolist(),
                "lif_curve": result.lif[k].tolist(),
            }
            for k in range(len(cases))
        ]
        for k, index in enumerate(indices):
            if index < FIGURE_CASES:
                path = run.work / "maps" / method / f"{cases[k]['id']}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, maps[k, 0].numpy())
    return [
        {"id": case["id"], "subtype": case["subtype"] or "", "method": method, **scored[method][k]}
        for k, case in enumerate(cases)
        for method in s["methods"]
    ]


def rank_tables(summary: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(ranks, agreement)`` from the per-method summary (``<score>_mean`` of each of :data:`RANKED`).

    ``ranks``: one row per method, each score's mean and the method's rank by it (1 = highest; ties
    share their average rank). ``agreement``: one row per pair of scores, Spearman's rho and
    Kendall's tau-b between the two rankings with their two-sided p-values (NaN with fewer than
    three methods or a constant score), and whether both put the same method first.
    """
    means = {score: np.array([row[f"{score}_mean"] for row in summary], dtype=np.float64) for score in RANKED}
    ranks = {score: stats.rankdata(-values) for score, values in means.items()}
    rank_rows = []
    for i, row in enumerate(summary):
        cells = {"method": row["method"]}
        for score in RANKED:
            cells[score] = float(means[score][i])
            cells[f"{score}_rank"] = float(ranks[score][i])
        rank_rows.append(cells)
    agreement = []
    for a, b in ((RANKED[0], RANKED[1]), (RANKED[0], RANKED[2]), (RANKED[1], RANKED[2])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant or too short rankings: NaN, said in the docstring
            rho, rho_p = stats.spearmanr(means[a], means[b]) if len(summary) >= 3 else (np.nan, np.nan)
            tau, tau_p = stats.kendalltau(means[a], means[b]) if len(summary) >= 3 else (np.nan, np.nan)
        agreement.append(
            {
                "ranking": a,
                "against": b,
                "methods": len(summary),
                "spearman": float(rho),
                "spearman_p": float(rho_p),
                "kendall": float(tau),
                "kendall_p": float(tau_p),
                "same_best": summary[int(np.argmin(ranks[a]))]["method"] == summary[int(np.argmin(ranks[b]))]["method"],
            }
        )
    return rank_rows, agreement


def _figures(run: Run, source: LoadedModel, cases: list[dict], rows: list[dict], summary: list[dict]) -> list[Path]:

    s = run.settings
    methods = s["methods"]
    shown = cases[:FIGURE_CASES]
    card = source.card
    images, _, masks = load_trust_inputs(shown, card, source=source)
    grid = [
        {
            "id": case["id"],
            "image": images[k, 0].numpy(),
            "mask": masks[k],
            "maps": {m: np.load(run.work / "maps" / m / f"{case['id']}.npy") for m in methods},
        }
        for k, case in enumerate(shown)
    ]
    figures = [save_overlay_grid(grid, methods, run.figure("maps"), title="|map| at the lesion's largest axial slice")]
    curves = {
        m: {
            "fidelity": {
                "fractions": fractions(s),
                "mif": [r["mif_curve"] for r in rows if r["method"] == m],
                "lif": [r["lif_curve"] for r in rows if r["method"] == m],
                "score": s["score"],
            }
        }
        for m in methods
    }
    figures.append(fidelity_figure(curves, run.figure("fidelity_curves")))

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), squeeze=False)
    labels = {"roc_auc": "mean voxel ROC AUC (0.5: chance)", "xrai_dice_area": "mean XRAI-region Dice (mask volume)"}
    for ax, score in zip(axes[0], ("roc_auc", "xrai_dice_area")):
        for row in summary:
            ax.scatter(row["fidelity_mean"], row[f"{score}_mean"], color="#3a6ea5", s=14)
            ax.annotate(
                row["method"],
                (row["fidelity_mean"], row[f"{score}_mean"]),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
        ax.set_xlabel("mean fidelity, AUC(LIF) - AUC(MIF)")
        ax.set_ylabel(labels[score])
    figures.append(save_figure(fig, run.figure("fidelity_vs_localization")))
    return figures


def run_ct_importance(run: Run) -> None:

    s = run.settings
    manifests = run.step("data", lambda: _data(run))
    for name, manifest in manifests.items():
        if manifest is not None:
            run.record_data(name, manifest)
    model_row = run.step("model", lambda: _model(run))
    source = load_model_source(model_row["checkpoint"], device=run.device)
    found = run.step("cases", lambda: _cases(manifests["test"], source, s["max_images"]))
    cases = found["cases"]
    rows = run.map_blocks(
        "scores", cases, lambda indices, block: _score_block(run, source, indices, block), block_size=BLOCK_SIZE
    )
    table = [{key: value for key, value in row.items() if key not in CURVES} for row in rows]
    metrics = [key for key in table[0] if key not in ("id", "subtype", "method")]
    summary = run.table("ct_importance", table, group_by="method", metrics=metrics)
    rank_rows, agreement = rank_tables(summary)
    run.table("ranks", rank_rows)
    run.table("rank_agreement", agreement)
    figures = _figures(run, source, cases, rows, summary) if run.is_main else []

    skipped = (
        f"; {found['unusable_masks']} crop(s) with a mask empty or full on that grid were left out"
        if found["unusable_masks"]
        else ""
    )
    run.section(
        Section(
            "Model",
            "Which classifier is explained, and does it tell crops with a lesion from crops without?",
            [{key: value for key, value in model_row.items() if key != "checkpoint"}],
            note=f"{len(cases)} test crop(s) with a lesion mask are explained for their own label, on the model's "
            f"{model_row['input_size']} input grid{skipped}.",
        )
    )
    run.section(
        Section(
            "Fidelity and localization per method",
            "Do the voxels each method ranks first carry the model's decision (fidelity > 0), and do they lie in "
            "the lesion (ROC AUC > 0.5, XRAI-region Dice)?",
            summary,
            figures[:2],
            note=f"auc_mif, auc_lif: areas under the {s['score']} curves as the most / least important voxels first "
            f"are set to the {s['baseline']} baseline (fractions 0 to {fractions(s)[-1]:g}); fidelity = auc_lif - "
            f"auc_mif. Voxels ranked by {'|map|' if s['order_by'] == 'abs' else 'the signed map'} for every score. "
            "xrai_dice_*: Dice of the mask and the top XRAI regions covering the mask's volume (area) or p % of the "
            "crop; the regions are XRAI's segments chosen by each method's ranking key, XRAI's own for xrai. Method "
            "parameters: the resolved config below.",
        )
    )
    run.section(
        Section(
            "Rankings",
            "How does each score rank the methods (1 = best)?",
            rank_rows,
            figures[2:],
        )
    )
    run.section(
        Section(
            "Do fidelity and localization agree?",
            "Are the methods ranked alike by the model-centric score (fidelity) and the human-centric ones "
            "(ROC AUC, XRAI-region Dice), as Spearman's rho and Kendall's tau between the rankings measure?",
            agreement,
            note="rho, tau: 1 for the same order, 0 for unrelated orders, -1 for reversed ones; p: two-sided, "
            "against no association (few methods give wide uncertainty). The CT study found fidelity and the "
            "mask-based scores disagree.",
        )
    )


RECIPE = Recipe(
    "ct_importance",
    run_ct_importance,
    SETTINGS,
    data_columns=("id", "image", "label", "mask"),
    models=True,
    validate=_validate,
    check_inputs=_check_inputs,
)
