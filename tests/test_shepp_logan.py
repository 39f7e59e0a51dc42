"""Shepp-Logan subtype phantoms: masks are the drawn regions, only region size carries the label."""

import csv
import re

import numpy as np
import pytest
from scipy import ndimage

from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import COLUMNS, load_images, load_labels, read_manifest
from monai_sal_app.data.shepp_logan import (
    PRESETS,
    SUBTYPE_LABELS,
    SUBTYPES,
    Preset,
    generate_shepp_logan,
    shepp_logan_phantom,
    subtype_counts,
)

CLEAN = {"noise_std": 0.0, "smoothing": 0.0}


def phantom(subtype, seed, size=64, dim=2, **variation):
    return shepp_logan_phantom(subtype, size, dim, np.random.default_rng(seed), **variation)


@pytest.mark.parametrize("dim,size", [(2, 32), (2, 64), (3, 16), (3, 32)])
def test_shapes_and_types(dim, size):
    image, masks = phantom("typical", 0, size, dim)
    assert image.shape == (size,) * dim and image.dtype == np.float32
    assert set(masks) == {"top", "bottom"}
    for mask in masks.values():
        assert mask.shape == image.shape and mask.dtype == bool


@pytest.mark.parametrize("dim,size", [(2, 64), (3, 32)])
@pytest.mark.parametrize("subtype", SUBTYPES)
def test_masks_are_exactly_the_pixels_with_the_region_grey_level(subtype, dim, size):
    for seed in range(3):
        image, masks = phantom(subtype, seed, size, dim, **CLEAN)
        regions = masks["top"] | masks["bottom"]
        assert masks["top"].any() and masks["bottom"].any()
        assert not (masks["top"] & masks["bottom"]).any()
        values = np.unique(image[regions])
        assert values.size == 1, "both regions share one grey level"
        assert 0.75 <= values[0] <= 0.85
        np.testing.assert_array_equal(image == values[0], regions)


def test_grey_level_varies_between_subjects():
    levels = {
        float(np.unique(image[masks["top"]])[0]) for image, masks in (phantom("control", s, **CLEAN) for s in range(5))
    }
    assert len(levels) == 5


@pytest.mark.parametrize("subtype,atrophied", [("typical", "bottom"), ("atypical", "top"), ("error", None)])
@pytest.mark.parametrize("dim,size", [(2, 64), (3, 32)])
def test_only_the_atrophied_region_differs_from_a_control_with_the_same_draws(subtype, atrophied, dim, size):
    for seed in range(4):
        # noise on, smoothing off: the images must agree pixel for pixel outside the changed region
        control_image, control = phantom("control", seed, size, dim, smoothing=0.0)
        image, masks = phantom(subtype, seed, size, dim, smoothing=0.0)
        for region in ("top", "bottom"):
            if region == atrophied:
                assert masks[region].sum() < control[region].sum()
                assert not (masks[region] & ~control[region]).any(), "an atrophied region lies inside the normal one"
            else:
                np.testing.assert_array_equal(masks[region], control[region])
        changed = (masks["top"] ^ control["top"]) | (masks["bottom"] ^ control["bottom"])
        np.testing.assert_array_equal(image[~changed], control_image[~changed])
        assert changed.any() == (atrophied is not None)


def test_scale_multiplies_every_axis_of_a_region():
    fixed = {"normal_scale": (1.0, 1.0), "atrophy_scale": (0.5, 0.5), **CLEAN}
    _, normal = phantom("control", 0, 128, **fixed)
    _, atrophied = phantom("atypical", 0, 128, **fixed)
    assert atrophied["top"].sum() / normal["top"].sum() == pytest.approx(0.25, abs=0.03)
    _, normal3 = phantom("control", 0, 48, dim=3, **fixed)
    _, atrophied3 = phantom("atypical", 0, 48, dim=3, **fixed)
    assert atrophied3["top"].sum() / normal3["top"].sum() == pytest.approx(0.125, abs=0.03)


@pytest.mark.parametrize("dim,size", [(2, 32), (2, 128), (3, 32)])
@pytest.mark.parametrize("subtype", SUBTYPES)
def test_top_region_is_one_blob_in_the_upper_half_and_bottom_three_in_the_lower_half(subtype, dim, size):
    vertical = dim - 2  # array axis of H
    for seed in range(3):
        _, masks = phantom(subtype, seed, size, dim)
        rows_top = np.nonzero(masks["top"])[vertical]
        rows_bottom = np.nonzero(masks["bottom"])[vertical]
        assert rows_top.max() < size // 2 <= rows_bottom.min()
        assert ndimage.label(masks["top"])[1] == 1
        assert ndimage.label(masks["bottom"])[1] == 3


def test_same_generator_state_gives_the_same_phantom_and_other_seeds_do_not():
    a_image, a_masks = phantom("atypical", 7, 32, 3)
    b_image, b_masks = phantom("atypical", 7, 32, 3)
    np.testing.assert_array_equal(a_image, b_image)
    for region in a_masks:
        np.testing.assert_array_equal(a_masks[region], b_masks[region])
    c_image, _ = phantom("atypical", 8, 32, 3)
    assert not np.array_equal(a_image, c_image)


def test_noise_and_smoothing_defaults_change_the_clean_image_mildly():
    clean, _ = phantom("control", 0, 64, **CLEAN)
    noisy, _ = phantom("control", 0, 64)
    difference = noisy - clean
    assert 0.005 < difference.std() < 0.2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subtype": "mild"},
        {"dim": 4},
        {"dim": 1},
        {"size": 8},
        {"size": 32.0},
        {"noise_std": -0.1},
        {"roi_value": (0.9, 0.8)},
        {"head_jitter": 0.7},
        {"brightness": 2.0},
    ],
)
def test_bad_arguments_raise(kwargs):
    args = {"subtype": "control", "size": 32, "dim": 2, **kwargs}
    with pytest.raises(ValueError):
        shepp_logan_phantom(**args)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_subtype_counts_follow_each_preset(name):
    preset = PRESETS[name]
    for per_class in (None, 1, 6, 7, 33, 101):
        counts = subtype_counts(preset, per_class)
        n = preset.per_class if per_class is None else per_class
        assert set(counts) == set(SUBTYPES)
        assert counts["control"] == n
        assert counts["typical"] + counts["atypical"] + counts["error"] == n
        for subtype in ("typical", "atypical", "error"):
            assert abs(counts[subtype] - getattr(preset, subtype) * n) < 1


def test_preset_values_match_the_methods():
    assert PRESETS["homogeneous"] == Preset(500, 0.85, 0.10, 0.05)
    assert PRESETS["heterogeneous"] == Preset(500, 0.65, 0.25, 0.10)
    assert PRESETS["large"] == Preset(10000, 0.85, 0.10, 0.05)
    assert PRESETS["test"] == Preset(1000, 0.5, 0.5, 0.0)
    assert subtype_counts(PRESETS["test"])["error"] == 0


def test_bad_presets_and_counts_raise():
    with pytest.raises(ValueError):
        Preset(10, 0.5, 0.4, 0.0)
    with pytest.raises(ValueError):
        Preset(0, 0.5, 0.5, 0.0)
    with pytest.raises(ValueError):
        subtype_counts(PRESETS["homogeneous"], 0)
    with pytest.raises(TypeError):
        subtype_counts("homogeneous")


def test_generate_writes_a_readable_dataset_matching_its_manifest(tmp_path):
    manifest = generate_shepp_logan(tmp_path / "sl", "homogeneous", dim=2, size=32, per_class=6, seed=3, progress=False)
    assert manifest == tmp_path / "sl" / "manifest.csv"
    with open(manifest, newline="") as f:
        raw = list(csv.DictReader(f))
    assert tuple(raw[0]) == COLUMNS
    assert all(not r["image"].startswith("/") and r["image"].startswith("images/") for r in raw)

    items = read_manifest(manifest)
    assert len(items) == 12
    counts = {s: sum(i["subtype"] == s for i in items) for s in SUBTYPES}
    assert counts == subtype_counts(PRESETS["homogeneous"], 6)
    assert [i["subtype"] for i in items] != sorted((i["subtype"] for i in items), key=SUBTYPES.index), (
        "order is shuffled"
    )
    for item in items:
        assert re.fullmatch(r"sl2d-homogeneous-\d{6}", item["id"])
        assert item["label"] == SUBTYPE_LABELS[item["subtype"]]
        image, meta = read_image(item["image"])
        top, _ = read_image(item["mask_top"])
        bottom, _ = read_image(item["mask_bottom"])
        assert image.shape == top.shape == bottom.shape == (32, 32)
        np.testing.assert_array_equal(meta["affine"], np.eye(4))
        assert set(np.unique(top)) == {0.0, 1.0} and set(np.unique(bottom)) == {0.0, 1.0}
        assert top[:16].sum() == top.sum() and bottom[16:].sum() == bottom.sum()
        expected = {"control": None, "error": None, "typical": item["mask_bottom"], "atypical": item["mask_top"]}
        assert item["mask"] == expected[item["subtype"]]
        # the regions are bright in the image (noise and mild smoothing aside)
        assert image[top > 0].mean() > 0.5 and image[bottom > 0].mean() > 0.4

    x, y = load_images(items), load_labels(items)
    assert tuple(x.shape) == (12, 1, 32, 32) and y.tolist() == [i["label"] for i in items]


def test_generate_is_deterministic_from_the_seed(tmp_path):
    first = generate_shepp_logan(tmp_path / "a", "heterogeneous", size=16, per_class=3, seed=1, progress=False)
    second = generate_shepp_logan(tmp_path / "b", "heterogeneous", size=16, per_class=3, seed=1, progress=False)
    other = generate_shepp_logan(tmp_path / "c", "heterogeneous", size=16, per_class=3, seed=2, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * 6
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert first.read_bytes() == second.read_bytes()
    images_a = [read_image(i["image"])[0] for i in read_manifest(first)]
    images_c = [read_image(i["image"])[0] for i in read_manifest(other)]
    assert not any(np.array_equal(a, c) for a, c in zip(images_a, images_c))


def test_generate_3d_default_layout(tmp_path):
    manifest = generate_shepp_logan(tmp_path, "test", dim=3, size=16, per_class=2, seed=0, progress=False)
    items = read_manifest(manifest)
    assert sorted(i["subtype"] for i in items) == ["atypical", "control", "control", "typical"]
    assert all(re.fullmatch(r"sl3d-test-\d{6}", i["id"]) for i in items)
    assert tuple(load_images(items, key="mask_top").shape) == (4, 1, 16, 16, 16)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"preset": "tiny"}, ValueError),
        ({"preset": 3}, TypeError),
        ({"dim": 4}, ValueError),
        ({"size": 10}, ValueError),
        ({"per_class": 0}, ValueError),
        ({"seed": -1}, ValueError),
    ],
)
def test_generate_bad_arguments_raise_before_writing(tmp_path, kwargs, error):
    args = {"preset": "homogeneous", "size": 16, "per_class": 2, "progress": False, **kwargs}
    with pytest.raises(error):
        generate_shepp_logan(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
