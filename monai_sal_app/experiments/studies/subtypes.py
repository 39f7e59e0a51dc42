"""``subtypes``: does a classifier trained on labels alone keep the patients' hidden subtypes apart?

The latent-subtypes study on Shepp-Logan phantoms (``data.shepp_logan``): for each training preset
(homogeneous, heterogeneous, large), each loss and each augmentation, a conv5-fc3 classifier is
trained on control vs patient and scored on the test preset by ``evaluation.subtypes``: the ARI of
k-means on its feature maps against the true subtypes, and the separability (``b``, ``b_dagger``)
and specificity (``c``, ``c_dagger``) of the typical and atypical groups' mean control-class
gradients. ``design: one_at_a_time`` trains every loss without augmentation and every augmentation
with CE, as the study's tables do; ``full`` trains every pair. ``replicates`` models per condition
(seeds seed, seed + 1, ...) give the 95% CI.

Rows (``results/subtypes.csv``): one per trained model. Figures: the group maps of the first
replicate over the mean test image, and the ARI per condition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.data.shepp_logan import PRESETS, generate_shepp_logan
from monai_sal_app.evaluation.subtypes import group_saliency_map, subtype_metrics
from monai_sal_app.experiments.report import draw_overlay, pyplot, save_figure
from monai_sal_app.experiments.study import Recipe, Run, Section, check_integer
from monai_sal_app.models.inputs import load_inputs
from monai_sal_app.models.losses import LOSSES as KNOWN_LOSSES
from monai_sal_app.models.manifest_training import train_from_manifest

LOSSES = ("ce", "l1", "l1norm", "smoothl1", "msenorm")
AUGMENTATIONS = ("none", "croppad", "erasing", "noise", "smoothing")
METRICS = ("test_auc", "ari", "b", "c", "b_dagger", "c_dagger")

SETTINGS = {
    "presets": ["homogeneous", "heterogeneous"],
    "dim": 2,
    "size": 64,
    "per_class": 100,  # training images per class: an int, or a mapping preset -> int (None: the preset's)
    "test_per_class": 50,
    "losses": list(LOSSES),
    "augmentations": list(AUGMENTATIONS),
    "design": "one_at_a_time",
    "replicates": 2,
    "epochs": 20,
    "lr": 1e-3,
    "batch_size": 32,
    "kmeans_seeds": 10,
}


def _validate(settings: dict) -> None:

    for preset in settings["presets"]:
        if preset not in PRESETS or preset == "test":
            raise ValueError(f"unknown training preset {preset!r}; choose from homogeneous, heterogeneous, large")
    for loss in settings["losses"]:
        if loss not in KNOWN_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(KNOWN_LOSSES)}")
    for augmentation in settings["augmentations"]:
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augmentation!r}; choose from {', '.join(AUGMENTATIONS)}")
    if settings["design"] not in ("one_at_a_time", "full"):
        raise ValueError(f"design must be one_at_a_time or full, got {settings['design']!r}")
    if settings["dim"] not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {settings['dim']!r}")
    for key in ("size", "test_per_class", "replicates", "epochs", "batch_size", "kmeans_seeds"):
        check_integer(settings, key)
    per_class = settings["per_class"]
    values = per_class.values() if isinstance(per_class, dict) else [per_class]
    if any(v is not None and (not isinstance(v, int) or v < 2) for v in values):
        raise ValueError(f"per_class must be an integer >= 2 (or a mapping preset -> integer), got {per_class!r}")


def conditions(settings: dict) -> list[dict]:
    """The trained models: one dict per preset x (loss, augmentation) x replicate."""
    losses, augmentations = settings["losses"], settings["augmentations"]
    if settings["design"] == "full":
        pairs = [(loss, aug) for loss in losses for aug in augmentations]
    else:
        base_loss = "ce" if "ce" in losses else losses[0]
        base_aug = "none" if "none" in augmentations else augmentations[0]
        pairs = [(loss, base_aug) for loss in losses]
        pairs += [(base_loss, aug) for aug in augmentations if aug != base_aug]
    return [
        {"preset": preset, "loss": loss, "augmentation": aug, "replicate": r}
        for preset in settings["presets"]
        for loss, aug in pairs
        for r in range(settings["replicates"])
    ]


def _per_class(settings: dict, preset: str) -> int | None:
    per_class = settings["per_class"]
    return per_class.get(preset) if isinstance(per_class, dict) else per_class


def _generate(run: Run) -> dict:

    s = run.settings
    folder = run.work / "data"
    manifests = {
        "test": generate_shepp_logan(
            folder / "test", "test", s["dim"], s["size"], s["test_per_class"], run.seed + 1000, run.progress
        )
    }
    for preset in s["presets"]:
        manifests[preset] = generate_shepp_logan(
            folder / preset, preset, s["dim"], s["size"], _per_class(s, preset), run.seed, run.progress
        )
    return {name: str(path) for name, path in manifests.items()}


def _score_model(run: Run, manifests: dict, condition: dict, test) -> dict:

    s = run.settings
    name = "{preset}_{loss}_{augmentation}_r{replicate}".format(**condition)
    model, card = train_from_manifest(
        manifests[condition["preset"]],
        run.work / "models" / f"{name}.pt",
        arch="conv5fc3",
        loss=condition["loss"],
        augmentations=() if condition["augmentation"] == "none" else (condition["augmentation"],),
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        patience=s["epochs"],
        labels=("control", "patient"),
        test_manifest=manifests["test"],
        seed=run.seed + condition["replicate"],
        device=str(run.device),
        progress=False,
        log=lambda _: None,
    )
    images, subtypes, top, bottom = test
    images = images.to(run.device)
    scores = subtype_metrics(model, images, subtypes, top, bottom, seeds=s["kmeans_seeds"])
    if condition["replicate"] == 0:
        folder = run.work / "group_maps"
        folder.mkdir(parents=True, exist_ok=True)
        for group in ("typical", "atypical"):
            members = [i for i, t in enumerate(subtypes) if t == group]
            group_map = group_saliency_map(model, images[members]) if members else np.zeros(images.shape[2:])
            np.save(folder / f"{name}_{group}.npy", group_map)
    return {
        **condition,
        "test_auc": card.metrics.get("test_auc"),
        "ari": scores["ari"]["ari_mean"],
        **{k: scores[k] for k in ("b", "c", "b_dagger", "c_dagger")},
    }


def _load_test(manifest: str):

    items = read_manifest(manifest)
    images, _ = load_inputs(items, progress=False)
    top = np.stack([read_image(i["mask_top"], allow_constant=True)[0] > 0.5 for i in items])
    bottom = np.stack([read_image(i["mask_bottom"], allow_constant=True)[0] > 0.5 for i in items])
    return images, [i["subtype"] for i in items], top, bottom


def _figures(run: Run, rows: list[dict], test) -> list[Path]:

    images, _, top, bottom = test
    background = images[:, 0].double().mean(dim=0).numpy()
    regions = (top.any(axis=0) | bottom.any(axis=0)).astype(float)
    first = [r for r in rows if r["replicate"] == 0]
    plt = pyplot()
    fig, axes = plt.subplots(len(first), 2, figsize=(4.2, 2.0 * len(first)), squeeze=False)
    for k, row in enumerate(first):
        name = "{preset}_{loss}_{augmentation}_r{replicate}".format(**row)
        for c, group in enumerate(("typical", "atypical")):
            group_map = np.load(run.work / "group_maps" / f"{name}_{group}.npy")
            label = f"{row['preset']} {row['loss']} {row['augmentation']}\n{group} (b{'' if c == 0 else '†'}"
            value = row["b"] if c == 0 else row["b_dagger"]
            label += f" {value:.2f})" if value is not None else " n/a)"
            draw_overlay(axes[k, c], background, group_map, regions, label)
    group_figure = save_figure(fig, run.figure("subtype_group_maps"))

    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(first) + 1.2))
    summary = {}
    for row in rows:
        summary.setdefault((row["preset"], row["loss"], row["augmentation"]), []).append(row["ari"])
    labels = [" ".join(key) for key in summary]
    means = [float(np.nanmean([v if v is not None else np.nan for v in values])) for values in summary.values()]
    ax.barh(range(len(labels)), means, color="#3a6ea5")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("ARI of k-means on the feature maps (mean over replicates; 0 = chance)")
    ax.invert_yaxis()
    return [group_figure, save_figure(fig, run.figure("ari_by_condition"))]


def run_subtypes(run: Run) -> None:
    manifests = run.step("data", lambda: _generate(run))
    for name, manifest in manifests.items():
        run.record_data(name, manifest)
    test = _load_test(manifests["test"])
    todo = conditions(run.settings)
    rows = run.map_blocks("models", todo, lambda _, block: [_score_model(run, manifests, c, test) for c in block])
    summary = run.table("subtypes", rows, group_by=("preset", "loss", "augmentation"), metrics=METRICS)
    figures = _figures(run, rows, test) if run.is_main else []
    base = "none" if "none" in run.settings["augmentations"] else run.settings["augmentations"][0]
    run.section(
        Section(
            "Losses",
            "Does the choice of loss change whether the hidden subtypes stay apart in the features (ARI; 0 is "
            "chance) and whether each group's map points at its own atrophied region (b, b†; 1 is chance)?",
            [r for r in summary if r["augmentation"] == base],
        )
    )
    run.section(
        Section(
            "Augmentations",
            "Does a training augmentation change the same scores (with the CE loss)?",
            [
                r
                for r in summary
                if r["loss"] == ("ce" if "ce" in run.settings["losses"] else run.settings["losses"][0])
            ],
            figures,
            note="b, c: separability and specificity of the typical group's mean control-class gradient; b†, c†: of "
            "the atypical group's. The figure shows each condition's group maps (first replicate) over the mean "
            "test image with the two regions outlined.",
        )
    )


RECIPE = Recipe("subtypes", run_subtypes, SETTINGS, validate=_validate)
