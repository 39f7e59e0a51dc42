"""The ``trainable_vs_posthoc`` recipe at ``smoke``: its tables (one row per test image x method x
backbone, the mean-mask baseline among them), summaries with 95% CIs, figures and report, the same
CSVs from a second run with the same seed, and settings it refuses before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import base_or_skip, read_rows, smoke_refusal
from PIL import Image

from monai_sal_app.data import bases
from monai_sal_app.experiments.runner import resolve_config, run_experiment
from monai_sal_app.experiments.studies.trainable_vs_posthoc import BASELINE, HEADS, explanations

NAME = "trainable_vs_posthoc"


def results_text(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "results").glob("*.csv"))}


def run_smoke(out: Path) -> Path:
    run_experiment(NAME, out, scale="smoke", progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    base_or_skip(bases.chest_radiograph_file)
    return run_smoke(tmp_path_factory.mktemp(NAME) / "run")


@pytest.fixture(scope="module")
def settings() -> dict:
    return resolve_config(NAME, "smoke")["settings"]


def expected_methods(settings: dict) -> list[str]:
    methods = [method + suffix for _, _, names, _, suffix in explanations(settings) for method in names]
    return [*methods, BASELINE]


def test_one_row_per_test_image_method_and_backbone_with_the_baseline(smoke_run, settings):
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


def test_summaries_detection_and_classification_tables(smoke_run, settings):
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


def test_figures_and_report(smoke_run):
    for figure in ("maps", "localization_by_method"):
        assert Image.open(smoke_run / "figures" / f"{figure}.png").format == "PNG"
    report = (smoke_run / "report.html").read_text()
    for title in ("Classification", "Localization", "Pointwise detection"):
        assert f"<h2>{title}</h2>" in report
    assert report.count("data:image/png;base64,") == 2 and BASELINE in report


def test_the_same_seed_gives_the_same_csvs(smoke_run, tmp_path):
    assert results_text(run_smoke(tmp_path / "again")) == results_text(smoke_run)


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
    assert message in smoke_refusal(NAME, changes, tmp_path)
