"""Map similarity against independent implementations (scikit-image SSIM and HOG, scipy Spearman)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats
from skimage.feature import hog
from skimage.metrics import structural_similarity

from monai_sal_app.metrics import similarity as similarity_module
from monai_sal_app.metrics.similarity import (
    SIMILARITY_METRICS,
    RetentionReference,
    constant_maps,
    hog_features,
    hog_spearman,
    pearson,
    random_pair_baseline,
    ranks,
    retention_share,
    similarity,
    spearman,
    spearman_abs,
    ssim,
)


def smooth_maps(n: int, shape: tuple[int, ...], seed: int, sigma: float = 2.0) -> np.ndarray:
    """n smooth signed random maps (n, *shape), quantised so that ties occur in the rankings."""
    rng = np.random.default_rng(seed)
    maps = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(n)])
    return np.round(maps * 50) / 50


def minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


@pytest.mark.parametrize("shape", [(32, 40), (12, 16, 20)], ids=["2d", "3d"])
def test_ssim_matches_scikit_image(shape):
    a = smooth_maps(4, shape, seed=0)
    b = a + 0.3 * smooth_maps(4, shape, seed=1, sigma=1.0)
    ours = ssim(a, b)
    reference = [structural_similarity(minmax(x), minmax(y), data_range=1.0) for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ssim(a, a), 1.0)


def test_spearman_and_pearson_match_scipy():
    a, b = smooth_maps(5, (24, 24), seed=2), smooth_maps(5, (24, 24), seed=3)
    b[:2] = a[:2] + 0.2 * b[:2]  # some pairs alike, some not
    np.testing.assert_allclose(spearman(a, b), [stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)])
    np.testing.assert_allclose(
        spearman_abs(a, b), [stats.spearmanr(np.abs(x).ravel(), np.abs(y).ravel())[0] for x, y in zip(a, b)]
    )
    np.testing.assert_allclose(pearson(a, b), [stats.pearsonr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)])
    assert spearman(a, b)[0] > 0.8 and abs(spearman(a, b)[4]) < 0.5


def test_sign_matters_to_spearman_and_not_to_spearman_abs():
    a = smooth_maps(3, (20, 20), seed=4)
    np.testing.assert_allclose(spearman(a, -a), -1.0)
    np.testing.assert_allclose(spearman_abs(a, -a), 1.0)


@pytest.mark.parametrize("shape", [(32, 32), (3, 24, 32)], ids=["2d", "3d-slicewise"])
def test_hog_spearman_matches_scikit_image_hog(shape, monkeypatch):
    a, b = smooth_maps(3, shape, seed=5), smooth_maps(3, shape, seed=6)
    monkeypatch.setattr(similarity_module, "_HOG_CHUNK_PIXELS", 2 * shape[-1] * shape[-2])  # 2 slices at a time

    def features(x):
        slices = minmax(x).reshape(-1, *shape[-2:])
        return np.concatenate([hog(s, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2)) for s in slices])

    expected = [stats.spearmanr(features(x), features(y))[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(hog_spearman(a, b), expected, rtol=1e-10)
    np.testing.assert_allclose(hog_spearman(a, a), 1.0)


@pytest.mark.parametrize(
    ("shape", "orientations", "cell", "block"),
    [((64, 64), 9, 8, 2), ((37, 45), 6, 7, 3), ((24, 24), 12, 4, 1)],
    ids=["default", "remainder-odd-cells", "one-cell-blocks"],
)
def test_hog_features_equal_scikit_image_hog_image_by_image(shape, orientations, cell, block):
    images = minmax(smooth_maps(4, shape, seed=11))
    images[1] = np.round(images[1] * 4) / 4  # flat steps: zero gradients and orientations on bin edges
    expected = [
        hog(image, orientations=orientations, pixels_per_cell=(cell, cell), cells_per_block=(block, block))
        for image in images
    ]
    np.testing.assert_allclose(hog_features(images, orientations, cell, block), expected, rtol=1e-12, atol=1e-15)


def test_explain_shaped_batches_are_accepted():
    a = smooth_maps(2, (16, 16), seed=7)
    np.testing.assert_allclose(spearman(a[:, None], a[:, None]), 1.0)  # (N, 1, H, W) as explain returns


@pytest.mark.parametrize("metric", sorted(SIMILARITY_METRICS))
def test_constant_maps_score_zero_and_are_flagged(metric):
    a = smooth_maps(3, (24, 24), seed=8)
    b = a.copy()
    b[1] = 0.0  # a method that gives a constant map for one image
    values = similarity(a, b, metric)
    assert values[1] == 0.0 and np.isfinite(values).all()
    np.testing.assert_allclose(values[[0, 2]], 1.0)
    assert constant_maps(b).tolist() == [False, True, False]


def test_bad_input_gives_clear_errors():
    a = smooth_maps(2, (16, 16), seed=9)
    with pytest.raises(ValueError, match="same shape"):
        spearman(a, a[:1])
    with pytest.raises(ValueError, match="NaN"):
        spearman(a, np.full_like(a, np.nan))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        spearman(a[0], a[0])
    with pytest.raises(ValueError, match="at least 7 pixels"):
        ssim(a[:, :5, :5], a[:, :5, :5])
    with pytest.raises(ValueError, match="at least 16 px"):
        hog_spearman(a[:, :12, :12], a[:, :12, :12])
    with pytest.raises(ValueError, match="unknown similarity metric"):
        similarity(a, a, "kendall")


@pytest.mark.parametrize("metric", sorted(SIMILARITY_METRICS))
def test_random_pair_baseline_values_are_the_metric_of_each_drawn_pair(metric):
    """Each distinct pair is scored once and its value repeated: the values must be exactly those
    of scoring every draw (i, j) on its own, in its order (the draws as documented: ordered pairs
    of different images, uniform with replacement, from numpy's generator seeded with ``seed``)."""
    maps = smooth_maps(3, (24, 24), seed=4)  # 3 images: 50 draws repeat 3 distinct pairs
    baseline = random_pair_baseline(maps, metric, n_pairs=50, seed=2)
    rng = np.random.default_rng(2)
    first = rng.integers(0, 3, size=50)
    second = (first + rng.integers(1, 3, size=50)) % 3
    expected = [similarity(maps[i : i + 1], maps[j : j + 1], metric)[0] for i, j in zip(first, second, strict=True)]
    np.testing.assert_array_equal(baseline["values"], expected)


def test_random_pair_baseline_pairs_different_images_and_gives_a_ci():
    maps = smooth_maps(6, (24, 24), seed=10)
    baseline = random_pair_baseline(maps, "spearman_abs", n_pairs=50, seed=1)
    assert baseline["n_pairs"] == 50 and len(baseline["values"]) == 50
    assert baseline["ci_low"] <= baseline["mean"] <= baseline["ci_high"]
    assert np.all(baseline["values"] < 0.999)  # never an image against itself
    assert random_pair_baseline(maps, "spearman_abs", n_pairs=50, seed=1)["mean"] == baseline["mean"]
    same = random_pair_baseline(np.repeat(maps[:1], 4, axis=0), "ssim", n_pairs=10)
    assert same["mean"] == pytest.approx(1.0)  # identical maps of different images: the baseline sees it
    with pytest.raises(ValueError, match="at least 2 images"):
        random_pair_baseline(maps[:1])


def test_random_pair_baseline_within_groups_pairs_images_of_one_group():
    maps = smooth_maps(7, (24, 24), seed=3)
    groups = np.array([0, 0, 0, 1, 1, 2, 1])  # group 2 has one image: never drawn
    baseline = random_pair_baseline(maps, "pearson", n_pairs=40, seed=5, groups=groups)
    within = {
        round(float(similarity(maps[i : i + 1], maps[j : j + 1], "pearson")[0]), 12)
        for i in range(7)
        for j in range(7)
        if i != j and groups[i] == groups[j]
    }
    assert {round(float(v), 12) for v in baseline["values"]} <= within
    with pytest.raises(ValueError, match="no group holds two images"):
        random_pair_baseline(maps[:3], groups=[0, 1, 2])


def test_retention_share_is_one_unchanged_and_about_zero_for_other_images_maps():
    """The definition: (s(R_i, C_i) - mean_j s(R_i, C_j)) / (1 - mean_j s(R_i, R_j)), j over the other
    images of i's class, s = Spearman of |map|; computed here pair by pair with scipy."""
    reference = smooth_maps(12, (16, 16), seed=6)
    classes = np.array([0, 1] * 6)
    np.testing.assert_allclose(retention_share(reference, reference, classes), 1.0)
    changed = smooth_maps(12, (16, 16), seed=7) + 0.5 * reference
    ours = retention_share(reference, changed, classes)

    def rho(a, b):
        return stats.spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0]

    for i in range(12):
        peers = [j for j in range(12) if j != i and classes[j] == classes[i]]
        own = rho(reference[i], changed[i]) - np.mean([rho(reference[i], changed[j]) for j in peers])
        assert ours[i] == pytest.approx(own / (1 - np.mean([rho(reference[i], reference[j]) for j in peers])))
    # maps of other images of the same class keep the class template but nothing of image i
    template = smooth_maps(1, (16, 16), seed=8)[0]
    with_template = reference + 3 * template
    shuffled = with_template[[2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1]]  # each image gets another of its class
    assert abs(np.mean(retention_share(with_template, shuffled, classes))) < 0.15
    assert np.mean(retention_share(with_template, with_template + 0.01 * shuffled, classes)) > 0.9


def test_retention_share_leaves_out_blank_maps_and_lone_images():
    reference = smooth_maps(6, (16, 16), seed=1)
    changed = reference.copy()
    changed[1] = 0.0  # blank: shows nothing, never counted as changed
    share, blank = RetentionReference(reference, [0, 0, 0, 0, 0, 1]).shares(changed)
    assert blank.tolist() == [False, True, False, False, False, False]
    assert np.isnan(share[1]) and np.isnan(share[5])  # image 5 is the only one of its class
    assert np.isfinite(share[[0, 2, 3, 4]]).all()
    with pytest.raises(ValueError, match="display must be one of"):
        RetentionReference(reference, [0] * 6, display="colour")
    with pytest.raises(ValueError, match="5 classes for 6 maps"):
        RetentionReference(reference, [0] * 5)
    with pytest.raises(ValueError, match="changed maps must have the reference's shape"):
        RetentionReference(reference, [0] * 6).shares(reference[:, :8])


def test_ranks_equal_scipy_rankdata_with_ties():
    values = np.round(np.random.default_rng(0).normal(size=(4, 500)), 1)  # many ties
    values[1] = 0.0  # one constant row
    np.testing.assert_array_equal(ranks(values), stats.rankdata(values, axis=1))
