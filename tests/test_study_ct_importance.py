"""The ``ct_importance`` recipe at ``smoke`` (16^3 CT crops, one training epoch, every method): its
tables, figures and report, the ``--data``/``--model`` combinations it refuses before any work, and
the pieces it adds to the library (XRAI regions of any map, the rank agreement table). A rerun's
CSVs: test_determinism.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import read_rows, run_smoke
from PIL import Image
from scipy import stats
from server_fixtures import save_tiny_checkpoint
from source_fixtures import make_bundle, oblique_image

from monai_sal_app.data.io import write_nifti
from monai_sal_app.experiments.runner import ExperimentError, resolve_config
from monai_sal_app.experiments.studies.ct_importance import rank_tables
from monai_sal_app.saliency.xrai import attribution_regions, segment_membership_2d, xrai_segments

SECTIONS = ("Model", "Fidelity and localization per method", "Rankings", "Do fidelity and localization agree?")
RECIPE = "ct_importance"  # conftest's smoke_run and smoke_settings
RANKED = ("fidelity", "roc_auc", "xrai_dice_area")  # the scores the study ranks the methods by


@pytest.mark.e2e
def test_one_row_per_crop_and_method_with_scores_in_range(smoke_run, smoke_settings):
    settings = smoke_settings
    methods = settings["methods"]
    rows = read_rows(smoke_run / "results" / "ct_importance.csv")
    dice = [f"xrai_dice_p{100 * f:g}" for f in settings["region_fractions"]] + ["xrai_dice_area"]
    assert list(rows[0]) == ["id", "subtype", "method", "auc_mif", "auc_lif", "fidelity", "roc_auc", *dice]
    ids = sorted({row["id"] for row in rows})
    assert 1 <= len(ids) <= settings["test_per_class"]
    assert sorted((row["id"], row["method"]) for row in rows) == sorted((i, m) for i in ids for m in methods)
    # fractions perturbed 0, 0.25, 0.5, 0.75 (steps of 0.25 below 1): the areas span 0 to 0.75 of a probability
    assert settings["fraction_step"] == 0.25
    top = 0.75
    for row in rows:
        assert row["subtype"] in ("real", "synthetic")
        auc_mif, auc_lif, fidelity = (float(row[k]) for k in ("auc_mif", "auc_lif", "fidelity"))
        assert 0 <= auc_mif <= top and 0 <= auc_lif <= top
        assert fidelity == pytest.approx(auc_lif - auc_mif, abs=1e-12)
        for key in ("roc_auc", *dice):
            assert 0 <= float(row[key]) <= 1

    summary = read_rows(smoke_run / "results" / "ct_importance_summary.csv")
    assert [row["method"] for row in summary] == methods
    for row in summary:
        assert int(row["n"]) == len(ids)
        for metric in ("fidelity", "roc_auc", "xrai_dice_area"):
            assert {f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high"} <= set(row)
            mean = float(row[f"{metric}_mean"])
            per_image = [float(r[metric]) for r in rows if r["method"] == row["method"]]
            assert mean == pytest.approx(np.mean(per_image), abs=1e-12)


@pytest.mark.e2e
def test_ranks_and_their_agreement(smoke_run, smoke_settings):
    methods = smoke_settings["methods"]
    ranks = read_rows(smoke_run / "results" / "ranks.csv")
    assert [row["method"] for row in ranks] == methods
    summary = {row["method"]: row for row in read_rows(smoke_run / "results" / "ct_importance_summary.csv")}
    for score in RANKED:
        values = [float(row[score]) for row in ranks]
        assert values == [float(summary[m][f"{score}_mean"]) for m in methods]
        positions = [float(row[f"{score}_rank"]) for row in ranks]
        assert sum(positions) == pytest.approx(len(methods) * (len(methods) + 1) / 2)  # ties share average ranks
        np.testing.assert_allclose(positions, stats.rankdata(-np.array(values)))
    agreement = read_rows(smoke_run / "results" / "rank_agreement.csv")
    assert [(row["ranking"], row["against"]) for row in agreement] == [
        ("fidelity", "roc_auc"),
        ("fidelity", "xrai_dice_area"),
        ("roc_auc", "xrai_dice_area"),
    ]
    for row in agreement:
        assert int(row["methods"]) == len(methods) and row["same_best"] in ("True", "False")
        for key in ("spearman", "kendall"):
            value = float(row[key])
            assert math.isnan(value) or -1 <= value <= 1


@pytest.mark.e2e
def test_figures_report_and_data_hashes(smoke_run):
    for figure in ("maps", "fidelity_curves", "fidelity_vs_localization"):
        assert Image.open(smoke_run / "figures" / f"{figure}.png").format == "PNG"
    report = (smoke_run / "report.html").read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in report
    assert report.count("data:image/png;base64,") == 3
    assert (smoke_run / "data.json").read_text().count("files_sha256") == 2  # train and test


# ----------------------------------------------------------------------------- --data and --model


def tiny_manifest(folder: Path, labels=(0, 1)) -> Path:
    """A 3D manifest of 8^3 noise volumes, a cube mask on each lesion (label > 0)."""
    rng = np.random.default_rng(0)
    lines = ["id,image,label,mask"]
    for k, label in enumerate(labels):
        image = write_nifti(rng.random((8, 8, 8), dtype=np.float32), folder / f"img{k}.nii.gz")
        mask = ""
        if label:
            cube = np.zeros((8, 8, 8), np.uint8)
            cube[2:5, 2:5, 2:5] = 1
            mask = write_nifti(cube, folder / f"mask{k}.nii.gz")
        lines.append(f"case{k},{image},{label},{mask}")
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("dims", "labels", "message"),
    [(2, (0, 1), "a 2D model, but the data's images are 3D"), (3, (0, 2), "has label 2")],
    ids=["dimension", "classes"],
)
def test_a_checkpoint_that_does_not_fit_the_data_is_refused_before_any_work(tmp_path, dims, labels, message):
    manifest = tiny_manifest(tmp_path, labels)
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt", dims)
    with pytest.raises(ExperimentError, match=message):
        run_smoke(RECIPE, tmp_path / "out", data=manifest, models=[checkpoint])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("with_data", "dims", "message"),
    [(True, None, "--data needs --model"), (False, 2, "a 2D model; ct_importance needs a 3D one")],
    ids=["data-without-model", "2d-model"],
)
def test_combinations_the_study_cannot_use_are_refused_before_anything_is_written(tmp_path, with_data, dims, message):
    data = tiny_manifest(tmp_path) if with_data else None
    models = [save_tiny_checkpoint(tmp_path / "tiny.pt", dims)] if dims else []
    with pytest.raises(ExperimentError, match=message):
        run_smoke(RECIPE, tmp_path / "out", data=data, models=models)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ["gradient", "wildcat"]}, "needs a trained explainer or a WILDCAT head"),
        ({"params": {"smoothgrad": {"seed": 3}}}, "seed is set per block"),
        ({"params": {"occlusion": {"steps": 3}}}, r"params.occlusion: unknown parameter\(s\) \['steps'\]"),
        ({"fraction_step": 0.7}, "fraction_step must be a number in"),
        ({"score": "auc"}, "score must be one of"),
    ],
)
def test_settings_the_study_cannot_use_are_refused(tmp_path, changes, message):
    import yaml

    from monai_sal_app.experiments.runner import config_folder

    raw = yaml.safe_load((config_folder() / "ct_importance.yaml").read_text())
    raw["scales"]["smoke"].update(changes)
    path = tmp_path / "ct.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ExperimentError, match=message):
        resolve_config(path, "smoke")


# ----------------------------------------------------------------------------- library pieces


def test_rank_tables_rank_each_score_and_correlate_the_rankings():
    means = {"fidelity": [0.3, 0.1, 0.2, 0.0], "roc_auc": [0.6, 0.9, 0.7, 0.8], "xrai_dice_area": [0.4, 0.3, 0.2, 0.1]}
    summary = [
        {"method": m, **{f"{score}_mean": values[i] for score, values in means.items()}} for i, m in enumerate("abcd")
    ]
    ranks, agreement = rank_tables(summary)
    assert [row["fidelity_rank"] for row in ranks] == [1.0, 3.0, 2.0, 4.0]
    assert [row["roc_auc_rank"] for row in ranks] == [4.0, 1.0, 3.0, 2.0]
    fidelity_roc = agreement[0]
    assert fidelity_roc["spearman"] == pytest.approx(stats.spearmanr(means["fidelity"], means["roc_auc"])[0])
    assert fidelity_roc["kendall"] == pytest.approx(stats.kendalltau(means["fidelity"], means["roc_auc"])[0])
    assert not fidelity_roc["same_best"] and agreement[1]["same_best"]
    _, short = rank_tables(summary[:2])
    assert all(math.isnan(row["spearman"]) and math.isnan(row["kendall"]) for row in short)


def test_attribution_regions_rank_the_segments_of_any_map_by_their_mean():
    # two disjoint segments covering a 1 x 10 strip: the one with the higher mean attribution first
    membership = sp.csr_matrix(np.array([[1] * 4 + [0] * 6, [0] * 4 + [1] * 6], dtype=float))
    attribution = np.array([0.1] * 4 + [0.5] * 6).reshape(1, 10)
    xrai_map, regions = attribution_regions(attribution, membership, min_pixel_diff=1)
    np.testing.assert_array_equal(regions.ranks, [[2] * 4 + [1] * 6])
    np.testing.assert_allclose(regions.gains, [0.5, 0.1])
    np.testing.assert_allclose(xrai_map, regions.gains[regions.ranks - 1])

    image = np.random.default_rng(0).random((1, 24, 24))
    expected = segment_membership_2d(image, scales=(50, 100), dilation_px=2)
    ours = xrai_segments(image, scales=(50, 100), dilation_px=2, steps=3)  # steps: xrai's, unused here
    assert (ours != expected).nnz == 0
    with pytest.raises(ValueError, match="unknown parameter"):
        xrai_segments(image, window=3)


@pytest.mark.e2e
def test_a_bundle_is_scored_on_your_data_through_its_own_preprocessing(tmp_path):
    """``--model`` a MONAI bundle folder: its masks follow the bundle's Orientation, Spacing and
    Resize onto its 16^3 input grid, and every crop with a lesion gets a row per method."""
    bundle = make_bundle(tmp_path / "bundle", 3)
    lines = ["id,image,label,mask"]
    for k, label in enumerate((0, 1, 1)):
        image, affine = oblique_image(tmp_path / f"img{k}.nii.gz", 3, seed=k)
        mask = ""
        if label:
            cube = np.zeros((20, 18, 17), np.uint8)
            cube[5:13, 4:12, 4:11] = 1
            mask = write_nifti(cube, tmp_path / f"mask{k}.nii.gz", affine=affine)
        lines.append(f"case{k},{image},{label},{mask}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = run_smoke(RECIPE, tmp_path / "out", data=manifest, models=[bundle])
    rows = read_rows(out / "results" / "ct_importance.csv")
    assert {row["id"] for row in rows} == {"case1", "case2"}
    assert all(0.0 <= float(row["roc_auc"]) <= 1.0 for row in rows)
