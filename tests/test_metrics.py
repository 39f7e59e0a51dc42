"""metrics: localization metrics against sklearn and plain reference formulas; stats and tables."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import modules_loaded_by
from scipy import ndimage
from scipy import stats as scipy_stats
from sklearn.metrics import auc as sklearn_auc
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    jaccard_score,
    precision_recall_curve,
    roc_auc_score,
)
from sklearn.metrics import roc_curve as sklearn_roc_curve

from monai_sal_app.metrics import (
    DEFAULT_PERCENTILES,
    auprc,
    auprc_trapezoid,
    bootstrap_ci,
    hard_dice,
    iou_at_percentiles,
    localization_metrics,
    mask_metrics,
    mean_ci,
    mean_mask_baseline,
    minmax,
    partial_auprc,
    pointwise_average_precision,
    pointwise_hit,
    regions_from_map,
    roc_auc,
    roc_curve,
    soft_dice,
    summarize,
    to_markdown,
    top_regions_mask,
    write_csv,
    xrai_region_dice,
)


def make_case(shape: tuple[int, ...], seed: int, levels: int | None = None, dtype=np.float64):
    """A map that partly highlights a blob mask: smooth noise + signal, optionally quantised to
    ``levels`` grey levels (many ties). Returns ``(saliency, mask)``."""
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2) > 0.15
    saliency = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1) + 0.3 * mask
    if levels is not None:
        saliency = np.round((saliency - saliency.min()) / np.ptp(saliency) * (levels - 1))
    return saliency.astype(dtype), mask


CASES = {
    "2d_continuous": dict(shape=(48, 48), seed=0),
    "2d_quantised": dict(shape=(48, 48), seed=1, levels=6),
    "3d_continuous": dict(shape=(20, 24, 24), seed=2),
    "3d_quantised": dict(shape=(20, 24, 24), seed=3, levels=12),
    "2d_float32": dict(shape=(40, 40), seed=4, dtype=np.float32),
    "3d_binary_map": dict(shape=(16, 16, 16), seed=5, levels=2),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    saliency, mask = make_case(**CASES[request.param])
    assert 0 < mask.sum() < mask.size
    return saliency, mask


def reference_dice(binary: np.ndarray, mask: np.ndarray) -> float:
    return 2 * np.logical_and(binary, mask).sum() / (binary.sum() + mask.sum())


def reference_iou(binary: np.ndarray, mask: np.ndarray) -> float:
    return np.logical_and(binary, mask).sum() / np.logical_or(binary, mask).sum()


def reference_area_binary(saliency: np.ndarray, mask: np.ndarray) -> np.ndarray:
    k = int(mask.sum())
    kth_largest = np.sort(saliency.astype(np.float64).ravel())[::-1][k - 1]
    return saliency >= kth_largest


# ---------------------------------------------------------------------------------------------
# ranking metrics
# ---------------------------------------------------------------------------------------------


def test_roc_auc_and_auprc_equal_sklearn(case):
    saliency, mask = case
    labels, scores = mask.ravel(), saliency.ravel()
    assert roc_auc(saliency, mask) == pytest.approx(roc_auc_score(labels, scores), abs=1e-10)
    assert auprc(saliency, mask) == pytest.approx(average_precision_score(labels, scores), abs=1e-10)


def test_quantised_maps_really_have_ties():
    saliency, _ = make_case(**CASES["3d_quantised"])
    assert np.unique(saliency).size <= 12


@pytest.mark.parametrize("shape", [(32, 32), (12, 16, 16)])
def test_perfect_and_inverted_maps(shape):
    _, mask = make_case(shape, seed=6)
    perfect = mask.astype(np.float64) + 0.01 * np.random.default_rng(0).random(shape)
    assert roc_auc(perfect, mask) == 1.0
    assert auprc(perfect, mask) == 1.0
    assert roc_auc(-perfect, mask) == 0.0
    assert auprc(-perfect, mask) == pytest.approx(average_precision_score(mask.ravel(), -perfect.ravel()), abs=1e-10)


def test_constant_map_gives_chance_auc_and_prevalence():
    _, mask = make_case((32, 32), seed=7)
    constant = np.full(mask.shape, 3.0)
    assert roc_auc(constant, mask) == 0.5
    assert auprc(constant, mask) == pytest.approx(mask.mean(), abs=1e-12)


def test_leading_singleton_dims_are_squeezed():
    saliency, mask = make_case((24, 24), seed=8)
    expected = roc_auc_score(mask.ravel(), saliency.ravel())
    assert roc_auc(saliency[None], mask) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(saliency, mask[None, None]) == pytest.approx(expected, abs=1e-12)
    assert localization_metrics(saliency[None], mask.astype(np.uint8)) == localization_metrics(saliency, mask)


def reference_partial_auprc(saliency: np.ndarray, mask: np.ndarray, max_recall: float) -> float:
    """sum_i (min(R_i, r) - min(R_{i-1}, r)) P_i from sklearn's precision-recall curve."""
    precision, recall, _ = precision_recall_curve(mask.ravel(), saliency.ravel())
    precision, recall = precision[::-1], recall[::-1]  # ascending recall, starting at R_0 = 0
    clipped = np.minimum(recall, max_recall)
    return float(np.sum(np.diff(clipped) * precision[1:]))


@pytest.mark.parametrize("max_recall", [0.1, 0.25, 0.5, 0.9])
def test_partial_auprc_matches_reference(case, max_recall):
    saliency, mask = case
    expected = reference_partial_auprc(saliency, mask, max_recall)
    assert partial_auprc(saliency, mask, max_recall) == pytest.approx(expected, abs=1e-10)


def test_partial_auprc_full_recall_equals_auprc_and_is_monotone(case):
    saliency, mask = case
    assert partial_auprc(saliency, mask, max_recall=1.0) == pytest.approx(auprc(saliency, mask), abs=1e-12)
    values = [partial_auprc(saliency, mask, r) for r in np.linspace(0.05, 1.0, 20)]
    assert np.all(np.diff(values) >= -1e-15)
    assert values[0] < values[-1]


def test_partial_auprc_of_perfect_map_is_max_recall_and_checks_range():
    _, mask = make_case((32, 32), seed=9)
    assert partial_auprc(mask.astype(float), mask, 0.5) == pytest.approx(0.5, abs=1e-12)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_recall"):
            partial_auprc(mask.astype(float), mask, bad)


# ---------------------------------------------------------------------------------------------
# overlap metrics
# ---------------------------------------------------------------------------------------------


def test_minmax_scales_to_unit_range_and_zeroes_constant_maps():
    saliency, _ = make_case((16, 20), seed=10)
    scaled = minmax(saliency)
    expected = (saliency - saliency.min()) / (saliency.max() - saliency.min())
    np.testing.assert_allclose(scaled, expected, rtol=0, atol=1e-15)
    assert scaled.shape == saliency.shape and scaled.min() == 0.0 and scaled.max() == 1.0
    assert np.array_equal(minmax(np.full((4, 5), -2.5)), np.zeros((4, 5)))


def test_soft_dice_matches_reference(case):
    saliency, mask = case
    s = saliency.astype(np.float64)
    scaled = (s - s.min()) / (s.max() - s.min())
    expected = 2 * (scaled * mask).sum() / (scaled.sum() + mask.sum())
    assert soft_dice(saliency, mask) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("percentile", [50, 80, 95, 99, 100])
def test_hard_dice_at_percentile_matches_reference_and_f1(case, percentile):
    saliency, mask = case
    binary = saliency >= np.percentile(saliency.astype(np.float64), percentile)
    got = hard_dice(saliency, mask, percentile)
    assert got == pytest.approx(reference_dice(binary, mask), abs=1e-12)
    assert got == pytest.approx(f1_score(mask.ravel(), binary.ravel()), abs=1e-12)


def test_hard_dice_at_mask_area_matches_reference_and_f1(case):
    saliency, mask = case
    binary = reference_area_binary(saliency, mask)
    got = hard_dice(saliency, mask)
    assert got == pytest.approx(reference_dice(binary, mask), abs=1e-12)
    assert got == pytest.approx(f1_score(mask.ravel(), binary.ravel()), abs=1e-12)


def test_hard_dice_at_mask_area_keeps_k_pixels_and_includes_ties():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :3] = True  # k = 3
    distinct = np.arange(16, dtype=float)[::-1].reshape(4, 4)  # top 3 are mask[0, :3]
    assert hard_dice(distinct, mask) == 1.0
    tied = np.zeros((4, 4))
    tied[0, :2] = 2.0
    tied[0, 2:] = 1.0  # the 3rd largest (1.0) is tied with mask-outside pixel [0, 3]
    # binary map = 4 pixels (ties included): Dice = 2 * 3 / (4 + 3)
    assert hard_dice(tied, mask) == pytest.approx(6 / 7, abs=1e-15)


def test_roc_curve_is_sklearn_roc_curve_and_its_area_roc_auc(case):
    saliency, mask = case
    fpr, tpr, thresholds = roc_curve(saliency, mask)
    ref_fpr, ref_tpr, ref_thresholds = sklearn_roc_curve(mask.ravel(), saliency.ravel(), drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    np.testing.assert_allclose(thresholds[1:], ref_thresholds[1:])
    assert thresholds[0] == np.inf
    assert np.trapz(tpr, fpr) == pytest.approx(roc_auc(saliency, mask), abs=1e-10)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3, 0.7, 5.0])
def test_hard_dice_at_a_map_value_threshold_matches_reference(case, threshold):
    saliency, mask = case
    scaled = minmax(saliency)  # thresholds across the map's range, whatever its unit
    binary = scaled >= threshold
    expected = reference_dice(binary, mask)
    assert hard_dice(scaled, mask, threshold=threshold) == pytest.approx(expected, abs=1e-12)


def test_hard_dice_takes_a_percentile_or_a_threshold_not_both():
    saliency, mask = make_case((16, 16), seed=11)
    with pytest.raises(ValueError, match="not both"):
        hard_dice(saliency, mask, 50, threshold=0.1)
    with pytest.raises(ValueError, match="finite"):
        hard_dice(saliency, mask, threshold=float("nan"))


def test_hard_dice_rejects_percentile_out_of_range():
    saliency, mask = make_case((16, 16), seed=11)
    with pytest.raises(ValueError, match="percentile"):
        hard_dice(saliency, mask, 101)


def test_iou_at_percentiles_matches_reference_and_jaccard(case):
    saliency, mask = case
    got = iou_at_percentiles(saliency, mask)
    assert list(got) == [f"iou_p{p}" for p in DEFAULT_PERCENTILES]
    for p in DEFAULT_PERCENTILES:
        binary = saliency >= np.percentile(saliency.astype(np.float64), p)
        assert got[f"iou_p{p}"] == pytest.approx(reference_iou(binary, mask), abs=1e-12)
        assert got[f"iou_p{p}"] == pytest.approx(jaccard_score(mask.ravel(), binary.ravel()), abs=1e-12)
    assert list(iou_at_percentiles(saliency, mask, (97.5, 50))) == ["iou_p97.5", "iou_p50"]


def test_auprc_trapezoid_is_sklearn_precision_recall_curve_then_auc(case):
    saliency, mask = case
    precision, recall, _ = precision_recall_curve(mask.ravel(), saliency.ravel().astype(np.float64))
    assert auprc_trapezoid(saliency, mask) == pytest.approx(sklearn_auc(recall, precision), abs=1e-12)


def test_localization_metrics_is_flat_ordered_json_and_consistent(case):
    saliency, mask = case
    metrics = localization_metrics(saliency, mask)
    ious = [f"iou_p{p}" for p in DEFAULT_PERCENTILES]
    expected_keys = ["roc_auc", "auprc", "auprc_trapezoid", "soft_dice", "dice_area", "dice_p95", *ious]
    assert list(metrics) == expected_keys
    assert all(type(value) is float for value in metrics.values())
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["roc_auc"] == roc_auc(saliency, mask)
    assert metrics["auprc"] == auprc(saliency, mask)
    assert metrics["auprc_trapezoid"] == auprc_trapezoid(saliency, mask)
    assert metrics["soft_dice"] == soft_dice(saliency, mask)
    assert metrics["dice_area"] == hard_dice(saliency, mask)
    assert metrics["dice_p95"] == hard_dice(saliency, mask, 95)
    iou = iou_at_percentiles(saliency, mask)
    assert all(metrics[key] == iou[key] for key in iou)


def test_mean_mask_baseline_is_the_voxelwise_mean():
    masks = [make_case((12, 14, 14), seed=s)[1] for s in range(1, 6)]
    masks.append(np.zeros((12, 14, 14), dtype=np.uint8))  # a negative training image
    assert all(m.any() for m in masks[:-1])
    baseline = mean_mask_baseline(masks)
    np.testing.assert_allclose(baseline, np.mean(np.stack(masks).astype(float), axis=0), atol=1e-15)
    np.testing.assert_array_equal(mean_mask_baseline(np.stack(masks)), baseline)
    test_mask = make_case((12, 14, 14), seed=99)[1]
    assert roc_auc(baseline, test_mask) == pytest.approx(roc_auc_score(test_mask.ravel(), baseline.ravel()), abs=1e-10)
    with pytest.raises(ValueError, match="same shape"):
        mean_mask_baseline([masks[0], masks[0][:-1]])
    with pytest.raises(ValueError, match="empty"):
        mean_mask_baseline([])
    with pytest.raises(ValueError, match="only 0 and 1"):
        mean_mask_baseline([masks[0] * 2.0])


# ---------------------------------------------------------------------------------------------
# input errors
# ---------------------------------------------------------------------------------------------

ALL_METRICS = [roc_auc, auprc, partial_auprc, soft_dice, hard_dice, iou_at_percentiles, localization_metrics]


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
def test_empty_and_full_masks_are_rejected(metric):
    saliency, _ = make_case((16, 16), seed=12)
    with pytest.raises(ValueError, match="mask is empty"):
        metric(saliency, np.zeros((16, 16), dtype=bool))
    with pytest.raises(ValueError, match="mask covers the whole image"):
        metric(saliency, np.ones((16, 16)))


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
def test_shape_mismatch_names_both_shapes(metric):
    saliency, mask = make_case((16, 16), seed=13)
    with pytest.raises(ValueError, match=r"\(16, 15\).*\(16, 16\)"):
        metric(saliency[:, :15], mask)
    with pytest.raises(ValueError, match=r"\(16, 16, 1\).*\(16, 16\)"):
        metric(saliency[..., None], mask)  # only leading singleton dims are dropped


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
def test_non_finite_maps_are_rejected(metric):
    saliency, mask = make_case((16, 16), seed=14)
    with_nan = saliency.copy()
    with_nan[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metric(with_nan, mask)
    with_inf = saliency.copy()
    with_inf[3, 4] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        metric(with_inf, mask)


def test_bad_mask_and_map_types_are_rejected():
    saliency, mask = make_case((16, 16), seed=15)
    with pytest.raises(ValueError, match="only 0 and 1"):
        roc_auc(saliency, mask * 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        roc_auc(saliency, np.where(mask, np.nan, 0.0))
    with pytest.raises(TypeError, match="dtype"):
        roc_auc(saliency.astype(complex), mask)
    with pytest.raises(ValueError, match="NaN"):
        minmax(np.array([1.0, np.nan]))


# ---------------------------------------------------------------------------------------------
# stats and tables
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_mean_ci_matches_scipy_t_interval(confidence):
    values = np.array([0.61, 0.72, 0.55, 0.80, 0.67, 0.74, 0.59])
    low, high = scipy_stats.t.interval(confidence, values.size - 1, loc=values.mean(), scale=scipy_stats.sem(values))
    mean, ci_low, ci_high = mean_ci(list(values) + [np.nan, None], confidence)
    assert mean == pytest.approx(values.mean(), abs=1e-15)
    assert (ci_low, ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert all(type(v) is float for v in (mean, ci_low, ci_high))


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    values = np.random.default_rng(0).beta(2, 8, size=30)  # skewed, in [0, 1], like a share
    mean, low, high = bootstrap_ci(list(values) + [np.nan, None], n_resamples=20000, seed=1)
    reference = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=20000, method="percentile", random_state=np.random.default_rng(2)
    ).confidence_interval
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(reference.low, abs=0.005) and high == pytest.approx(reference.high, abs=0.005)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci([0.4])[0] == 0.4 and np.isnan(bootstrap_ci([0.4])[1:]).all()
    assert np.isnan(bootstrap_ci([])).all()
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(values, n_resamples=10)


def test_mean_ci_edge_cases():
    assert mean_ci([0.3])[0] == 0.3 and np.isnan(mean_ci([0.3])[1:]).all()
    assert np.isnan(mean_ci([])).all()
    assert np.isnan(mean_ci([np.nan, np.nan])).all()
    assert mean_ci([0.25, 0.25, 0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


ROWS = [
    {"method": "gradcam", "data": "2d", "image": "a", "roc_auc": 0.8, "dice": 0.5, "hit": True},
    {"method": "gradcam", "data": "2d", "image": "b", "roc_auc": 0.7, "dice": None, "hit": False},
    {"method": "gradient", "data": "2d", "image": "a", "roc_auc": 0.6, "dice": 0.2, "hit": True},
    {"method": "gradcam", "data": "3d", "image": "c", "roc_auc": 0.9, "dice": 0.4, "hit": True},
    {"method": "gradient", "data": "2d", "image": "b", "roc_auc": 0.5, "dice": 0.3, "hit": False},
]


def test_summarize_groups_in_order_with_mean_ci():
    summary = summarize(ROWS, "method")
    assert [row["method"] for row in summary] == ["gradcam", "gradient"]
    gradcam = summary[0]
    assert list(gradcam) == [
        "method",
        "n",
        "roc_auc_mean",
        "roc_auc_ci_low",
        "roc_auc_ci_high",
        "dice_mean",
        "dice_ci_low",
        "dice_ci_high",
    ]  # strings ("data", "image") and bools ("hit") are not metrics
    assert gradcam["n"] == 3
    assert (gradcam["roc_auc_mean"], gradcam["roc_auc_ci_low"], gradcam["roc_auc_ci_high"]) == mean_ci([0.8, 0.7, 0.9])
    assert (gradcam["dice_mean"], gradcam["dice_ci_low"], gradcam["dice_ci_high"]) == mean_ci([0.5, 0.4])


def test_summarize_by_several_keys_and_chosen_metrics():
    summary = summarize(ROWS, ("method", "data"), metrics=["roc_auc", "hit"])
    assert [(row["method"], row["data"], row["n"]) for row in summary] == [
        ("gradcam", "2d", 2),
        ("gradient", "2d", 2),
        ("gradcam", "3d", 1),
    ]
    assert summary[0]["hit_mean"] == 0.5
    assert summary[2]["roc_auc_mean"] == 0.9 and np.isnan(summary[2]["roc_auc_ci_low"])
    with pytest.raises(ValueError, match="'model'"):
        summarize(ROWS, "model")
    with pytest.raises(TypeError, match="'image'"):
        summarize(ROWS, "method", metrics=["image"])


def test_to_markdown_table():
    rows = [
        {"method": "grad|cam", "n": 3, "auc": 0.81234},
        {"method": "gradient", "n": 2, "auc": float("nan"), "note": "x"},
    ]
    lines = to_markdown(rows).splitlines()
    assert lines == [
        "| method | n | auc | note |",
        "|---|---:|---:|---|",
        "| grad\\|cam | 3 | 0.812 |  |",
        "| gradient | 2 | nan | x |",
    ]
    assert "| 0.81 |" in to_markdown(rows, floatfmt=".2f")
    with pytest.raises(ValueError, match="no rows"):
        to_markdown([])


def test_write_csv_creates_missing_folders(tmp_path):
    rows = [{"method": "gradcam", "auc": 0.5}]
    nested = write_csv(rows, tmp_path / "a" / "b" / "table.csv")
    assert list(csv.DictReader(Path(nested).read_text().splitlines())) == [{"method": "gradcam", "auc": "0.5"}]


def test_write_csv_round_trips_and_replaces_atomically(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old content\n")
    rows = [{"method": "gradcam", "auc": np.float64(0.1) + np.float64(0.2)}, {"method": "gradient", "n": np.int64(4)}]
    assert write_csv(rows, path) == path
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert read == [
        {"method": "gradcam", "auc": repr(0.1 + 0.2), "n": ""},
        {"method": "gradient", "auc": "", "n": "4"},
    ]
    assert float(read[0]["auc"]) == 0.1 + 0.2
    assert os.listdir(tmp_path) == ["table.csv"]  # no temporary file left behind
    with pytest.raises(ValueError, match="no rows"):
        write_csv([], path)
    assert os.listdir(tmp_path) == ["table.csv"]


# ---------------------------------------------------------------------------------------------
# import hygiene
# ---------------------------------------------------------------------------------------------


def test_metrics_import_pulls_neither_torch_nor_sklearn():
    assert modules_loaded_by("monai_sal_app.metrics", ["torch", "sklearn"]) == []


# ----------------------------------------------------------------------------- pointwise localization


def test_pointwise_hit_on_hand_made_maps():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:4, 3:6] = True
    saliency = np.zeros((10, 12))
    saliency[3, 4] = 1.0
    assert pointwise_hit(saliency, mask)
    saliency[3, 4], saliency[3, 8] = 0.0, 1.0  # 3 pixels right of the mask's edge (column 5)
    assert not pointwise_hit(saliency, mask)
    assert not pointwise_hit(saliency, mask, tolerance=2.9) and pointwise_hit(saliency, mask, tolerance=3.0)
    assert not pointwise_hit(saliency, np.zeros_like(mask))  # a negative image has nothing to hit
    volume, box = np.zeros((6, 6, 6)), np.zeros((6, 6, 6), dtype=np.uint8)
    volume[1, 2, 3], box[1, 2, 3] = 5.0, 1
    assert pointwise_hit(volume[None], box)  # (1, D, H, W) as explain returns, 3D
    with pytest.raises(ValueError, match="does not match"):
        pointwise_hit(saliency, mask[:5])


def test_pointwise_average_precision_counts_images_with_the_class():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, 1, 0, 1, 0]
    hits = [True, False, True, True, False]
    # ranked: TP (P@1 = 1), FP (missed localization), FP (no class), TP (P@4 = 2/4), FP; 3 images have the class
    assert pointwise_average_precision(scores, hits, labels) == pytest.approx((1 + 2 / 4) / 3)
    assert pointwise_average_precision(scores, [True] * 5, [1] * 5) == 1.0
    with pytest.raises(ValueError, match="no image contains the class"):
        pointwise_average_precision(scores, hits, [0] * 5)
    with pytest.raises(ValueError, match="same length"):
        pointwise_average_precision(scores, hits[:4], labels)


# ----------------------------------------------------------------------------- XRAI regions


def test_mask_metrics_is_threshold_dice_then_localization_then_xrai_regions():
    saliency, mask = make_case((24, 24), seed=6, levels=5)
    plain = mask_metrics(saliency, mask)
    assert plain == localization_metrics(saliency, mask)
    full = mask_metrics(saliency, mask, xrai=True, threshold=2.0)
    assert list(full) == ["dice_threshold", *plain, *xrai_region_dice(regions_from_map(saliency), mask)]
    assert full["dice_threshold"] == hard_dice(saliency, mask, threshold=2.0)


def test_regions_from_map_ranks_constant_regions_by_value():
    region_map = np.array([[0.5, 0.5, -1.0], [2.0, 2.0, 0.5], [-1.0, 0.0, 0.0]], dtype=np.float32)
    ranks = regions_from_map(region_map)
    np.testing.assert_array_equal(ranks, [[2, 2, 4], [1, 1, 2], [4, 3, 3]])
    assert ranks.dtype.kind == "i"
    mask = region_map >= 0.5
    assert xrai_region_dice(ranks, mask, fractions=(2 / 9,))["xrai_dice_p22.2222"] == pytest.approx(2 * 2 / (2 + 5))
    assert xrai_region_dice(ranks, mask)["xrai_dice_area"] == 1.0  # the top 5/9 of the map is the mask
    with pytest.raises(ValueError, match="NaN"):
        regions_from_map(np.array([[np.nan, 1.0]]))


def test_xrai_region_dice_on_hand_made_regions():
    ranks = np.array([[1, 1, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4], [4, 4, 4, 4]])  # areas 2, 2, 4, 8 of 16
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True  # exactly region 1
    assert top_regions_mask(ranks, 0.1).sum() == 2 and top_regions_mask(ranks, 0.2).sum() == 4
    assert top_regions_mask(ranks, 0).sum() == 0 and top_regions_mask(ranks, 1).all()
    dice = xrai_region_dice(ranks, mask, fractions=(0.1, 0.25, 0.5))
    assert dice == {
        "xrai_dice_p10": 1.0,  # region 1 alone: the mask
        "xrai_dice_p25": pytest.approx(2 * 2 / (4 + 2)),  # regions 1-2
        "xrai_dice_p50": pytest.approx(2 * 2 / (8 + 2)),  # regions 1-3
        "xrai_dice_area": 1.0,  # the mask covers 1/8: region 1
    }
    with pytest.raises(ValueError, match="ranks 1, 2"):
        xrai_region_dice(ranks - 1, mask)
    with pytest.raises(ValueError, match="no foreground"):
        xrai_region_dice(ranks, np.zeros_like(mask))
