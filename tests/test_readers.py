"""Readers on fixtures built in the exact layout of the real data: RSNA pneumonia, NIfTI/NRRD folders, DICOM series."""

import copy
import csv
import os

import numpy as np
import pytest
from server_fixtures import write_nrrd

from monai_sal_app.data.io import read_image, write_nifti
from monai_sal_app.data.manifest import load_images, read_manifest, write_manifest
from monai_sal_app.data.readers import (
    LoadItemd,
    dicom_series_dataset,
    dicom_series_items,
    find_dicom_series,
    image_folder_dataset,
    image_folder_items,
    read_dicom_series,
)
from monai_sal_app.data.rsna import (
    box_mask,
    read_rsna_tables,
    rsna_dataset,
    rsna_items,
    rsna_to_manifest,
    write_rsna_dicom,
    write_rsna_tables,
)
from monai_sal_app.data.rsna import main as rsna_main

# --- RSNA ---------------------------------------------------------------------------------------------

# The first rows of the challenge's stage 2 files, verbatim (Target 0 rows have empty box cells; the
# class file repeats a patient once per box).
LABELS_TEXT = """patientId,x,y,width,height,Target
0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0
003d8fa0-6bf1-40ed-b54c-ac657f8495c5,,,,,0
00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1
00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1
"""
CLASSES_TEXT = """patientId,class
0004cfab-14fd-4e49-80ba-63a80b6bddd6,No Lung Opacity / Not Normal
003d8fa0-6bf1-40ed-b54c-ac657f8495c5,Normal
00436515-870c-4b36-a041-de91049b9ab4,Lung Opacity
00436515-870c-4b36-a041-de91049b9ab4,Lung Opacity
"""
NORMAL, OPACITY, NOT_NORMAL = (
    "003d8fa0-6bf1-40ed-b54c-ac657f8495c5",
    "00436515-870c-4b36-a041-de91049b9ab4",
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6",
)


def _radiograph(seed):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:1024, :1024]
    smooth = 120 + 60 * np.sin(rows / 90.0) * np.cos(cols / 70.0)
    return np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    (root / "stage_2_train_labels.csv").write_text(LABELS_TEXT)
    (root / "stage_2_detailed_class_info.csv").write_text(CLASSES_TEXT)
    for n, pid in enumerate((NOT_NORMAL, NORMAL, OPACITY)):
        write_rsna_dicom(root / "stage_2_train_images" / f"{pid}.dcm", _radiograph(n), pid, sex="M", age=51)
    return root


def test_rsna_two_class_subset(rsna_root):
    items = rsna_items(rsna_root)
    assert [i["id"] for i in items] == [NORMAL, OPACITY]
    assert [(i["label"], i["subtype"]) for i in items] == [(0, "Normal"), (1, "Lung Opacity")]
    assert items[0]["boxes"] == [] and items[1]["boxes"] == [(264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0)]
    assert set(items[0]) >= {"id", "image", "label", "subtype", "mask", "mask_top", "mask_bottom"}
    everything = rsna_items(rsna_root, classes=("Normal", "Lung Opacity", "No Lung Opacity / Not Normal"))
    assert {i["id"]: i["label"] for i in everything}[NOT_NORMAL] == 2


def test_rsna_jpeg_dicom_reads_back_close_to_the_pixels(rsna_root):
    import pydicom

    path = rsna_root / "stage_2_train_images" / f"{NORMAL}.dcm"
    ds = pydicom.dcmread(str(path))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50" and ds.PatientAge == "51"
    array, meta = read_image(path)
    assert array.shape == (1024, 1024) and meta["format"] == "dicom"
    assert np.abs(array - _radiograph(1)).mean() < 3.0  # lossy JPEG, quality 95
    raw = rsna_root / "raw.dcm"
    write_rsna_dicom(raw, _radiograph(1), "raw", compress=False)
    np.testing.assert_array_equal(read_image(raw)[0], _radiograph(1))


def test_box_mask_is_end_exclusive_and_scales():
    full = box_mask([(264.0, 152.0, 213.0, 379.0)], (1024, 1024))
    rows, cols = np.nonzero(full)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (152, 530, 264, 476) and full.sum() == 213 * 379
    small = box_mask([(264.0, 152.0, 213.0, 379.0)], (256, 256))
    rows, cols = np.nonzero(small)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (38, 133, 66, 119)
    union = box_mask([(0, 0, 10, 10), (5, 5, 10, 10)], (100, 100), source_shape=(100, 100))
    assert union.sum() == 100 + 100 - 25
    assert box_mask([(1000, 1000, 2, 2)], (16, 16)).sum() == 1, "a tiny box keeps one pixel"


@pytest.mark.parametrize(
    "labels,classes,message",
    [
        (
            LABELS_TEXT.replace("patientId,x,y,width,height,Target", "patientId,y,x,width,height,Target"),
            CLASSES_TEXT,
            "expected exactly",
        ),
        (LABELS_TEXT.replace("6bddd6,,,,,0", "6bddd6,1.0,,,,0"), CLASSES_TEXT, "empty box"),
        (LABELS_TEXT.replace("264.0,152.0,213.0,379.0,1", ",,,,1"), CLASSES_TEXT, "numeric"),
        (LABELS_TEXT, CLASSES_TEXT.replace("c5,Normal", "c5,Lung Opacity"), "disagrees"),
        (LABELS_TEXT, CLASSES_TEXT.replace("c5,Normal", "c5,Healthy"), "unknown class"),
        (LABELS_TEXT, "patientId,class\n" + CLASSES_TEXT.splitlines()[1] + "\n", "without a class"),
    ],
)
def test_rsna_tables_are_checked(tmp_path, labels, classes, message):
    (tmp_path / "stage_2_train_labels.csv").write_text(labels)
    (tmp_path / "stage_2_detailed_class_info.csv").write_text(classes)
    with pytest.raises(ValueError, match=message):
        read_rsna_tables(tmp_path)


def test_rsna_missing_image_and_table_writer_round_trip(tmp_path, rsna_root):
    records = [
        {"patientId": NORMAL, "class": "Normal", "boxes": []},
        {"patientId": OPACITY, "class": "Lung Opacity", "boxes": [(264, 152, 213, 379), (562, 152, 256, 453)]},
        {"patientId": NOT_NORMAL, "class": "No Lung Opacity / Not Normal"},
    ]
    write_rsna_tables(tmp_path, records)
    assert read_rsna_tables(tmp_path) == read_rsna_tables(rsna_root)
    with pytest.raises(FileNotFoundError, match="2 image"):
        rsna_items(tmp_path)
    with pytest.raises(ValueError, match="needs at least one box"):
        write_rsna_tables(tmp_path, [{"patientId": "p", "class": "Lung Opacity", "boxes": []}])
    with pytest.raises(ValueError, match="cannot have boxes"):
        write_rsna_tables(tmp_path, [{"patientId": "p", "class": "Normal", "boxes": [(1, 1, 2, 2)]}])


def test_rsna_to_manifest_for_training(rsna_root, tmp_path):
    manifest = rsna_to_manifest(rsna_root, tmp_path / "nifti", size=64, progress=False)
    items = read_manifest(manifest)
    assert [(i["id"], i["label"], i["subtype"]) for i in items] == [(NORMAL, 0, "Normal"), (OPACITY, 1, "Lung Opacity")]
    assert load_images(items).shape == (2, 1, 64, 64)
    assert items[0]["mask"] is None
    mask = read_image(items[1]["mask"], allow_constant=True)[0] > 0.5
    np.testing.assert_array_equal(mask, box_mask([(264, 152, 213, 379), (562, 152, 256, 453)], (64, 64)))
    kept = read_manifest(rsna_to_manifest(rsna_root, tmp_path / "dicom", size=None, progress=False))
    assert kept[1]["image"].endswith(".dcm")
    assert read_image(kept[1]["mask"], allow_constant=True)[0].shape == (1024, 1024)
    assert rsna_main([str(rsna_root), "--out", str(tmp_path / "cli"), "--size", "32", "--quiet"]) == 0
    assert load_images(read_manifest(tmp_path / "cli" / "manifest.csv")).shape == (2, 1, 32, 32)
    assert rsna_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--quiet"]) == 2


def test_rsna_monai_dataset_with_masks_and_loader(rsna_root, tmp_path):
    dataset = rsna_dataset(rsna_root, transform=LoadItemd(), mask_dir=tmp_path / "masks", mask_size=(128, 128))
    assert len(dataset) == 2
    normal, opacity = dataset[0], dataset[1]
    assert normal["image"].shape == (1, 1024, 1024) and normal["mask"] is None and normal["label"] == 0
    assert opacity["mask"].shape == (1, 128, 128)
    np.testing.assert_array_equal(opacity["mask"][0] > 0.5, box_mask(opacity["boxes"], (128, 128)))


# --- NIfTI / NRRD folders ---------------------------------------------------------------------------


def _volume(seed, shape=(8, 12, 10)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_class_folders_with_masks_next_to_the_images(tmp_path):
    write_nifti(_volume(0), tmp_path / "control" / "c1.nii.gz")
    write_nifti(_volume(1), tmp_path / "control" / "c2.nii.gz")
    write_nrrd(_volume(2), tmp_path / "patient" / "lung1_image.nrrd")  # the pyradiomics naming
    write_nrrd((_volume(3) > 1).astype(np.uint8), tmp_path / "patient" / "lung1_label.nrrd")
    write_nifti(_volume(4), tmp_path / "patient" / "p2.nii.gz")
    write_nifti(_volume(5) > 1, tmp_path / "patient" / "p2_mask.nii.gz")
    items = image_folder_items(tmp_path)
    assert [(i["id"], i["label"], i["subtype"]) for i in items] == [
        ("c1", 0, "control"),
        ("c2", 0, "control"),
        ("lung1", 1, "patient"),
        ("p2", 1, "patient"),
    ]
    by_id = {i["id"]: i for i in items}
    assert by_id["c1"]["mask"] is None and by_id["lung1"]["mask"].endswith("lung1_label.nrrd")
    assert by_id["p2"]["mask"].endswith("p2_mask.nii.gz")
    reversed_labels = image_folder_items(tmp_path, class_names=["patient", "control"])
    assert {i["id"]: i["label"] for i in reversed_labels}["c1"] == 1
    with pytest.raises(ValueError, match="not in class_names"):
        image_folder_items(tmp_path, class_names=["patient"])
    with pytest.raises(ValueError, match="do not pass labels"):
        image_folder_items(tmp_path, labels={"c1": 0})
    write_manifest(tmp_path / "manifest.csv", items)
    assert [i["id"] for i in read_manifest(tmp_path / "manifest.csv")] == [i["id"] for i in items]
    loaded = image_folder_dataset(tmp_path, transform=LoadItemd())[2]
    np.testing.assert_array_equal(loaded["image"][0], _volume(2))
    np.testing.assert_array_equal(loaded["mask"][0], (_volume(3) > 1).astype(np.float32))


def test_flat_folder_with_labels_csv_and_mask_folder(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "labelsTr"
    for n, name in enumerate(("a", "b", "c")):
        write_nifti(_volume(n), images / f"{name}.nii.gz")
    write_nifti(_volume(9) > 0, masks / "b.nii.gz")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["id", "label", "subtype"], ["a", 0, "control"], ["b", 1, "typical"], ["c", 1, "atypical"]])
    items = image_folder_items(images, labels=tmp_path / "labels.csv", mask_dir=masks)
    assert [(i["id"], i["label"], i["subtype"], i["mask"] is not None) for i in items] == [
        ("a", 0, "control", False),
        ("b", 1, "typical", True),
        ("c", 1, "atypical", False),
    ]
    assert [i["label"] for i in image_folder_items(images)] == [None, None, None]
    with pytest.raises(ValueError, match="no label for image"):
        image_folder_items(images, labels={"a": 0})
    write_nifti(_volume(0), images / "nested" / "a.nii.gz")
    with pytest.raises(ValueError, match="used by both"):
        image_folder_items(images)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no NIfTI/NRRD"):
        image_folder_items(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        image_folder_items(tmp_path / "missing")


# --- DICOM series -----------------------------------------------------------------------------------


def _ct_small():
    import pydicom
    import pydicom.data

    return pydicom.dcmread(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "CT_small.dcm"))


def _write_series(
    folder, n_slices=5, spacing=2.5, orientation=(1, 0, 0, 0, 1, 0), series_uid="1.2.826.0.1.3680043.8.498.1", skip=()
):
    """Slices of CT_small with distinct pixel data, shuffled file names and instance numbers that run backwards."""
    from pydicom.uid import generate_uid

    template = _ct_small()
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    order = np.random.default_rng(0).permutation(n_slices)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_slices):
        if k in skip:
            continue
        ds = copy.deepcopy(template)  # Dataset.copy() is shallow: it would share the element dict
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * spacing * normal]
        ds.InstanceNumber = n_slices - k
        ds.PixelData = (template.pixel_array + 100 * k).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"IM{order[k]:04d}"))  # no suffix, as scanners write them
    return template


def _itk_reference(folder, tmp_path):
    """The same series read by ITK (GDCM) and passed through read_image's NRRD conventions."""
    import itk

    image = itk.imread(str(folder))
    nrrd = tmp_path / f"{folder.name}_itk.nrrd"
    itk.imwrite(image, str(nrrd))
    return read_image(nrrd)


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0.8660254, -0.5)])
def test_dicom_series_matches_itk(tmp_path, orientation):
    folder = tmp_path / "series"
    template = _write_series(folder, orientation=orientation)
    volume, meta = read_dicom_series(folder)
    assert volume.shape == (5, 128, 128) and meta["format"] == "dicom-series"
    for k in range(5):  # sorted by position, modality LUT applied (intercept -1024)
        np.testing.assert_array_equal(volume[k], template.pixel_array + 100 * k - 1024.0)
    reference, reference_meta = _itk_reference(folder, tmp_path)
    np.testing.assert_allclose(volume, reference)
    np.testing.assert_allclose(meta["affine"], reference_meta["affine"], atol=1e-3)


def test_dicom_series_errors_and_items(tmp_path):
    _write_series(tmp_path / "pat1" / "ct", series_uid="1.2.826.0.1.3680043.8.498.11")
    _write_series(tmp_path / "pat2" / "ct", series_uid="1.2.826.0.1.3680043.8.498.12", n_slices=4)
    (tmp_path / "pat2" / "ct" / "notes.txt").write_text("not DICOM")
    assert sorted(len(files) for files in find_dicom_series(tmp_path).values()) == [4, 5]
    with pytest.raises(ValueError, match="2 series"):
        read_dicom_series(tmp_path)
    assert read_dicom_series(tmp_path, series_uid="1.2.826.0.1.3680043.8.498.12")[0].shape == (4, 128, 128)
    _write_series(tmp_path / "gap", series_uid="1.2.826.0.1.3680043.8.498.13", skip=(2,))
    with pytest.raises(ValueError, match="missing slices"):
        read_dicom_series(tmp_path / "gap")
    (tmp_path / "pat2" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no DICOM"):
        find_dicom_series(tmp_path / "pat2" / "empty")
    (tmp_path / "gap").rename(tmp_path.parent / f"{tmp_path.name}_gap")
    items = dicom_series_items(tmp_path, labels={"pat1_ct": 0, "pat2_ct": 1}, progress=False)
    assert [(i["id"], i["label"]) for i in items] == [("pat1_ct", 0), ("pat2_ct", 1)]
    assert LoadItemd()(items[1])["image"].shape == (1, 4, 128, 128)
    converted = dicom_series_dataset(
        tmp_path, labels={"pat1_ct": 0, "pat2_ct": 1}, out_dir=tmp_path.parent / f"{tmp_path.name}_nifti"
    )
    assert converted[0]["image"].endswith("pat1_ct.nii.gz")
    assert read_image(converted[0]["image"])[0].shape == (5, 128, 128)
    with pytest.raises(ValueError, match="no label for series"):
        dicom_series_items(tmp_path, labels={"pat1_ct": 0}, progress=False)
