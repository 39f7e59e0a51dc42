"""The comparison commands: WILDCAT against post-hoc maps (``compare-wildcat``) and trained
explainers against post-hoc methods (``compare-explainers``): their scoring on hand-made maps, and
each command end to end on a few real-anatomy chest X-rays (the bases of scripts/install_data.sh)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import base_or_skip

from monai_sal_app.cli import main
from monai_sal_app.data import bases
from monai_sal_app.data.io import write_nifti
from monai_sal_app.experiments.builtin_models import scaled_augmentations
from monai_sal_app.experiments.explainers import localization_table
from monai_sal_app.experiments.wildcat import score_maps
from monai_sal_app.metrics.localization import localization_metrics, pointwise_average_precision
from monai_sal_app.metrics.stats import write_csv


def hand_made_maps(folder: Path) -> Path:
    """maps.csv of 2 methods on 3 images of 8x8: two with a 2x2 mask (labels 1), one without (label 0).
    ``peak`` puts each map's maximum inside the mask; ``off`` puts it outside."""
    masks = {}
    for name, corner in (("a", (1, 1)), ("b", (5, 5))):
        mask = np.zeros((8, 8), np.float32)
        mask[corner[0] : corner[0] + 2, corner[1] : corner[1] + 2] = 1
        masks[name] = write_nifti(mask, folder / f"{name}_mask.nii.gz")
    rows = []
    for method, inside in (("peak", True), ("off", False)):
        for image, label, probability in (("a", 1, 0.9), ("b", 1, 0.6), ("c", 0, 0.8)):
            saliency = np.arange(64, dtype=np.float32).reshape(8, 8) / 64  # maximum at (7, 7)
            if inside and image in masks:
                row, col = (1, 1) if image == "a" else (5, 5)
                saliency[row, col] = 2.0
            path = write_nifti(saliency, folder / method / f"{image}.nii.gz")
            rows.append(
                {
                    "id": image,
                    "image": "",
                    "mask": str(masks.get(image, "")),
                    "label": label,
                    "method": method,
                    "target": 1,
                    "probability": probability,
                    "map": str(path),
                    "seconds_per_image": 0.01 if method == "peak" else 0.03,
                }
            )
    return write_csv(rows, folder / "maps.csv")


def test_score_maps_by_hand(tmp_path):
    per_image, summary = score_maps(hand_made_maps(tmp_path))
    peak, off = summary
    assert (peak["method"], peak["n_images"], peak["n_masks"]) == ("peak", 3, 2)
    assert peak["pointwise_hit_rate"] == 1.0 and off["pointwise_hit_rate"] == 0.0
    # ranked by probability: a (0.9, hit), c (0.8, no mask), b (0.6, hit): AP = (1/1 + 2/3) / 2
    assert peak["pointwise_ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert peak["pointwise_ap"] == pointwise_average_precision([0.9, 0.6, 0.8], [True, True, False], [1, 1, 0])
    assert off["pointwise_ap"] == 0.0
    a = next(row for row in per_image if row["id"] == "a" and row["method"] == "peak")
    saliency = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    saliency[1, 1] = 2.0
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:3] = True
    assert a["auprc"] == pytest.approx(localization_metrics(saliency, mask)["auprc"])
    assert next(row for row in per_image if row["id"] == "c")["auprc"] is None  # no mask, no AUPRC
    assert peak["seconds_per_map"] == pytest.approx(0.01)


def test_score_maps_refuses_maps_of_another_class(tmp_path):
    maps_csv = hand_made_maps(tmp_path)
    rows = list(csv.DictReader(maps_csv.read_text().splitlines()))
    rows[0]["target"] = 0
    write_csv(rows, maps_csv)
    with pytest.raises(ValueError, match="explains class 0, not 1"):
        score_maps(maps_csv)


def test_localization_table_by_hand(tmp_path):
    rows, summary = localization_table(hand_made_maps(tmp_path))
    assert len(rows) == 4  # the two images with a mask, two methods
    peak = summary[0]
    assert peak["n"] == 2 and peak["auprc_ci_low"] <= peak["auprc_mean"] <= peak["auprc_ci_high"]
    assert peak["auprc_mean"] == pytest.approx(np.mean([r["auprc"] for r in rows if r["method"] == "peak"]))
    assert {"partial_auprc_mean", "iou_p80_mean", "iou_p98_mean"} <= set(peak)


@pytest.fixture(scope="module")
def chest_base():
    return base_or_skip(bases.chest_radiograph_file)


def test_scaled_augmentations_keep_the_shift_a_fraction_of_the_side():
    assert scaled_augmentations(("croppad:6", "noise"), 256 / 64) == ("croppad:24", "noise")
    assert scaled_augmentations(("flip", "croppad:3"), 16 / 32) == ("flip", "croppad:2")
    assert scaled_augmentations(("croppad:3", "noise:0.1"), 0.1) == ("croppad:1", "noise:0.1")
    assert scaled_augmentations(("croppad",), 4) == ("croppad",)  # the augmentation's own default shift


@pytest.mark.e2e
def test_compare_wildcat_end_to_end(chest_base, tmp_path):
    out = tmp_path / "wildcat"
    options = ["--per-class", "6", "--test-per-class", "3", "--epochs", "1", "--maps", "2"]
    assert main(["--quiet", "compare-wildcat", "--data", "chest-xray", *options, "--out", str(out)]) == 0
    table = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    assert [(row["model"], row["method"]) for row in table] == [
        ("plain", "gradcam"),
        ("plain", "guided_gradcam"),
        ("plain", "gradient"),
        ("wildcat", "wildcat"),
        ("wildcat", "wildcat (contrast)"),
    ]
    assert all(row["n_images"] == "6" and row["n_masks"] == "3" for row in table)
    assert (out / "maps" / "wildcat" / "wildcat_contrast" / "maps.csv").is_file()
    assert (out / "wildcat.json").is_file() and "| wildcat | " in (out / "comparison.md").read_text()


@pytest.mark.e2e
def test_compare_explainers_end_to_end(chest_base, tmp_path):
    out = tmp_path / "explainers"
    options = ["--per-class", "6", "--test-per-class", "3", "--epochs", "1", "--explainer-epochs", "1"]
    work = ["--max-images", "2", "--mp-steps", "2", "--methods", "gradient,meaningful_perturbation"]
    work += ["--explainer-per-class", "5"]
    assert main(["--quiet", "compare-explainers", *options, *work, "--out", str(out)]) == 0
    table = list(csv.DictReader((out / "explainers.csv").read_text().splitlines()))
    assert [row["method"] for row in table] == [
        "gradient",
        "meaningful_perturbation",
        "mask_generator",
        "similarity_adversarial",
        "similarity_adversarial (tta)",
    ]
    assert all(row["n"] == "2" for row in table)
    flip_rates = [row["flip_rate"] for row in table]
    assert flip_rates[:3] == ["", "", ""] and flip_rates[3] == flip_rates[4] and 0 <= float(flip_rates[3]) <= 1
    for kind in ("mask_generator", "similarity_adversarial"):
        assert (out / f"classifier.{kind}.pt").is_file() and (out / f"classifier.{kind}.history.csv").is_file()
        data = json.loads((out / f"classifier.{kind}.json").read_text())["data"]  # the extra images, not the 12
        assert data["manifest"] == str((out / "data" / "explainer" / "manifest.csv").resolve())
        assert data["n_train"] + data["n_val"] == 10


def test_compare_explainers_refuses_a_bad_explainer_image_count_before_any_work(tmp_path, capsys):
    out = tmp_path / "explainers"
    assert main(["compare-explainers", "--explainer-per-class", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: explainer_per_class must be an integer >= 1, got 0"]
    assert not out.exists()
