"""Real-anatomy generators: masks are exactly what the simulated pathology changed; RSNA files match the format.

Needs the bases of scripts/install_data.sh (which scripts/install.sh runs); each group skips (naming the
missing base) only when it is absent, and fails instead under CI (``CI`` set), so CI runs every test.
"""

import csv

import numpy as np
import pytest
from conftest import base_or_skip, missing_base
from scipy import ndimage

from monai_sal_app.data import bases
from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest

# --- brain atrophy ----------------------------------------------------------------------------------

NO_DRIFT = {"gain": (1.0, 1.0), "gamma": (1.0, 1.0), "bias": 0.0, "noise_std": 0.0}


@pytest.fixture(scope="module")
def brain():
    base_or_skip(bases.colin27_files)
    from monai_sal_app.data.brain_atrophy import load_brain_base

    return load_brain_base("colin27")


def _subject(subtype, seed, brain, size, dim, **kwargs):
    from monai_sal_app.data.brain_atrophy import brain_atrophy_subject

    return brain_atrophy_subject(
        subtype, size, dim, np.random.default_rng(seed), brain, shrink_mm=3.0, intensity_loss=0.2, **kwargs
    )


def _mni_of_mask(brain, mask, size, dim):
    from monai_sal_app.data.brain_atrophy import _output_geometry

    _, _, affine = _output_geometry(brain, size, dim)
    idx = np.argwhere(mask)
    idx = np.concatenate([idx, np.zeros((len(idx), 3 - dim))], axis=1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("dim,size", [(2, 64), (3, 32)])
@pytest.mark.parametrize("subtype", ["typical", "atypical"])
def test_brain_mask_is_the_set_of_voxels_the_atrophy_changed(brain, subtype, dim, size):
    tolerance = 0.02
    for seed in range(2):
        control, empty = _subject("control", seed, brain, size, dim, mask_tolerance=tolerance, **NO_DRIFT)
        image, mask = _subject(subtype, seed, brain, size, dim, mask_tolerance=tolerance, **NO_DRIFT)
        assert not empty.any() and mask.any()
        change = image - control
        np.testing.assert_array_equal(mask, np.abs(change) > tolerance)
        far = ~ndimage.binary_dilation(mask, iterations=4)
        assert np.count_nonzero(change[far]) == 0, "the atrophy changed voxels far from its mask"
        assert change[mask].mean() < 0, "atrophy darkens the T1 (tissue replaced by CSF)"


@pytest.mark.parametrize("dim,size", [(2, 64), (3, 32)])
def test_brain_atrophy_lies_in_its_atlas_region(brain, dim, size):
    _, typical = _subject("typical", 3, brain, size, dim)
    _, atypical = _subject("atypical", 3, brain, size, dim)
    assert not (typical & atypical).any()
    mni_typical, mni_atypical = _mni_of_mask(brain, typical, size, dim), _mni_of_mask(brain, atypical, size, dim)
    # medial temporal lobe: y in about [-45, 12] mm, z in [-40, 10]; occipital lobe: behind y = -50 mm
    assert (mni_typical[:, 1] > -50).all() and (mni_typical[:, 1] < 15).all() and (mni_typical[:, 2] < 15).all()
    assert (np.abs(mni_typical[:, 0]) > 8).all(), "hippocampus and amygdala are lateral to the midline"
    assert (mni_atypical[:, 1] < -50).all()


def test_brain_mask_ignores_noise_and_drift_and_errors_look_like_controls(brain):
    _, quiet = _subject("typical", 5, brain, 64, 2, **NO_DRIFT)
    _, noisy = _subject("typical", 5, brain, 64, 2)
    np.testing.assert_array_equal(quiet, noisy)
    control, _ = _subject("control", 5, brain, 64, 2)
    error, error_mask = _subject("error", 5, brain, 64, 2)
    np.testing.assert_array_equal(control, error)
    assert not error_mask.any()


def test_brain_generator_writes_a_deterministic_manifest(brain, tmp_path):
    from monai_sal_app.data.brain_atrophy import AtrophyPreset
    from monai_sal_app.data.generators import GENERATORS

    preset = AtrophyPreset(4, 0.5, 0.5, 0.0)
    first = GENERATORS["brain-atrophy"].generate(
        tmp_path / "a", preset="test", dim=2, size=48, per_class=3, seed=7, progress=False
    )
    again = GENERATORS["brain-atrophy"].generate(
        tmp_path / "b", preset="test", dim=2, size=48, per_class=3, seed=7, progress=False
    )
    items, items_again = read_manifest(first), read_manifest(again)
    assert [i["subtype"] for i in items].count("control") == 3 and len(items) == 6
    for item, other in zip(items, items_again):
        a, meta = read_image(item["image"])
        assert a.shape == (48, 48) and meta["format"] == "nifti"
        np.testing.assert_array_equal(a, read_image(other["image"])[0])
        assert (item["mask"] is not None) == (item["label"] == 1)
        if item["mask"]:
            assert read_image(item["mask"], allow_constant=True)[0].any()
    from monai_sal_app.data.brain_atrophy import generate_brain_atrophy

    custom = read_manifest(
        generate_brain_atrophy(tmp_path / "c", preset=preset, dim=2, size=32, seed=7, progress=False)
    )
    assert len(custom) == 8 and custom[0]["id"].startswith("ba2d-custom-")
    with pytest.raises(ValueError, match="unknown preset"):
        generate_brain_atrophy(tmp_path / "d", preset="nope")


@pytest.mark.slow
def test_mni152_fallback_regions_overlap_the_aal_regions(brain):
    if not bases.mni152_available():
        missing_base("nilearn (MNI152 fallback)")
    from monai_sal_app.data.brain_atrophy import load_brain_base

    mni = load_brain_base("mni152")
    # both templates are 1 mm MNI grids: map MNI152 voxels onto the Colin27 grid by their millimetres
    offset = np.round(mni.affine[:3, 3] - brain.affine[:3, 3]).astype(int)
    for region in ("typical", "atypical"):
        idx = np.argwhere(mni.regions[region]) + offset
        inside = np.all((idx >= 0) & (idx < brain.t1.shape), axis=1)
        aal = ndimage.binary_dilation(brain.regions[region], iterations=4)
        assert aal[tuple(idx[inside].T)].mean() > 0.6, region


# --- chest X-ray ------------------------------------------------------------------------------------

# Lung fields drawn by hand on the base radiograph (x, y in a 256 x 256 view of the 1024 x 1024 base),
# checked on an overlay: apex, lateral rib border, costophrenic angle, diaphragm, heart/mediastinum border.
RIGHT_LUNG = [
    (72, 24), (88, 26), (98, 32), (104, 44), (106, 64), (106, 96), (106, 128), (104, 150), (102, 168),
    (98, 178), (80, 180), (60, 184), (44, 190), (30, 196), (26, 184), (24, 160), (26, 128), (30, 96),
    (38, 64), (50, 40), (60, 30),
]  # fmt: skip
LEFT_LUNG = [
    (160, 24), (176, 26), (190, 34), (204, 48), (212, 64), (218, 96), (222, 128), (222, 160), (221, 190),
    (218, 205), (204, 200), (192, 194), (184, 186), (176, 170), (166, 150), (158, 128), (152, 110),
    (150, 96), (148, 64), (150, 40), (154, 30),
]  # fmt: skip


@pytest.fixture(scope="module")
def chest():
    base_or_skip(bases.chest_radiograph_file)
    from monai_sal_app.data.chest_xray import chest_base

    return chest_base()


def test_lung_segmentation_matches_the_hand_drawn_reference(chest):
    from skimage.draw import polygon
    from skimage.transform import resize

    _, lungs = chest
    reference = np.zeros((256, 256), dtype=bool)
    for outline in (RIGHT_LUNG, LEFT_LUNG):
        xs, ys = zip(*outline)
        reference[polygon(ys, xs, reference.shape)] = True
    segmented = resize(lungs.astype(float), (256, 256), order=1) > 0.5
    dice = 2 * (segmented & reference).sum() / (segmented.sum() + reference.sum())
    precision = (segmented & reference).sum() / segmented.sum()
    assert dice > 0.8 and precision > 0.85, (dice, precision)
    assert ndimage.label(segmented)[1] == 2
    assert segmented[:, :128].sum() > 0.3 * segmented.sum() and segmented[:, 128:].sum() > 0.3 * segmented.sum()


def test_chest_mask_is_what_the_opacities_changed_and_boxes_cover_it(chest):
    from monai_sal_app.data.chest_xray import chest_xray_subject
    from monai_sal_app.data.rsna import box_mask

    for seed in range(2):
        control, empty, no_boxes, lungs = chest_xray_subject(False, np.random.default_rng(seed), noise_std=0.0)
        image, mask, boxes, same_lungs = chest_xray_subject(True, np.random.default_rng(seed), noise_std=0.0)
        assert not empty.any() and no_boxes == [] and mask.any() and 1 <= len(boxes) <= 3
        np.testing.assert_array_equal(lungs, same_lungs)
        change = image - control
        assert change.min() >= 0, "opacities only brighten"
        np.testing.assert_array_equal(mask, change > 0.02)
        assert not mask[~ndimage.binary_dilation(lungs, iterations=16)].any(), "opacity outside the lung fields"
        covered = box_mask(boxes, mask.shape, source_shape=mask.shape)
        assert not (mask & ~covered).any()
        for x, y, w, h in boxes:
            assert x >= 0 and y >= 0 and x + w <= 1024 and y + h <= 1024
            assert mask[y : y + h, x : x + w].any()


def test_chest_generator_writes_the_rsna_layout(chest, tmp_path):
    import pydicom

    from monai_sal_app.data.chest_xray import generate_chest_xray
    from monai_sal_app.data.rsna import CLASS_CSV, IMAGE_DIR, LABELS_CSV, rsna_items

    manifest = generate_chest_xray(tmp_path, preset="test", size=64, per_class=2, seed=3, progress=False)
    with open(tmp_path / LABELS_CSV, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["patientId", "x", "y", "width", "height", "Target"]
    with open(tmp_path / CLASS_CSV, newline="") as f:
        classes = list(csv.reader(f))
    assert classes[0] == ["patientId", "class"] and len(classes) == len(rows)
    for row, class_row in zip(rows[1:], classes[1:]):
        assert row[0] == class_row[0]
        if row[5] == "0":
            assert row[1:5] == ["", "", "", ""] and class_row[1] == "Normal"
        else:
            assert row[5] == "1" and class_row[1] == "Lung Opacity"
            assert all(cell.endswith(".0") and float(cell) >= 0 for cell in row[1:5])
    items = read_manifest(manifest)
    assert sorted(i["label"] for i in items) == [0, 0, 1, 1]
    for item in items:
        path = tmp_path / IMAGE_DIR / f"{item['id']}.dcm"
        ds = pydicom.dcmread(str(path))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        layout = (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation)
        assert layout == (1024, 1024, 8, 8, 7, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1 and ds.Modality == "CR"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PatientID == item["id"] == ds.PatientName
        assert ds.ViewPosition in ("PA", "AP") and ds.SeriesDescription == f"view: {ds.ViewPosition}"
        assert ds.BodyPartExamined == "CHEST" and ds.LossyImageCompressionMethod == "ISO_10918_1"
        pixels, _ = read_image(path)
        small = read_image(item["image"])[0]
        from skimage.transform import resize

        assert np.abs(resize(pixels / 255.0, small.shape, anti_aliasing=True) - small).mean() < 0.01
    read_back = {i["id"]: i for i in rsna_items(tmp_path)}
    for item in items:
        assert read_back[item["id"]]["label"] == item["label"]
        assert bool(read_back[item["id"]]["boxes"]) == (item["label"] == 1)


def test_chest_generator_is_2d_only(tmp_path):
    from monai_sal_app.data.chest_xray import generate_chest_xray

    with pytest.raises(ValueError, match="2D only"):
        generate_chest_xray(tmp_path, dim=3)


# --- CT lesions -------------------------------------------------------------------------------------

FLAT = {"noise_hu": (0.0, 0.0), "smoothing": 0.0, "gain": 0.0, "offset_hu": 0.0}


@pytest.fixture(scope="module")
def lung_cases():
    base_or_skip(bases.lung_ct_files)
    from monai_sal_app.data.ct_lesions import CASES, load_lung_case

    return [load_lung_case(c) for c in CASES]


def test_lung_ct_segmentation(lung_cases):
    for case in lung_cases:
        litres = case.lungs.sum() * np.prod(case.spacing) / 1e6
        assert 1.0 < litres < 8.0, (case.name, litres)
        assert not case.lungs[:, 0, :].any() and not case.lungs[:, :, 0].any(), "air around the body is not lung"
        assert case.lungs[tuple(np.round(case.tumour_centre).astype(int))]
        assert (case.image[case.lungs & ~case.tumour] < -200).mean() > 0.8


@pytest.mark.parametrize("dim,size", [(3, 32), (2, 48)])
def test_synthetic_nodule_mask_is_what_the_nodule_changed(lung_cases, dim, size):
    from monai_sal_app.data.ct_lesions import ct_lesion_subject

    for seed in range(2):
        control, empty, affine = ct_lesion_subject("control", size, dim, np.random.default_rng(seed), **FLAT)
        image, mask, same_affine = ct_lesion_subject("synthetic", size, dim, np.random.default_rng(seed), **FLAT)
        np.testing.assert_array_equal(affine, same_affine)
        assert not empty.any() and mask.any()
        change = image - control
        np.testing.assert_array_equal(mask, np.abs(change) > 100.0)
        # below-tolerance partial volume spreads at most one native 5 mm slice (3.3 output voxels) past the mask
        assert not change[~ndimage.binary_dilation(mask, iterations=5)].any()
        assert change[mask].mean() > 300, "a solid nodule is much denser than lung"


def test_real_tumour_crops_keep_the_expert_mask(lung_cases):
    from monai_sal_app.data.ct_lesions import ct_lesion_subject

    for seed in range(3):
        image, mask, _ = ct_lesion_subject("real", 32, 3, np.random.default_rng(seed), **FLAT)
        assert mask.any()
        assert image[mask].mean() > image[~mask].mean() + 200


def test_ct_generator_manifest(lung_cases, tmp_path):
    from monai_sal_app.data.generators import GENERATORS

    items = read_manifest(
        GENERATORS["ct-lesions"].generate(tmp_path, preset="test", dim=2, size=32, per_class=3, seed=1, progress=False)
    )
    assert len(items) == 6 and sorted(i["label"] for i in items) == [0, 0, 0, 1, 1, 1]
    assert {i["subtype"] for i in items if i["label"] == 1} <= {"real", "synthetic"}
    for item in items:
        image, _meta = read_image(item["image"])
        assert image.shape == (32, 32) and image.min() >= -1024 and image.max() <= 400
        assert (item["mask"] is not None) == (item["label"] == 1)
