"""Subtype metrics (evaluation/subtypes.py, metrics/subtypes.py): the ARI against sklearn, separability
and specificity on hand-made maps, chance values with tolerances from the sample size, and an
untrained and a trained conv5-fc3 on the Shepp-Logan "test" preset at 64 px."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import images_for, modules_loaded_by, tiny_conv5fc3
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from monai_sal_app.data.manifest import load_images, read_manifest
from monai_sal_app.data.shepp_logan import (
    EVIDENCE_REGION,
    PRESETS,
    SUBTYPE_LABELS,
    generate_shepp_logan,
    shepp_logan_phantom,
    subtype_counts,
)
from monai_sal_app.evaluation.subtypes import (
    feature_kmeans_ari,
    feature_maps,
    group_saliency_map,
    kmeans_ari,
    subtype_metrics,
)
from monai_sal_app.metrics.subtypes import GROUP_EVIDENCE, region_mask, separability, specificity
from monai_sal_app.models.train import train_classifier

RESULT_KEYS = {"ari", "b", "c", "b_dagger", "c_dagger", "group_sizes", "region_sizes", "control_class", "seconds"}


def null_ari_sd(subtypes, draws: int = 500, seed: int = 0) -> float:
    """Standard deviation of the ARI between ``subtypes`` and random relabellings of them (same group
    sizes): the spread of the ARI of a clustering that knows nothing of the subtypes."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(subtypes)
    return float(np.std([adjusted_rand_score(labels, rng.permutation(labels)) for _ in range(draws)]))


def boxes(shape=(20, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A top region (rows 2-5, cols 4-11: 32 px) and a bottom region (rows 14-15, cols 6-13: 16 px)."""
    top, bottom = np.zeros(shape, bool), np.zeros(shape, bool)
    top[2:6, 4:12] = True
    bottom[14:16, 6:14] = True
    return top, bottom


# ----------------------------------------------------------------------------- the Shepp-Logan test preset


@pytest.fixture(scope="module")
def preset_data(tmp_path_factory):
    """The "test" preset at 64 px, 24 images per class (12 typical, 12 atypical patients), read back
    through its manifest: images (48, 1, 64, 64), subtypes, and the per-image top and bottom masks."""
    out = tmp_path_factory.mktemp("shepp-logan-test")
    items = read_manifest(generate_shepp_logan(out, "test", dim=2, size=64, per_class=24, seed=0, progress=False))
    return {
        "images": load_images(items),
        "subtypes": [item["subtype"] for item in items],
        "top": load_images(items, "mask_top"),
        "bottom": load_images(items, "mask_bottom"),
    }


def phantoms(subtypes, seed: int, size: int = 64) -> torch.Tensor:
    """Shepp-Logan phantoms of the given subtypes, in memory: (N, 1, size, size)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([shepp_logan_phantom(s, size, 2, rng)[0] for s in subtypes])[:, None])


def preset_subtypes(per_class: int) -> list[str]:
    return [s for s, count in subtype_counts(PRESETS["test"], per_class).items() for _ in range(count)]


# ----------------------------------------------------------------------------- ARI


def test_kmeans_ari_is_sklearns_ari_of_each_seeds_kmeans_run():
    rng = np.random.default_rng(0)
    # three tight, far-apart blobs: every k-means run finds them, and the subtypes disagree with
    # them on two images, so the ARI is that of this hand-made clustering
    blobs = np.repeat(np.arange(3), 6)
    features = 10.0 * np.eye(3)[blobs] + 0.01 * rng.normal(size=(18, 3))
    subtypes = np.array(["a", "b", "c"])[blobs]
    subtypes[[0, 7]] = ["b", "c"]
    result = kmeans_ari(features, subtypes.tolist())
    assert result["n_clusters"] == 3 and result["n_images"] == 18 and len(result["ari_per_seed"]) == 10
    np.testing.assert_allclose(result["ari_per_seed"], adjusted_rand_score(subtypes, blobs), rtol=1e-12)
    assert 0.5 < result["ari_mean"] < 0.9

    # overlapping clusters: each seed's run is sklearn's KMeans(n_init=1, random_state=seed), and a
    # second call gives the same numbers
    features = rng.normal(size=(30, 4)) + np.repeat([[0.0] * 4, [1.5] * 4], 15, axis=0)
    subtypes = np.repeat(["typical", "atypical"], 15)
    result = kmeans_ari(features, subtypes, seeds=6)
    expected = [
        adjusted_rand_score(subtypes, KMeans(n_clusters=2, n_init=1, random_state=s).fit_predict(features))
        for s in range(6)
    ]
    assert result["ari_per_seed"] == pytest.approx(expected, abs=1e-12)
    assert result["ari_mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert kmeans_ari(features, subtypes, seeds=6) == result
    assert kmeans_ari(features, subtypes, n_clusters=3, seeds=2)["n_clusters"] == 3


def test_feature_kmeans_ari_clusters_the_last_feature_block_or_a_named_layer():
    model = tiny_conv5fc3(2)  # train mode, batch norm with running statistics
    images = images_for(2, n=10, side=32, seed=2)
    subtypes = ["typical"] * 5 + ["atypical"] * 5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = feature_kmeans_ari(model, images, subtypes, seeds=3)
    assert result["layer"] == "features" and result["n_images"] == 10
    model.eval()
    with torch.no_grad():
        expected = model.features(images).flatten(1).double().numpy()
    model.train()
    assert {k: v for k, v in result.items() if k != "layer"} == kmeans_ari(expected, subtypes, seeds=3)
    # the model is left as it was: train mode, same weights and running statistics
    assert model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)

    features, name = feature_maps(model, images, layer="features.0", batch_size=3)
    assert name == "features.0" and features.shape == (10, 4 * 32 * 32)
    np.testing.assert_allclose(feature_maps(model, images, batch_size=4)[0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not output a"):
        feature_maps(model, images, layer="classifier")
    with pytest.raises(ValueError, match="not a module"):
        feature_maps(model, images, layer="nope")


# ----------------------------------------------------------------------------- group maps


def test_group_saliency_map_is_the_mean_gradient_of_the_control_logit(dims):
    model = tiny_conv5fc3(dims).eval()
    images = images_for(dims, n=4, side=16 if dims == 3 else 32, seed=3)
    for control_class in (0, 1):
        x = images.clone().requires_grad_(True)
        model(x)[:, control_class].sum().backward()
        expected = x.grad[:, 0].double().mean(0).numpy()
        group_map = group_saliency_map(model, images, control_class=control_class, batch_size=3)
        assert group_map.shape == images.shape[2:] and group_map.dtype == np.float64
        np.testing.assert_allclose(group_map, expected, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- separability and specificity


def test_group_evidence_is_the_region_each_subtype_atrophies():
    assert {group: EVIDENCE_REGION[group] for group in ("typical", "atypical")} == GROUP_EVIDENCE


def test_separability_and_specificity_on_hand_made_maps():
    top, bottom = boxes()
    s_top, s_bottom, s_rest = 32, 16, 400 - 48

    # uniform |attribution|: chance, whatever the sign
    for value in (1.0, -0.3):
        uniform = np.full((20, 20), value)
        assert separability(uniform, top, bottom, "typical") == pytest.approx(1.0, abs=1e-12)
        assert separability(uniform, top, bottom, "atypical") == pytest.approx(1.0, abs=1e-12)
        assert specificity(uniform, top, bottom) == pytest.approx(1.0, abs=1e-12)

    # attribution in the bottom region (1 per pixel) and little elsewhere (0.01 per pixel)
    bottom_only = np.where(bottom, 1.0, 0.01)
    assert separability(bottom_only, top, bottom, "typical") == pytest.approx(100.0)
    assert separability(bottom_only, top, bottom, "atypical") == pytest.approx(0.01)
    regions_density = (s_bottom * 1.0 + s_top * 0.01) / (s_top + s_bottom)
    assert specificity(bottom_only, top, bottom) == pytest.approx(regions_density / 0.01)

    # the formulas, on a signed random map
    signed = np.random.default_rng(1).normal(size=(20, 20))
    a = np.abs(signed)
    i_top, i_bottom, i_rest = a[top].sum(), a[bottom].sum(), a[~(top | bottom)].sum()
    b = (i_bottom / i_top) * (s_top / s_bottom)
    assert separability(signed, top, bottom) == pytest.approx(b, rel=1e-12)
    assert separability(-signed, top, bottom, "atypical") == pytest.approx(1 / b, rel=1e-12)
    c = ((i_top + i_bottom) / i_rest) * (s_rest / (s_top + s_bottom))
    assert specificity(signed, top, bottom) == pytest.approx(c, rel=1e-12)

    # per-image masks (N, *spatial) count as their union; 0/1 masks as booleans
    split = np.stack([top & (np.arange(20) < 8), top & (np.arange(20) >= 8)]).astype(np.uint8)
    np.testing.assert_array_equal(region_mask(split, (20, 20)), top)
    assert separability(signed, split, bottom[None]) == pytest.approx(b, rel=1e-12)

    # no attribution in the denominator: inf, or nan when there is none at all
    assert separability(np.where(top, 0.0, 1.0), top, bottom) == np.inf
    assert np.isnan(specificity(np.zeros((20, 20)), top, bottom))

    # 3D
    top3, bottom3 = np.zeros((4, 8, 8), bool), np.zeros((4, 8, 8), bool)
    top3[1, :2], bottom3[2, 6:] = True, True
    volume = np.where(bottom3, 3.0, 1.0)
    assert separability(volume, top3, bottom3) == pytest.approx(3.0)
    assert specificity(volume, top3, bottom3) == pytest.approx(2.0)


def test_chance_values_with_tolerances_from_the_sample_size():
    """Unrelated features give ARI ~ 0 and a noise map b, c ~ 1, within 4 standard deviations of
    their sampling spread at these sizes; features and maps that do carry the subtypes and regions
    fail those bounds by far (so the checks can fail)."""
    rng = np.random.default_rng(5)
    subtypes = np.repeat(["typical", "atypical"], 12)
    tolerance = 4 * null_ari_sd(subtypes)  # 24 images, 12 / 12: the null ARI has sd ~0.06
    unrelated = kmeans_ari(rng.normal(size=(24, 16)), subtypes)
    assert abs(unrelated["ari_mean"]) < tolerance
    informative = rng.normal(size=(24, 16)) + 4.0 * (subtypes == "typical")[:, None]
    assert kmeans_ari(informative, subtypes)["ari_mean"] == pytest.approx(1.0)

    # iid |N(0, 1)| attribution: density ratio of two regions of S1 and S2 pixels has
    # sd(log ratio) ~ cv * sqrt(1 / S1 + 1 / S2), cv = sd / mean of |z| = sqrt(pi / 2 - 1)
    top, bottom = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    top[10:22, 26:38] = True  # 144 px, about the phantom's top region at 64 px
    bottom[44:47, 20:36] = True  # 48 px, about its bottom region
    s_top, s_bottom, s_regions = top.sum(), bottom.sum(), (top | bottom).sum()
    cv = np.sqrt(np.pi / 2 - 1)
    sd_b = cv * np.sqrt(1 / s_top + 1 / s_bottom)  # ~0.12
    sd_c = cv * np.sqrt(1 / s_regions + 1 / (64 * 64 - s_regions))  # ~0.055
    for seed in range(5):
        noise = np.random.default_rng(seed).normal(size=(64, 64))
        assert abs(np.log(separability(noise, top, bottom, "typical"))) < 4 * sd_b
        assert abs(np.log(separability(noise, top, bottom, "atypical"))) < 4 * sd_b
        assert abs(np.log(specificity(noise, top, bottom))) < 4 * sd_c
        on_regions = noise + 3.0 * (top | bottom)
        assert np.log(specificity(on_regions, top, bottom)) > 20 * sd_c
        on_bottom = noise + 3.0 * bottom
        assert np.log(separability(on_bottom, top, bottom, "typical")) > 10 * sd_b


# ----------------------------------------------------------------------------- conv5-fc3 on the test preset


def test_an_untrained_network_is_at_chance_for_the_ari_but_not_for_b_and_c(preset_data):
    """Eight seeded untrained conv5-fc3 (widths 4, 4, 8, 8, 8) on the test preset, 24 patients.

    ARI: the median over the networks is within 3 null standard deviations of 0 (single networks
    can reach 0.3 or more: random features keep the image's large differences, among which the
    size of the top region). b and c: an untrained network's gradient is no uniform map. It is
    denser on edges, so on the two regions (c > 1) and most on the bottom region, which is nearly
    all edge, whatever the group (b > 1 > b_dagger). Over 40 seeds: median ARI 0.00, geometric
    means b 1.9, c 1.9, b_dagger 0.64, c_dagger 2.0 (docs/METHODS.md#latent-subtypes).
    """
    data = preset_data
    results = []
    for seed in range(8):
        model = tiny_conv5fc3(2, seed=seed)
        results.append(subtype_metrics(model, data["images"], data["subtypes"], data["top"], data["bottom"]))
    first = results[0]
    assert set(first) == RESULT_KEYS
    assert first["group_sizes"] == {"control": 24, "typical": 12, "atypical": 12, "error": 0}
    assert first["ari"]["layer"] == "features" and first["ari"]["n_clusters"] == 2
    assert first["ari"]["n_images"] == 24 and len(first["ari"]["ari_per_seed"]) == 10
    assert first["region_sizes"]["top"] > first["region_sizes"]["bottom"] > 0
    json.dumps(first, allow_nan=False)

    patients = [s for s in data["subtypes"] if s != "control"]
    assert abs(np.median([r["ari"]["ari_mean"] for r in results])) < 3 * null_ari_sd(patients)
    geometric = {key: np.exp(np.mean([np.log(r[key]) for r in results])) for key in ("b", "c", "b_dagger", "c_dagger")}
    assert geometric["c"] > 1.2 and geometric["c_dagger"] > 1.2
    assert geometric["b"] > 1.0 > geometric["b_dagger"]


def test_a_missing_group_scores_none_and_label_errors_are_a_patient_subtype(preset_data):
    data = preset_data
    keep = [i for i, s in enumerate(data["subtypes"]) if s != "atypical"]
    errors = ["error"] * 4
    rng = np.random.default_rng(9)
    error_images, error_masks = [], {"top": [], "bottom": []}
    for subtype in errors:
        image, masks = shepp_logan_phantom(subtype, 64, 2, rng)
        error_images.append(image)
        for region in ("top", "bottom"):
            error_masks[region].append(masks[region])
    images = torch.cat([data["images"][keep], torch.from_numpy(np.stack(error_images))[:, None]])
    top = np.concatenate([data["top"][keep].numpy()[:, 0], np.stack(error_masks["top"])])
    bottom = np.concatenate([data["bottom"][keep].numpy()[:, 0], np.stack(error_masks["bottom"])])
    subtypes = [data["subtypes"][i] for i in keep] + errors
    result = subtype_metrics(tiny_conv5fc3(2), images, subtypes, top, bottom, seeds=2)
    assert result["b_dagger"] is None and result["c_dagger"] is None
    assert result["b"] > 0 and result["c"] > 0
    assert result["ari"]["n_images"] == 16 and result["ari"]["n_clusters"] == 2
    assert result["group_sizes"] == {"control": 24, "typical": 12, "atypical": 0, "error": 4}


def test_a_trained_network_separates_the_subtypes_and_looks_at_the_regions(preset_data):
    """conv5-fc3 trained for 8 epochs on 200 in-memory test-preset phantoms (about a second): its
    features split typical from atypical patients (ARI 1 where untrained networks score ~0) and
    its group maps are about 3 times denser on the regions than elsewhere (c, c_dagger ~3.2)."""
    train_subtypes, val_subtypes = preset_subtypes(100), preset_subtypes(20)
    train_y = torch.tensor([SUBTYPE_LABELS[s] for s in train_subtypes])
    val_y = torch.tensor([SUBTYPE_LABELS[s] for s in val_subtypes])
    model = tiny_conv5fc3(2, seed=2)
    model, _ = train_classifier(
        model, phantoms(train_subtypes, 1), train_y, phantoms(val_subtypes, 2), val_y,
        epochs=8, patience=8, lr=3e-3, seed=2, progress=False, log=None,
    )  # fmt: skip
    data = preset_data
    result = subtype_metrics(model, data["images"], data["subtypes"], data["top"], data["bottom"])
    assert result["ari"]["ari_mean"] > 0.9
    assert result["c"] > 2.0 and result["c_dagger"] > 2.0


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(preset_data):
    data = preset_data
    images, subtypes, top, bottom = data["images"], data["subtypes"], data["top"], data["bottom"]
    model = tiny_conv5fc3(2)
    features = np.random.default_rng(0).normal(size=(6, 3))
    two = ["typical"] * 3 + ["atypical"] * 3

    with pytest.raises(ValueError, match="subtypes has 5 entries for 6"):
        kmeans_ari(features, two[:5])
    with pytest.raises(ValueError, match="at least 2 subtypes"):
        kmeans_ari(features, ["typical"] * 6)
    with pytest.raises(ValueError, match="n_clusters must be between 2 and the number of images"):
        kmeans_ari(features, two, n_clusters=7)
    with pytest.raises(ValueError, match="n_clusters must be an integer >= 1"):
        kmeans_ari(features, two, n_clusters=0)
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        kmeans_ari(features, two, seeds=0)
    with pytest.raises(ValueError, match="features must be"):
        kmeans_ari(features[:, 0], two)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_ari(np.full((6, 3), np.nan), two)
    with pytest.raises(ValueError, match="subtypes has 3 entries for 4 images"):
        feature_kmeans_ari(model, images[:4], two[:3])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        feature_maps(model, images[:4], batch_size=0)

    with pytest.raises(ValueError, match="subtypes has 47 entries for 48 images"):
        subtype_metrics(model, images, subtypes[:-1], top, bottom)
    with pytest.raises(ValueError, match="unknown subtype"):
        subtype_metrics(model, images, ["Typical" if s == "typical" else s for s in subtypes], top, bottom)
    only_typical = [i for i, s in enumerate(subtypes) if s != "atypical"]
    with pytest.raises(ValueError, match="at least 2 patient subtypes"):
        subtype_metrics(
            model, images[only_typical], [subtypes[i] for i in only_typical], top[only_typical], bottom[only_typical]
        )
    with pytest.raises(ValueError, match="top_masks has shape .* on the images' grid"):
        subtype_metrics(model, images, subtypes, top[..., ::2, ::2], bottom)
    with pytest.raises(ValueError, match="bottom_masks has shape .* one mask per image"):
        subtype_metrics(model, images, subtypes, top, bottom[:10])
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        subtype_metrics(model, images.numpy(), subtypes, top, bottom)

    square_top, square_bottom = boxes()
    with pytest.raises(ValueError, match="expected the map's grid"):
        separability(np.ones((20, 20)), square_top[:10], square_bottom)
    with pytest.raises(ValueError, match="overlap"):
        separability(np.ones((20, 20)), square_top, square_top | square_bottom)
    with pytest.raises(ValueError, match="empty"):
        specificity(np.ones((20, 20)), square_top, np.zeros((20, 20), bool))
    with pytest.raises(ValueError, match="boolean or 0/1"):
        specificity(np.ones((20, 20)), square_top * 2, square_bottom)
    with pytest.raises(ValueError, match="group must be one of"):
        separability(np.ones((20, 20)), square_top, square_bottom, group="error")
    with pytest.raises(ValueError, match="NaN"):
        separability(np.full((20, 20), np.nan), square_top, square_bottom)
    with pytest.raises(ValueError, match="one map"):
        specificity(np.ones(400), square_top.ravel(), square_bottom.ravel())
    with pytest.raises(ValueError, match="no rest"):
        specificity(np.ones((20, 20)), square_top, ~square_top)


def test_metrics_subtypes_imports_neither_torch_nor_sklearn():
    assert modules_loaded_by("monai_sal_app.metrics.subtypes", ["torch", "sklearn"]) == []
