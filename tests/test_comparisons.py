"""The scoring of the two learned-against-post-hoc studies on hand-made maps (``trainable_vs_posthoc``:
AUPRC, pointwise hits and detection AP; ``explainers``: AUC_loc, partial AUC_loc, IoU), and their
older command names, ``compare-wildcat`` and ``compare-explainers``, as aliases of ``experiment run``:
end to end on real-anatomy CT lesions (the bases of scripts/install_data.sh), which also runs both
studies in 3D."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import base_or_skip

from monai_sal_app.cli import main
from monai_sal_app.data import bases
from monai_sal_app.data.io import write_nifti
from monai_sal_app.experiments.builtin_models import scaled_augmentations
from monai_sal_app.experiments.studies.explainers import localization_rows
from monai_sal_app.experiments.studies.trainable_vs_posthoc import image_scores, pointwise_ap
from monai_sal_app.metrics.localization import localization_metrics, partial_auprc
from monai_sal_app.metrics.stats import write_csv


def hand_made_maps(folder: Path) -> Path:
    """maps.csv of 2 methods on 3 images of 8x8: two with a 2x2 mask (labels 1), one without (label 0),
    and the timings.csv beside it. ``peak`` puts each map's maximum inside the mask; ``off`` outside."""
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
                }
            )
    timings = [
        {"id": row["id"], "method": row["method"], "seconds_per_image": 0.01 if row["method"] == "peak" else 0.03}
        for row in rows
    ]
    write_csv(timings, folder / "timings.csv")
    return write_csv(rows, folder / "maps.csv")


def _peak_map() -> tuple[np.ndarray, np.ndarray]:
    """The ``peak`` map of hand-made image ``a`` and its mask, as :func:`hand_made_maps` writes them."""
    saliency = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    saliency[1, 1] = 2.0
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:3] = True
    return saliency, mask


def test_image_scores_and_pointwise_ap_by_hand(tmp_path):
    rows = image_scores(hand_made_maps(tmp_path))
    assert [(row["id"], row["method"]) for row in rows] == [(i, m) for m in ("peak", "off") for i in "abc"]
    peak = [row for row in rows if row["method"] == "peak"]
    off = [row for row in rows if row["method"] == "off"]
    assert [row["pointwise_hit"] for row in peak] == [True, True, False]  # c has no mask: never a hit
    assert [row["pointwise_hit"] for row in off] == [False, False, False]
    # ranked by probability: a (0.9, hit), c (0.8, no mask), b (0.6, hit): AP = (1/1 + 2/3) / 2
    assert pointwise_ap(peak) == pytest.approx((1 + 2 / 3) / 2)
    assert pointwise_ap(off) == 0.0
    saliency, mask = _peak_map()
    assert peak[0]["auprc"] == pytest.approx(localization_metrics(saliency, mask)["auprc"])
    assert peak[2]["auprc"] is None  # no mask, no AUPRC
    assert peak[0]["seconds_per_map"] == pytest.approx(0.01)


def test_image_scores_refuse_maps_of_another_class(tmp_path):
    maps_csv = hand_made_maps(tmp_path)
    rows = list(csv.DictReader(maps_csv.read_text().splitlines()))
    rows[0]["target"] = 0
    write_csv(rows, maps_csv)
    with pytest.raises(ValueError, match="explains class 0, not 1"):
        image_scores(maps_csv)


def test_localization_rows_by_hand(tmp_path):
    rows = localization_rows(hand_made_maps(tmp_path), percentiles=(80, 90))
    assert [(row["id"], row["method"]) for row in rows] == [("a", "peak"), ("b", "peak"), ("a", "off"), ("b", "off")]
    saliency, mask = _peak_map()
    assert rows[0]["auprc"] == pytest.approx(localization_metrics(saliency, mask)["auprc"])
    assert rows[0]["partial_auprc"] == pytest.approx(partial_auprc(saliency, mask, 0.5))
    assert rows[0]["iou_p90"] == pytest.approx(localization_metrics(saliency, mask, (90,))["iou_p90"])
    assert set(rows[0]) == {"id", "method", "auprc", "partial_auprc", "iou_p80", "iou_p90", "seconds_per_map"}


@pytest.fixture(scope="module")
def lung_ct():
    return base_or_skip(bases.lung_ct_files)


def test_scaled_augmentations_keep_the_shift_a_fraction_of_the_side():
    assert scaled_augmentations(("croppad:6", "noise"), 256 / 64) == ("croppad:24", "noise")
    assert scaled_augmentations(("flip", "croppad:3"), 16 / 32) == ("flip", "croppad:2")
    assert scaled_augmentations(("croppad:3", "noise:0.1"), 0.1) == ("croppad:1", "noise:0.1")
    assert scaled_augmentations(("croppad",), 4) == ("croppad",)  # the augmentation's own default shift


def _config(out) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


@pytest.mark.e2e
def test_compare_wildcat_runs_the_trainable_vs_posthoc_study_on_ct_lesions(lung_ct, tmp_path):
    out = tmp_path / "wildcat"
    settings = ["dataset=ct-lesions", "image_size=null", "input_size=16", 'backbones=["conv5fc3"]', "arch_kwargs={}"]
    assert (
        main(["--quiet", "compare-wildcat", "--scale", "smoke", *(f"--set={s}" for s in settings), "--out", str(out)])
        == 0
    )
    config = _config(out)
    assert config["recipe"] == "trainable_vs_posthoc" and config["settings"]["dataset"] == "ct-lesions"
    assert config["settings"]["backbones"] == ["conv5fc3"] and config["settings"]["input_size"] == 16
    rows = list(csv.DictReader((out / "results" / "detection.csv").read_text().splitlines()))
    methods = ["gradcam", "guided_gradcam", "gradient", "integrated_gradients"]  # the smoke scale's, as written
    expected = methods + ["wildcat", "wildcat (contrast)", "baseline_mean_mask"]
    assert [row["method"] for row in rows] == expected
    assert all(row["n_pathology"] == "2" for row in rows)  # 2 lesion volumes among the 4 test volumes
    volume = out / "work" / "data" / "test"
    assert next(volume.glob("**/*.nii.gz"))  # the 3D data the study generated
    assert "lesion" in (out / "report.html").read_text()


@pytest.mark.e2e
def test_compare_explainers_runs_the_explainers_study_on_ct_lesions(lung_ct, tmp_path):
    out = tmp_path / "explainers"
    assert (
        main(
            [
                "--quiet",
                "compare-explainers",
                "--scale",
                "smoke",
                "--set",
                "dataset=ct-lesions",
                "--set",
                "input_size=null",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert _config(out)["recipe"] == "explainers"
    rows = list(csv.DictReader((out / "results" / "explainers_summary.csv").read_text().splitlines()))
    expected = ["gradient", "gradcam", "meaningful_perturbation", "mask_generator", "similarity_adversarial"]
    assert [(row["method"], row["tta"]) for row in rows] == [(m, "False") for m in expected] + [
        ("similarity_adversarial", "True")
    ]


@pytest.mark.parametrize(
    "command, setting, message",
    [
        ("compare-explainers", "explainer_per_class=0", "explainer_per_class must be an integer >= 2, got 0"),
        ("compare-wildcat", "dataset=shepp-logan", "no built-in model for 'shepp-logan'"),
        ("compare-wildcat", "kmax=0.02", "unknown key(s) ['kmax']"),
    ],
)
def test_the_aliases_refuse_a_bad_setting_before_any_work(tmp_path, capsys, command, setting, message):
    out = tmp_path / "run"
    assert main([command, "--set", setting, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]
    assert not out.exists()
