"""The ``trainable_vs_posthoc`` recipe at ``smoke``: its tables (one row per test image x method x
backbone, the mean-mask baseline among them), summaries with 95% CIs, figures and report, and
settings it refuses before any work (a rerun's CSVs: test_determinism.py)."""

from __future__ import annotations

import pytest
from conftest import read_rows, smoke_refusal
from PIL import Image

from monai_sal_app.experiments.studies.trainable_vs_posthoc import BASELINE

RECIPE = "trainable_vs_posthoc"  # conftest's smoke_run and smoke_settings
HEADS = ("plain", "wildcat")  # each backbone with its own head, then with a WILDCAT head


def expected_methods(settings: dict) -> list[str]:
    """The rows' methods, in the study's order: the recipe's post-hoc methods on the plain model,
    WILDCAT's class maps as they are and with contrast, then the mean training mask."""
    return [*settings["methods"], "wildcat", "wildcat (contrast)", "baseline_mean_mask"]


@pytest.mark.e2e
def test_one_row_per_test_image_method_and_backbone_with_the_baseline(smoke_run, smoke_settings):
    settings = smoke_settings
    rows = read_rows(smoke_run / "results" / "localization.csv")
    assert list(rows[0]) == ["backbone", "head", "id", "method", "label", "probability", "auprc", "pointwise_hit"]
    test_ids = [row["id"] for row in read_rows(smoke_run / "work" / "data" / "test" / "manifest.csv")]
    assert len(test_ids) == 2 * settings["test_per_class"]
    methods = expected_methods(settings)
    assert [(row["backbone"], row["method"], row["id"]) for row in rows] == [
        (backbone, method, image) for backbone in settings["backbones"] for method in methods for image in test_ids
    ]
    for row in rows:
        assert row["head"] == (
            "none" if row["method"] == BASELINE else "wildcat" if "wildcat" in row["method"] else "plain"
        )
        assert 0 <= float(row["probability"]) <= 1
        if row["label"] == "1":  # an opacity: its map is scored against the mask
            assert 0 <= float(row["auprc"]) <= 1 and row["pointwise_hit"] in ("True", "False")
        else:
            assert row["label"] == "0" and row["auprc"] == "" and row["pointwise_hit"] == ""
    # the baseline is one map for every image: the same scores whatever the backbone
    baseline = {(row["id"], row["auprc"]) for row in rows if row["method"] == BASELINE}
    assert len(baseline) == len(test_ids)
    # the baseline is ranked by the plain model's probability
    plain = {(row["backbone"], row["id"]): row["probability"] for row in rows if row["method"] == "gradcam"}
    assert all(row["probability"] == plain[row["backbone"], row["id"]] for row in rows if row["method"] == BASELINE)


@pytest.mark.e2e
def test_summaries_detection_and_classification_tables(smoke_run, smoke_settings):
    settings = smoke_settings
    methods = expected_methods(settings)
    summary = read_rows(smoke_run / "results" / "localization_summary.csv")
    assert [(row["backbone"], row["method"]) for row in summary] == [
        (backbone, method) for backbone in settings["backbones"] for method in methods
    ]
    for row in summary:
        assert row["n"] == str(settings["test_per_class"])  # the opacity images, the ones with a mask
        for metric in ("auprc", "pointwise_hit"):  # two opacity images: an interval around the mean
            low, mean, high = (float(row[f"{metric}_{k}"]) for k in ("ci_low", "mean", "ci_high"))
            assert low <= mean <= high and 0 <= mean <= 1
    detection = read_rows(smoke_run / "results" / "detection.csv")
    assert [(row["backbone"], row["method"]) for row in detection] == [
        (row["backbone"], row["method"]) for row in summary
    ]
    assert all(0 <= float(row["pointwise_ap"]) <= 1 and 0 <= float(row["test_auc"]) <= 1 for row in detection)
    classification = read_rows(smoke_run / "results" / "classification.csv")
    assert [(row["backbone"], row["head"]) for row in classification] == [
        (backbone, head) for backbone in settings["backbones"] for head in HEADS
    ]
    auc = {(row["backbone"], row["head"]): row["test_auc"] for row in classification}
    for row in detection:
        assert row["test_auc"] == auc[row["backbone"], "plain" if row["head"] == "none" else row["head"]]
    assert all(row["n_test"] == str(2 * settings["test_per_class"]) for row in classification)


@pytest.mark.e2e
def test_figures_and_report(smoke_run):
    for figure in ("maps", "localization_by_method"):
        assert Image.open(smoke_run / "figures" / f"{figure}.png").format == "PNG"
    report = (smoke_run / "report.html").read_text()
    for title in ("Classification", "Localization", "Pointwise detection"):
        assert f"<h2>{title}</h2>" in report
    assert report.count("data:image/png;base64,") == 2 and BASELINE in report


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backbones": ["conv5fc3", "vgg16"]}, "unknown backbone 'vgg16'"),
        ({"backbones": []}, "backbones must be a non-empty list"),
        ({"methods": ["gradcam", "wildcat"]}, "wildcat is not a post-hoc method"),
        ({"methods": ["mask_generator"]}, "mask_generator is not a post-hoc method"),
        ({"method_params": {"occlusion": {"windw": 8}}}, "method_params.occlusion must map parameters of"),
        ({"method_params": {"smoothgrad": {"seed": 3}}}, "method_params.smoothgrad: seed is set per block"),
        ({"wildcat": {"kmax": 2.5}}, "kmax"),
        ({"input_size": 8}, "input_size must be an integer >= 16"),
        ({"figure_cases": 3}, "figure_cases (3) must not exceed test_per_class (2)"),
    ],
)
def test_settings_it_cannot_use_are_refused_before_any_work(tmp_path, changes, message):
    assert message in smoke_refusal(RECIPE, changes, tmp_path)
