"""``monai-sal demo``: the whole path on built-in data, in a few minutes on 2 CPU cores.

1. Shepp-Logan subtype phantoms in 2D: the homogeneous preset for training (fewer images per
   class than the preset's 500 by default, for speed) and the test preset for testing;
2. a conv5-fc3 classifier trained on them (validation AUC, early stopping, checkpoint + card);
3. gradient and Grad-CAM maps (absolute values) of every test image, on the input grid, with overlays;
4. localization metrics against the masks of the atrophied regions, next to the baseline of
   the mean training mask; a report folder with CSV, Markdown and PNG.
"""

from __future__ import annotations

import time
from pathlib import Path

from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.data.shepp_logan import generate_shepp_logan
from monai_sal_app.experiments.workflows import (
    evaluate_maps,
    explain_items,
    mean_mask_rows,
    train_from_manifest,
    write_json,
)
from monai_sal_app.metrics.stats import to_markdown

DEMO_METHODS = ("gradient", "gradcam")


def run_demo(
    out: str | Path = "demo_report",
    *,
    quick: bool = False,
    per_class: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the demo into ``out``; returns the summary dict also written to ``out/summary.json``.

    ``quick`` shrinks everything (32 px, a handful of images, 2 epochs) for smoke tests: its
    numbers mean nothing. The default trains on 200 images per class at 128 px.
    """
    out = Path(out)
    start = time.perf_counter()
    size = 32 if quick else 128
    per_class = per_class or (12 if quick else 200)
    test_per_class = 6 if quick else 100
    epochs = epochs or (2 if quick else 30)

    log(f"[1/4] data: Shepp-Logan 2D, {per_class}/class (homogeneous) + {test_per_class}/class (test), {size} px")
    train_manifest = generate_shepp_logan(
        out / "data" / "train",
        preset="homogeneous",
        dim=2,
        size=size,
        per_class=per_class,
        seed=seed,
        progress=progress,
    )
    test_manifest = generate_shepp_logan(
        out / "data" / "test",
        preset="test",
        dim=2,
        size=size,
        per_class=test_per_class,
        seed=seed + 1,
        progress=progress,
    )

    log(f"[2/4] classifier: conv5fc3, up to {epochs} epochs")
    model, card = train_from_manifest(
        train_manifest,
        out / "model" / "model.pt",
        arch="conv5fc3",
        epochs=epochs,
        patience=3 if quick else 8,
        labels=["control", "patient"],
        test_manifest=test_manifest,
        seed=seed,
        progress=progress,
        log=log,
    )

    log(f"[3/4] explain: {', '.join(DEMO_METHODS)} on the test set")
    test_items = read_manifest(test_manifest)
    maps_csv = explain_items(
        model,
        card,
        test_items,
        out / "explain",
        methods=DEMO_METHODS,
        postprocess_steps=("abs",),
        overlays=8,
        progress=progress,
    )

    log("[4/4] evaluate against the region masks")
    baseline = mean_mask_rows(read_manifest(train_manifest), test_items)
    _, summary = evaluate_maps(maps_csv, out / "evaluate", extra_rows=baseline, log=log)

    metrics = card.metrics
    result = {
        "classifier": {k: metrics[k] for k in ("test_auc", "test_balanced_accuracy", "val_auc") if k in metrics},
        "localization": {row["method"]: {k: v for k, v in row.items() if k != "method"} for row in summary},
        "seconds": time.perf_counter() - start,
        "quick": quick,
    }
    write_json(result, out / "summary.json")
    columns = [
        "method",
        "n",
        "roc_auc_mean",
        "roc_auc_ci_low",
        "roc_auc_ci_high",
        "auprc_mean",
        "soft_dice_mean",
        "dice_area_mean",
        "iou_p95_mean",
    ]
    table = to_markdown([{k: row.get(k) for k in columns} for row in summary])
    overlays = sorted((out / "explain" / "overlays").glob("*/*.png"))
    report = [
        "# monai-sal demo report",
        "",
        f"Shepp-Logan subtype phantoms (2D, {size} px): {per_class}/class for training (homogeneous preset), "
        f"{test_per_class}/class for testing (test preset). Classifier: conv5fc3.",
        "",
        f"**Classifier on the test set:** AUC {metrics.get('test_auc', float('nan')):.3f}, "
        f"balanced accuracy {metrics.get('test_balanced_accuracy', float('nan')):.3f}.",
        "",
        "**Localization of the atrophied region** (per-image metrics of |map| on test patients, mean and 95% CI; "
        "`baseline_mean_mask` is the mean training mask used as a map):",
        "",
        table,
        "",
        "Files: `evaluate/per_image.csv`, `evaluate/summary.csv`, `explain/maps.csv`, maps in `explain/maps/`, "
        "model in `model/model.pt` with its card `model/model.json`.",
        "",
        "## Overlays",
        "",
        *[f"![{p.stem}]({p.relative_to(out)})" for p in overlays],
        "",
        f"Total time: {result['seconds']:.0f} s.",
    ]
    (out / "report.md").write_text("\n".join(report) + "\n")
    log("\n" + table)
    log(
        f"classifier test AUC {metrics.get('test_auc', float('nan')):.3f}; report: {out / 'report.md'} ({result['seconds']:.0f} s)"
    )
    return result
