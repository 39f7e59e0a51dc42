"""The ``trust`` recipe at ``smoke``: the trustworthiness study's checks on a few generated chest
X-rays (the base of scripts/install_data.sh), its tables, figures and report (a rerun's CSVs:
test_determinism.py)."""

from __future__ import annotations

import re

import pytest
from conftest import read_rows, smoke_refusal
from PIL import Image

from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.experiments.studies.trust import QUESTION, RANDOMIZATION, RETRAINED, STUDY_EXPECTS

RECIPE = "trust"  # conftest's smoke_run and smoke_settings
CHECKS = (*RANDOMIZATION, *RETRAINED)
FIGURES = ("randomization_cascading", "randomization_independent", "cascading_maps_1", "cascading_maps_2")
# conv5-fc3's layers with weights, from the logits down: three fully connected layers, then five
# convolutions (each followed by its ReLU and pooling in the Sequential, hence the even indices)
CONV5FC3_BLOCKS = [f"classifier.{i}" for i in (6, 4, 2)] + [f"features.{i}" for i in (8, 6, 4, 2, 0)]


def conditions(settings: dict) -> dict[str, list[str]]:
    """What each check compares the reference model's maps with, at the smoke settings."""
    assert settings["architectures"][0] == "conv5fc3"  # the reference model, whose blocks are randomized
    return {
        "cascading": CONV5FC3_BLOCKS,
        "independent": CONV5FC3_BLOCKS,
        "label_randomization": ["label_randomized"],
        "repeatability": [f"replicate_{r}" for r in range(1, settings["replicates"])],
        "reproducibility": settings["architectures"][1:],
    }


@pytest.mark.e2e
def test_one_row_per_image_method_check_and_condition(smoke_run, smoke_settings):
    settings = smoke_settings
    rows = read_rows(smoke_run / "results" / "similarity.csv")
    assert list(rows[0]) == ["method", "check", "condition", "image", "ssim"]
    ids = list(dict.fromkeys(row["image"] for row in rows))
    masked = [item["id"] for item in read_manifest(smoke_run / "work/data/test/manifest.csv") if item["mask"]]
    assert ids == masked[: settings["images"]] and len(ids) == settings["images"]
    expected = [
        (method, check, condition, image)
        for method in settings["methods"]
        for check, compared in conditions(settings).items()
        for condition in compared
        for image in ids
    ]
    assert [(r["method"], r["check"], r["condition"], r["image"]) for r in rows] == expected
    assert all(-1 <= float(row["ssim"]) <= 1 for row in rows)

    summary = read_rows(smoke_run / "results" / "similarity_summary.csv")
    assert list(summary[0]) == ["method", "check", "condition", "n", "ssim_mean", "ssim_ci_low", "ssim_ci_high"]
    assert [(r["method"], r["check"], r["condition"]) for r in summary] == list(dict.fromkeys(e[:3] for e in expected))
    assert all(row["n"] == str(len(ids)) for row in summary)


@pytest.mark.e2e
def test_each_check_read_as_the_study_reads_it_and_as_the_trust_card_judges_it(smoke_run, smoke_settings):
    settings = smoke_settings
    verdicts = read_rows(smoke_run / "results" / "verdicts.csv")
    assert [(v["method"], v["check"]) for v in verdicts] == [(m, c) for m in settings["methods"] for c in CHECKS]
    rows = read_rows(smoke_run / "results" / "similarity.csv")
    for verdict in verdicts:
        low, mean, high = (float(verdict[f"band_{k}"]) for k in ("ci_low", "mean", "ci_high"))
        assert low <= mean <= high
        similarity = float(verdict["ssim"])
        assert verdict["study_reading"] == ("above the band" if similarity > high else "not above")
        assert verdict["study_expects"] == STUDY_EXPECTS[verdict["check"]]
        per_condition = {}
        for row in rows:
            if (row["method"], row["check"]) == (verdict["method"], verdict["check"]):
                per_condition.setdefault(row["condition"], []).append(float(row["ssim"]))
        means = [sum(values) / len(values) for values in per_condition.values()]
        assert similarity == pytest.approx(sum(means) / len(means))
        assert verdict["question"] == QUESTION[verdict["check"]] and verdict["why"]
        retrained = verdict["check"] in ("repeatability", "reproducibility")
        answers = ("yes", "partly", "no", "not assessable") if retrained else ("yes", "no", "unclear")
        assert verdict["answer"] in answers
    # smoke: 4 images explained for at most 2 classes, fewer than the 6 per class the answer needs
    assert all(v["answer"] == "unclear" for v in verdicts if v["check"] in (*RANDOMIZATION, "label_randomization"))
    for method in settings["methods"]:  # one band per method: the reference model's maps
        assert len({v["band_mean"] for v in verdicts if v["method"] == method}) == 1


@pytest.mark.e2e
def test_models_checkpoints_and_the_permuted_labels(smoke_run):
    models = read_rows(smoke_run / "results" / "models.csv")
    assert [(m["model"], m["architecture"], m["seed"], m["labels"]) for m in models] == [
        ("reference", "conv5fc3", "0", "true"),
        ("replicate_1", "conv5fc3", "1", "true"),
        ("resnet18", "resnet18", "0", "true"),
        ("label_randomized", "conv5fc3", "0", "permuted"),
    ]
    assert all(0 <= float(m["test_auc"]) <= 1 for m in models)
    for model in models:
        assert (smoke_run / "work" / "models" / f"{model['model']}.pt").is_file()
    train = read_manifest(smoke_run / "work/data/train/manifest.csv")
    permuted = read_manifest(smoke_run / "work/data/train/manifest_permuted_labels.csv")
    assert [i["image"] for i in permuted] == [i["image"] for i in train]
    assert sorted(i["label"] for i in permuted) == sorted(i["label"] for i in train)


@pytest.mark.e2e
def test_figures_and_the_report_with_coloured_verdicts(smoke_run):
    for figure in (*FIGURES, "retrained_models"):
        assert Image.open(smoke_run / "figures" / f"{figure}.png").format == "PNG"
    report = (smoke_run / "report.html").read_text()
    for title in ("<h2>Models</h2>", "<h2>Model randomization</h2>", "<h2>Retrained models</h2>"):
        assert title in report
    assert report.count("data:image/png;base64,") == len(FIGURES) + 1
    verdicts = read_rows(smoke_run / "results" / "verdicts.csv")
    for verdict in verdicts:  # the band's mean and CI in one cell
        low, mean, high = (float(verdict[f"band_{k}"]) for k in ("ci_low", "mean", "ci_high"))
        assert f"{mean:.3f} [{low:.3f}, {high:.3f}]" in report
    cells = re.findall(r'<td class="(yes|no|unclear)">([a-z ]+)</td>', report)
    in_sections = [v for v in verdicts if v["check"] in RANDOMIZATION] + [
        v for v in verdicts if v["check"] in RETRAINED
    ]
    assert [text for _, text in cells] == [v["answer"] for v in in_sections]
    assert all(css == (text if text in ("yes", "no") else "unclear") for css, text in cells)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ["gradient", "nope"]}, "unknown saliency method 'nope'"),
        ({"methods": ["gradient", "mask_generator"]}, "needs a trained explainer"),
        ({"architectures": ["conv5fc3", "vgg"]}, "unknown architecture 'vgg'"),
        ({"images": 4}, "images (4) must be at most test_per_class (3)"),
        ({"params": {"gradient": {"steps": 3}}}, "unknown parameter(s) ['steps'] for method 'gradient'"),
        ({"arch_kwargs": {"densenet121": {}}}, "arch_kwargs names architecture(s) ['densenet121']"),
        ({"metric": "dice"}, "unknown metric 'dice'"),
        ({"replicates": 0}, "replicates must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, changes, message):
    assert message in smoke_refusal("trust", changes, tmp_path)
