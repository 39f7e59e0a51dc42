"""``demo``: a short tour of monai-sal on built-in data, ending in ``report.html`` (``monai-sal demo``).

1. Shepp-Logan subtype phantoms in 2D (``data.shepp_logan``): the homogeneous preset for training,
   the test preset (half typical, half atypical patients) for testing;
2. a conv5-fc3 classifier trained on control vs patient (validation AUC, early stopping);
3. every fast method's map of the patient class on each test patient, scored against the mask of
   the atrophied region (``metrics.localization``), next to the mean training mask as a map, with
   the same cases' maps for every method and the ROC/PR curves over some of them;
4. the trust checks (``evaluation.trust.trust_card``) on a subset of the test patients, for the
   methods cheap enough to recompute at every randomized state: does the map depend on what the
   model learned (cascading randomization, the retention share over the states with at least
   half the blocks random), and does it track what the model uses (fidelity, MIF/LIF);
5. the latent subtypes (``evaluation.subtypes``): does the classifier keep the two patient
   subtypes apart, and does each group's mean map point at its own atrophied region?
"""

from __future__ import annotations

import numpy as np

from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.data.shepp_logan import generate_shepp_logan
from monai_sal_app.evaluation.randomization import RETENTION_CUT
from monai_sal_app.evaluation.subtypes import subtype_metrics
from monai_sal_app.evaluation.trust import SCHEMA_VERSION, trust_card
from monai_sal_app.experiments.report import roc_pr_figure, save_overlay_grid
from monai_sal_app.experiments.study import Recipe, Run, Section, check_integer
from monai_sal_app.experiments.trust_report import fidelity_figure, randomization_figure
from monai_sal_app.experiments.workflows import mean_mask_rows
from monai_sal_app.metrics.localization import localization_metrics
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.models.inputs import load_inputs
from monai_sal_app.models.manifest_training import train_from_manifest
from monai_sal_app.saliency import explain, get_method

PATIENT = 1  # the class whose evidence the masks outline
SETTINGS = {
    "size": 64,
    "per_class": 150,
    "test_per_class": 50,
    "epochs": 15,
    "methods": [
        "gradient",
        "smoothgrad",
        "integrated_gradients",
        "gradcam",
        "guided_backprop",
        "guided_gradcam",
        "occlusion",
        "xrai",
    ],
    # the trust checks recompute every map at each randomized state: the methods cheap enough for that
    "trust_methods": ["gradient", "smoothgrad", "integrated_gradients", "gradcam", "guided_backprop", "guided_gradcam"],
    "trust_images": 16,
    "kmeans_seeds": 10,
    "cases": 4,  # test patients in the overlay figure
    "curve_images": 16,  # test patients whose pixels the ROC/PR figure pools
}


def _validate(settings: dict) -> None:

    for method in [*settings["methods"], *settings["trust_methods"]]:
        get_method(method)
    for key in (
        "size",
        "per_class",
        "test_per_class",
        "epochs",
        "trust_images",
        "kmeans_seeds",
        "cases",
        "curve_images",
    ):
        check_integer(settings, key)
    if settings["trust_images"] < 2:
        raise ValueError("trust_images must be at least 2 (the random-pair baseline needs pairs)")


def _generate(run: Run) -> dict:

    s, folder = run.settings, run.work / "data"
    train = generate_shepp_logan(folder / "train", "homogeneous", 2, s["size"], s["per_class"], run.seed, run.progress)
    test = generate_shepp_logan(folder / "test", "test", 2, s["size"], s["test_per_class"], run.seed + 1, run.progress)
    return {"train": str(train), "test": str(test)}


def _train(run: Run, manifests: dict) -> dict:

    checkpoint = run.work / "model.pt"
    _, card = train_from_manifest(
        manifests["train"],
        checkpoint,
        epochs=run.settings["epochs"],
        patience=run.settings["epochs"],
        labels=("control", "patient"),
        test_manifest=manifests["test"],
        seed=run.seed,
        device=str(run.device),
        progress=run.progress,
        log=run.log,
    )
    return {"checkpoint": str(checkpoint), "metrics": card.metrics}


def _masks(items: list[dict], key: str = "mask") -> np.ndarray:

    return np.stack([read_image(i[key], allow_constant=True)[0] > 0.5 for i in items])


def _localization_block(run: Run, model, items: list[dict]) -> list[dict]:

    images, _ = load_inputs(items, progress=False)
    masks = _masks(items)
    rows = []
    for method in run.settings["methods"]:
        maps = explain(model, images.to(run.device), method, target=PATIENT).abs().cpu().numpy()
        for k, item in enumerate(items):
            rows.append({"id": item["id"], "subtype": item["subtype"], "method": method})
            rows[-1].update(localization_metrics(maps[k, 0], masks[k]))
    return rows


def _mean_mask_rows(manifests: dict, patients: list[dict]) -> list[dict]:

    return mean_mask_rows(read_manifest(manifests["train"]), patients)


def _trust(run: Run, model, items: list[dict]) -> dict:

    images, _ = load_inputs(items, progress=False)
    targets = [PATIENT] * len(items)
    card = trust_card(
        model,
        images.to(run.device),
        labels=[int(i["label"]) for i in items],
        methods=run.settings["trust_methods"],
        checks=("randomization", "fidelity"),
        seed=run.seed,
        targets=targets,
    )
    return card["methods"]


def _subtypes(run: Run, model, items: list[dict]) -> dict:

    images, _ = load_inputs(items, progress=False)
    return subtype_metrics(
        model,
        images.to(run.device),
        [i["subtype"] for i in items],
        _masks(items, "mask_top"),
        _masks(items, "mask_bottom"),
        seeds=run.settings["kmeans_seeds"],
    )


def _case_figures(run: Run, model, patients: list[dict]) -> list:
    """The overlay grid of ``cases`` test patients (half typical, half atypical) and the ROC/PR
    curves of every method over ``curve_images`` of them."""

    s = run.settings
    half = s["cases"] // 2
    grid = [p for p in patients if p["subtype"] == "typical"][:half]
    grid += [p for p in patients if p["subtype"] == "atypical"][: s["cases"] - half]
    pooled = patients[: s["curve_images"]]
    chosen = list({item["id"]: item for item in grid + pooled}.values())
    images, _ = load_inputs(chosen, progress=False)
    maps = {m: explain(model, images.to(run.device), m, target=PATIENT).cpu().numpy()[:, 0] for m in s["methods"]}
    masks = _masks(chosen)
    index = {item["id"]: k for k, item in enumerate(chosen)}
    cases = [
        {
            "id": f"{item['id']} ({item['subtype']})",
            "image": read_image(item["image"])[0],
            "mask": masks[index[item["id"]]],
            "maps": {m: maps[m][index[item["id"]]] for m in maps},
        }
        for item in grid
    ]
    curves = [index[item["id"]] for item in pooled]
    return [
        save_overlay_grid(cases, s["methods"], run.figure("maps")),
        roc_pr_figure({m: v[curves] for m, v in maps.items()}, masks[curves], run.figure("roc_pr")),
    ]


def run_demo(run: Run) -> None:

    manifests = run.step("data", lambda: _generate(run))
    for name, manifest in manifests.items():
        run.record_data(name, manifest)
    trained = run.step("classifier", lambda: _train(run, manifests))
    model, _ = load_classifier(trained["checkpoint"], device=run.device)
    test = read_manifest(manifests["test"])
    patients = [i for i in test if i.get("mask")]

    rows = run.map_blocks("localization", patients, lambda _, block: _localization_block(run, model, block), 8)
    rows += run.step("baseline", lambda: _mean_mask_rows(manifests, patients))
    localization = run.table(
        "localization", rows, group_by="method", metrics=("roc_auc", "auprc", "soft_dice", "dice_area")
    )
    n_trust = min(run.settings["trust_images"], len(patients))
    subset = [patients[int(k)] for k in np.linspace(0, len(patients) - 1, n_trust).round().astype(int)]
    trust = run.step(f"trust_schema{SCHEMA_VERSION}", lambda: _trust(run, model, subset))
    subtypes = run.step("subtypes", lambda: _subtypes(run, model, test))

    metrics = trained["metrics"]
    classifier_rows = [
        {
            "model": "conv5fc3",
            "test_auc": metrics.get("test_auc"),
            "test_balanced_accuracy": metrics.get("test_balanced_accuracy"),
            "val_auc": metrics.get("val_auc"),
            "n_test": metrics.get("n_test"),
        }
    ]
    randomization_rows = [
        {
            "method": m,
            "retention_mean": e["randomization"]["retention"]["mean"],
            "retention_ci_low": e["randomization"]["retention"]["ci_low"],
            "retention_ci_high": e["randomization"]["retention"]["ci_high"],
            "fully_random": e["randomization"]["retention"]["per_state"][-1],
            "spearman_signed_fully_random": e["randomization"]["curve"]["spearman"][-1],
            "blank_share": e["randomization"]["blank_share"],
            "depends_on_the_model": e["randomization"]["verdict"],
        }
        for m, e in trust.items()
    ]
    fidelity_rows = [
        {
            "method": m,
            "fidelity_mean": e["fidelity"]["mean"],
            "fidelity_ci_low": e["fidelity"]["ci_low"],
            "fidelity_ci_high": e["fidelity"]["ci_high"],
            "accuracy_fidelity": e["fidelity"]["accuracy_fidelity"],
            "order_by": e["fidelity"]["order_by"],
            "replaced_as_target": e["fidelity"]["replaced_as_target"],
            "tracks_what_the_model_uses": e["fidelity"]["verdict"],
        }
        for m, e in trust.items()
    ]
    subtype_rows = [
        {"ari": subtypes["ari"]["ari_mean"], **{k: subtypes[k] for k in ("b", "c", "b_dagger", "c_dagger")}}
    ]
    for name, table in (
        ("classifier", classifier_rows),
        ("randomization", randomization_rows),
        ("fidelity", fidelity_rows),
        ("subtypes", subtype_rows),
    ):
        run.table(name, table)

    figures = {}
    if run.is_main:
        figures = {
            "cases": _case_figures(run, model, patients),
            "randomization": randomization_figure(
                {m: e["randomization"] for m, e in trust.items()}, run.figure("randomization")
            ),
            "fidelity": fidelity_figure(trust, run.figure("fidelity")),
        }
    run.section(
        Section(
            "Classifier",
            "Does the classifier tell patients (an atrophied region) from controls on held-out phantoms?",
            classifier_rows,
        )
    )
    run.section(
        Section(
            "Localization",
            "Does each method's map of the patient class fall on the atrophied region (per-image ROC AUC and "
            "AUPRC of |map| against the region's mask), and does it beat the mean training mask used as a map?",
            localization,
            figures.get("cases", []),
            note="The regions sit at fixed places, so the mean training mask is a strong baseline: a map must beat "
            "it to show more than where the regions usually are. Overlays: |map| with low values transparent, "
            "clipped at its 99th percentile; the atrophied region outlined in cyan.",
        )
    )
    run.section(
        Section(
            "Cascading randomization",
            "Does the map change when the classifier's weights are re-initialised from the logits down (it should: "
            "a map that survives randomization does not explain this model)?",
            randomization_rows,
            [figures["randomization"]] if figures else [],
            verdict="depends_on_the_model",
            note="retention: the share of each image's own map (beyond what all patients' maps share) that the "
            "randomized model's map keeps, Spearman of |map|, averaged over the states with at least half the blocks "
            f"random (shaded in the figure) with a bootstrap 95% CI; yes below {RETENTION_CUT}, no above, unclear "
            "when the CI spans it. fully_random: the retention at the last state alone; spearman_signed_fully_random: "
            "the signed Spearman there (not judged). 'yes' is a minimum requirement, not proof that the map is right.",
        )
    )
    run.section(
        Section(
            "Fidelity",
            "Does removing the pixels a map ranks first hurt the prediction more than removing the ones it ranks last "
            "(fidelity = AUC(LIF) - AUC(MIF), above 0 with its 95% CI)?",
            fidelity_rows,
            [figures["fidelity"]] if figures else [],
            verdict="tracks_what_the_model_uses",
            note="Score: the decision margin (patient minus control logit) relative to the image's own, clipped to "
            "[0, 1]; removed pixels set to 0; signed methods ranked by their signed map. accuracy_fidelity: the same "
            "difference of areas on the share of images still classified as before. replaced_as_target: the share "
            "of images whose fully replaced (all-zero) image the model calls 'patient': above one half, the "
            "replacement is itself evidence for the class and the answer is unclear.",
        )
    )
    run.section(
        Section(
            "Latent subtypes",
            "Do the classifier's features keep the two patient subtypes apart (ARI; 0 is chance), and does each "
            "group's mean map point at its own region (b, b†; 1 is chance)?",
            subtype_rows,
        )
    )


RECIPE = Recipe("demo", run_demo, SETTINGS, validate=_validate)
