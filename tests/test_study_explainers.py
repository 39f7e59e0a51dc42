"""The ``explainers`` recipe at ``smoke``: trained explainers against post-hoc maps on a few generated
chest X-rays (the base of scripts/install_data.sh), its tables, figures and report (a rerun's CSVs:
test_determinism.py)."""

from __future__ import annotations

import pytest
from conftest import read_rows, smoke_refusal
from PIL import Image

from monai_sal_app.experiments.studies.explainers import trained_kinds

RECIPE = "explainers"  # conftest's smoke_run and smoke_settings


@pytest.mark.e2e
def test_one_row_per_test_image_and_method_with_both_tta_variants(smoke_run, smoke_settings):
    settings = smoke_settings
    rows = read_rows(smoke_run / "results" / "explainers.csv")
    ious = [f"iou_p{p:g}" for p in settings["percentiles"]]
    assert list(rows[0]) == ["id", "method", "tta", "auprc", "partial_auprc", *ious]
    assert ious == ["iou_p80", "iou_p85", "iou_p90", "iou_p95", "iou_p98"]
    variants = [(method, "False") for method in settings["methods"]] + [("similarity_adversarial", "True")]
    ids = list(dict.fromkeys(row["id"] for row in rows))
    assert len(ids) == settings["test_per_class"]  # the opacity class's test images, the ones with a mask
    assert sorted((row["id"], row["method"], row["tta"]) for row in rows) == sorted(
        (i, method, tta) for i in ids for method, tta in variants
    )
    for row in rows:
        assert 0 <= float(row["partial_auprc"]) <= 0.5 and 0 <= float(row["auprc"]) <= 1
        assert all(0 <= float(row[key]) <= 1 for key in ious)

    summary = read_rows(smoke_run / "results" / "explainers_summary.csv")
    assert [(row["method"], row["tta"]) for row in summary] == variants
    for metric in ("auprc", "partial_auprc", *ious):
        assert {f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high"} <= set(summary[0])
    assert all(row["n"] == str(len(ids)) for row in summary)

    timing = read_rows(smoke_run / "results" / "timing.csv")
    assert [(row["id"], row["method"], row["tta"]) for row in timing] == [
        (row["id"], row["method"], row["tta"]) for row in rows
    ]
    assert all(float(row["seconds_per_map"]) > 0 for row in timing)
    timing_summary = read_rows(smoke_run / "results" / "timing_summary.csv")
    assert {"seconds_per_map_mean", "seconds_per_map_ci_low", "seconds_per_map_ci_high"} <= set(timing_summary[0])


@pytest.mark.e2e
def test_figures_report_and_the_models_it_trained(smoke_run, smoke_settings):
    for figure in ("maps", "iou_by_percentile"):
        assert Image.open(smoke_run / "figures" / f"{figure}.png").format == "PNG"
    report = (smoke_run / "report.html").read_text()
    assert "Localization and time per map" in report and "Models" in report
    assert report.count("data:image/png;base64,") == 4  # two figures and the two explainers' training curves
    assert "<th>test_flip_rate" in report and "<th>seconds_per_map" in report and "<th>iou_p98" in report
    kinds = trained_kinds(smoke_settings["methods"])
    assert kinds == ["mask_generator", "similarity_adversarial"]
    for kind in kinds:
        assert (smoke_run / "work" / f"classifier.{kind}.pt").is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ["gradient", "nope"]}, "unknown saliency method 'nope'"),
        ({"methods": []}, "methods must be a non-empty list"),
        ({"input_size": 40}, "input_size must be a multiple of 16"),
        ({"percentiles": [80, 101]}, "percentiles must be a non-empty list of distinct numbers in [0, 100]"),
        ({"explainer_per_class": 1}, "explainer_per_class must be an integer >= 2"),
        ({"mp_steps": 0}, "mp_steps must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, changes, message):
    assert message in smoke_refusal("explainers", changes, tmp_path)
