"""Image reading/writing with clear errors, and the dataset manifest."""

import csv
import gzip
import os

import nibabel
import numpy as np
import pytest
from PIL import Image
from server_fixtures import write_dicom, write_nrrd, write_png

from monai_sal_app.data.io import ImageError, ImageTooLarge, check_image, declared_shape, read_image, write_nifti
from monai_sal_app.data.manifest import COLUMNS, load_images, load_labels, read_manifest, write_manifest


def ramp(shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 7.0 - 3.0


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("shape", [(12, 9), (6, 5, 4)])
def test_nifti_round_trip_keeps_values_axes_and_affine(tmp_path, shape):
    array = ramp(shape)
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.5]
    path = write_nifti(array, tmp_path / "sub" / "x.nii.gz", affine=affine)
    assert path == tmp_path / "sub" / "x.nii.gz"
    read, meta = read_image(path)
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(meta["affine"], affine)
    assert meta["spatial_shape"] == shape and meta["format"] == "nifti"


def test_nifti_trailing_singleton_reads_as_2d_and_default_affine_is_identity(tmp_path):
    write_nifti(ramp((8, 6, 1)), tmp_path / "slice.nii")
    read, meta = read_image(tmp_path / "slice.nii")
    assert read.shape == (8, 6) and meta["spatial_shape"] == (8, 6)
    np.testing.assert_array_equal(meta["affine"], np.eye(4))


def test_write_nifti_data_types(tmp_path):
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:3, 2:4] = True
    write_nifti(mask, tmp_path / "mask.nii.gz")
    assert nibabel.load(tmp_path / "mask.nii.gz").get_data_dtype() == np.uint8
    write_nifti(np.arange(25, dtype=np.int64).reshape(5, 5), tmp_path / "labels.nii.gz")
    assert nibabel.load(tmp_path / "labels.nii.gz").get_data_dtype() == np.int32
    write_nifti(ramp((5, 5)).astype(np.float64), tmp_path / "float.nii.gz")
    assert nibabel.load(tmp_path / "float.nii.gz").get_data_dtype() == np.float32
    np.testing.assert_array_equal(read_image(tmp_path / "mask.nii.gz")[0], mask.astype(np.float32))


def test_write_nifti_rejects_bad_names_and_affines(tmp_path):
    with pytest.raises(ValueError, match=r"\.nii"):
        write_nifti(ramp((4, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="4x4"):
        write_nifti(ramp((4, 4)), tmp_path / "x.nii.gz", affine=np.eye(3))
    with pytest.raises(ImageError, match="empty"):
        write_nifti(np.zeros((0, 4)), tmp_path / "x.nii.gz")
    assert files_in(tmp_path) == []


def failing_save(image, filename):
    with open(filename, "wb") as f:  # leave half a file behind, as a crash in the middle would
        f.write(b"\x1f\x8b partial")
    raise OSError("disk full")


def test_write_nifti_failure_leaves_no_partial_or_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(nibabel, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(ramp((4, 4)), tmp_path / "new.nii.gz")
    assert files_in(tmp_path) == []


def test_write_nifti_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_nifti(ramp((4, 4)), tmp_path / "map.nii.gz")
    monkeypatch.setattr(nibabel, "save", failing_save)
    with pytest.raises(OSError):
        write_nifti(ramp((4, 4)) * 2, path)
    assert files_in(tmp_path) == ["map.nii.gz"]
    np.testing.assert_array_equal(read_image(path)[0], ramp((4, 4)))


def test_write_nifti_success_leaves_only_the_final_file(tmp_path):
    for _ in range(2):
        write_nifti(ramp((4, 4)), tmp_path / "a.nii.gz")
    assert files_in(tmp_path) == ["a.nii.gz"]


# ---------------------------------------------------------------- NRRD


def test_nrrd_reads_with_itk_axes_and_ras_affine(tmp_path):
    import itk

    array = ramp((4, 5, 6))  # (z, y, x)
    image = itk.image_from_array(array)
    image.SetSpacing([0.5, 2.0, 3.0])  # x, y, z
    image.SetOrigin([1.0, 2.0, 3.0])
    itk.imwrite(image, str(tmp_path / "x.nrrd"))
    read, meta = read_image(tmp_path / "x.nrrd")
    np.testing.assert_array_equal(read, array)
    assert meta["format"] == "nrrd"
    k, j, i = 3, 4, 5
    lps = np.array([1.0 + 0.5 * i, 2.0 + 2.0 * j, 3.0 + 3.0 * k])
    ras = meta["affine"] @ np.array([k, j, i, 1.0])
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1])


# ---------------------------------------------------------------- PNG / JPEG


def test_png_grayscale_8_and_16_bit(tmp_path):
    gray = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    read, meta = read_image(tmp_path / "g.png")
    np.testing.assert_array_equal(read, gray.astype(np.float32))
    assert read.dtype == np.float32 and meta["format"] == "png" and meta["spatial_shape"] == (6, 8)

    deep = (np.arange(48).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_array_equal(read_image(tmp_path / "d.png")[0], deep.astype(np.float32))


def test_colour_png_and_jpeg_become_grayscale(tmp_path):
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :3, 0] = 255  # left half red, right half black
    Image.fromarray(rgb).save(tmp_path / "c.png")
    read, _ = read_image(tmp_path / "c.png")
    assert read.shape == (4, 6)
    np.testing.assert_array_equal(read[:, 3:], 0)
    assert np.all((read[:, :3] > 60) & (read[:, :3] < 90))  # ITU-R 601 luminance of red: 76
    Image.fromarray(rgb).save(tmp_path / "c.jpg")
    read_jpeg, meta = read_image(tmp_path / "c.jpg")
    assert read_jpeg.shape == (4, 6) and meta["format"] == "jpeg"


# ---------------------------------------------------------------- DICOM


def test_dicom_rescale(tmp_path):
    pixels = (np.arange(35).reshape(5, 7) * 3).astype(np.uint16)
    write_dicom(tmp_path / "x.dcm", pixels, slope=2, intercept=-100, spacing=(0.5, 0.7))
    read, meta = read_image(tmp_path / "x.dcm")
    np.testing.assert_allclose(read, pixels * 2.0 - 100.0)
    assert meta["format"] == "dicom" and meta["spatial_shape"] == (5, 7)


def _plane_files(folder) -> dict:
    """2D files whose geometry ITK reads in different ways (name -> path)."""
    pixels = (np.arange(35).reshape(5, 7) * 3 + 1).astype(np.uint16)
    tilted = (np.cos(0.3), np.sin(0.3), 0.0, 0.0, 0.0, -1.0)  # rows go along L-P, columns towards feet
    return {
        "png": write_png(pixels / pixels.max(), folder / "x.png"),
        "secondary capture with spacing": write_dicom(folder / "ot.dcm", pixels, spacing=(0.5, 0.7)),
        "dx with pixel spacing": write_dicom(folder / "dx.dcm", pixels, modality="DX", spacing=(0.5, 0.7)),
        "positioned and tilted": write_dicom(
            folder / "ct.dcm", pixels, spacing=(0.5, 0.7), position=(-20.0, 35.0, 12.5), orientation=tilted
        ),
    }


@pytest.mark.parametrize(
    "name", ["png", "secondary capture with spacing", "dx with pixel spacing", "positioned and tilted"]
)
def test_png_and_dicom_pixels_are_where_itk_places_them(tmp_path, name):
    """Slicer reads PNG and DICOM through ITK: pixel (row r, column c) is ITK index (c, r), whose LPS
    point, with L and P negated, is the RAS position our affine must give to array index (r, c)."""
    import itk

    path = _plane_files(tmp_path)[name]
    _, meta = read_image(path)
    image = itk.imread(str(path))
    for r, c in [(0, 0), (4, 0), (0, 6), (3, 5)]:
        index = [c, r] + [0] * (image.GetImageDimension() - 2)
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        lps = np.pad(lps, (0, 3 - len(lps)))
        np.testing.assert_allclose((meta["affine"] @ [r, c, 0, 1])[:3], lps * [-1, -1, 1], atol=1e-5)
    if name == "positioned and tilted":  # the file's own position and spacing reach the affine
        np.testing.assert_allclose(meta["affine"][:3, 3], [20.0, -35.0, 12.5])
        np.testing.assert_allclose(np.linalg.norm(meta["affine"][:3, :2], axis=0), [0.5, 0.7])


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = (np.arange(35).reshape(5, 7) * 3 + 10).astype(np.uint16)
    write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
    read, _ = read_image(tmp_path / "m1.dcm")
    brightest_stored = np.unravel_index(pixels.argmax(), pixels.shape)
    darkest_stored = np.unravel_index(pixels.argmin(), pixels.shape)
    assert read[brightest_stored] == pixels.min() and read[darkest_stored] == pixels.max()
    np.testing.assert_allclose(read, pixels.max() + pixels.min() - pixels.astype(np.float32))


def test_dicom_without_suffix_is_found_by_its_preamble(tmp_path):
    pixels = np.arange(20).reshape(4, 5).astype(np.uint16)
    write_dicom(tmp_path / "IM0001", pixels)
    read, meta = read_image(tmp_path / "IM0001")
    assert meta["format"] == "dicom"
    np.testing.assert_array_equal(read, pixels)


# ---------------------------------------------------------------- errors


def raw_nifti(path, array):
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize("bad,message", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_non_finite_images_are_refused(tmp_path, bad, message):
    array = ramp((6, 6))
    array[2, 3] = bad
    path = raw_nifti(tmp_path / "bad.nii.gz", array)
    with pytest.raises(ImageError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_constant_image_is_refused_unless_allowed(tmp_path):
    path = raw_nifti(tmp_path / "flat.nii.gz", np.full((6, 6), 3.0, dtype=np.float32))
    with pytest.raises(ImageError, match="constant"):
        read_image(path)
    read, _ = read_image(path, allow_constant=True)
    assert read.shape == (6, 6)


def test_check_image_on_arrays():
    check_image(ramp((3, 3)))
    with pytest.raises(ImageError, match="scan-7: .*empty"):
        check_image(np.zeros((0, 3)), name="scan-7")
    with pytest.raises(ImageError, match="NaN"):
        check_image(np.array([[0.0, np.nan]]))
    with pytest.raises(ImageError, match="constant"):
        check_image(np.zeros((4, 4), dtype=np.uint8))
    check_image(np.zeros((4, 4)), allow_constant=True)
    with pytest.raises(ImageError, match="not numeric"):
        check_image(np.array([["a", "b"]]))


def test_corrupt_files_raise_image_error_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    good = write_nifti(ramp((16, 16, 8)), tmp_path / "good.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    uncompressed_as_gz = tmp_path / "plain.nii.gz"
    uncompressed_as_gz.write_bytes(gzip.decompress(good.read_bytes())[:200])
    png = tmp_path / "broken.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    dcm = tmp_path / "broken.dcm"
    dcm.write_bytes(b"\0" * 64)
    nrrd = tmp_path / "broken.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: float\ndimension: 9\n")
    for path in (garbage, truncated, uncompressed_as_gz, png, dcm, nrrd):
        with pytest.raises(ImageError, match="cannot read") as info:
            read_image(path)
        assert str(path) in str(info.value), path


def test_unknown_type_missing_file_and_directory(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageError, match="unsupported image type"):
        read_image(text)
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)


def test_4d_image_is_refused(tmp_path):
    path = raw_nifti(tmp_path / "t.nii.gz", ramp((3, 3, 3, 2)))
    with pytest.raises(ImageError, match="expected 2D or 3D"):
        read_image(path)


# ---------------------------------------------------------------- manifest


def make_dataset(folder, n=3, shape=(6, 5)):
    rows = []
    for k in range(n):
        image = write_nifti(ramp(shape) + k, folder / "images" / f"s{k}.nii.gz")
        mask = np.zeros(shape, dtype=bool)
        mask[k, :2] = True
        mask_path = write_nifti(mask, folder / "masks" / f"s{k}.nii.gz")
        rows.append(
            {
                "id": f"s{k}",
                "image": image,
                "label": k % 2,
                "subtype": "typical" if k % 2 else "control",
                "mask": mask_path if k % 2 else None,
                "mask_bottom": f"masks/s{k}.nii.gz",
            }
        )
    return rows


def test_manifest_round_trip_with_relative_paths(tmp_path):
    rows = make_dataset(tmp_path)
    path = write_manifest(tmp_path / "manifest.csv", rows)
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    assert tuple(raw[0]) == COLUMNS
    assert raw[1]["image"] == "images/s1.nii.gz" and raw[1]["mask"] == "masks/s1.nii.gz"
    assert raw[0]["mask"] == "" and raw[0]["mask_top"] == ""
    items = read_manifest(path)
    assert [i["id"] for i in items] == ["s0", "s1", "s2"]
    assert [i["label"] for i in items] == [0, 1, 0]
    assert items[1]["image"] == str(tmp_path / "images" / "s1.nii.gz")
    assert items[1]["mask"] == str(tmp_path / "masks" / "s1.nii.gz") and items[0]["mask"] is None
    assert items[2]["mask_bottom"] == str(tmp_path / "masks" / "s2.nii.gz") and items[2]["mask_top"] is None
    assert all(os.path.isabs(i["image"]) for i in items)
    assert files_in(tmp_path) == ["images", "manifest.csv", "masks"]

    x = load_images(items)
    assert x.dtype.is_floating_point and tuple(x.shape) == (3, 1, 6, 5)
    np.testing.assert_array_equal(x[2, 0].numpy(), ramp((6, 5)) + 2)
    masks = load_images(items, key="mask_bottom")
    assert masks[1, 0, 1, :2].tolist() == [1.0, 1.0] and float(masks.sum()) == 6.0
    y = load_labels(items)
    assert str(y.dtype) == "torch.int64" and y.tolist() == [0, 1, 0]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_manifest_with_only_required_columns_and_an_absolute_path_outside(tmp_path):
    outside = write_nifti(ramp((4, 4)), tmp_path / "elsewhere" / "a.nii.gz")
    folder = tmp_path / "data"
    folder.mkdir()
    path = write_csv(folder / "m.csv", ["label", "image", "id"], [["1", str(outside), "a"]])
    (item,) = read_manifest(path)
    assert item == {
        "id": "a",
        "image": str(outside),
        "label": 1,
        "subtype": "",
        "mask": None,
        "mask_top": None,
        "mask_bottom": None,
    }


@pytest.mark.parametrize(
    "header,row,message",
    [
        (["id", "image"], ["a", "a.nii.gz"], "missing required column.*label"),
        (["id", "image", "label"], ["a", "a.nii.gz", "yes"], "line 2: label 'yes' is not an integer"),
        (["id", "image", "label"], ["a", "a.nii.gz", "1.5"], "not an integer"),
        (["id", "image", "label"], ["a", "../a.nii.gz", "1"], "leaves the manifest's folder"),
        (["id", "image", "label"], ["a", "images/../../a.nii.gz", "1"], "leaves the manifest's folder"),
        (["id", "image", "label", "mask"], ["a", "a.nii.gz", "1", "../m.nii.gz"], "leaves the manifest's folder"),
        (["id", "image", "label"], ["", "a.nii.gz", "1"], "empty id"),
        (["id", "image", "label"], ["a", "", "1"], "empty image"),
    ],
)
def test_bad_manifests_raise_naming_file_and_problem(tmp_path, header, row, message):
    path = write_csv(tmp_path / "m.csv", header, [row])
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_manifest_missing_empty_or_duplicated(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="no rows"):
        read_manifest(write_csv(tmp_path / "empty.csv", ["id", "image", "label"], []))
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        read_manifest(
            write_csv(tmp_path / "dup.csv", ["id", "image", "label"], [["a", "x.nii", "0"], ["a", "y.nii", "1"]])
        )


def test_write_manifest_validates_rows_and_is_atomic(tmp_path, monkeypatch):
    good = [{"id": "a", "image": "a.nii.gz", "label": 0}]
    for rows, message in [
        ([{"id": "a", "image": "a.nii.gz"}], "missing 'label'"),
        ([{"id": "a", "image": "a.nii.gz", "label": "x"}], "not an integer"),
        ([{"id": "a", "image": "a.nii.gz", "label": 0, "weight": 2}], "unknown column"),
        (good + good, "duplicate id"),
        ([{"id": "a", "image": "../a.nii.gz", "label": 0}], "leaves the manifest's folder"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_manifest(tmp_path / "m.csv", rows)
    assert files_in(tmp_path) == []

    path = write_manifest(tmp_path / "m.csv", good)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_manifest(path, [{"id": "b", "image": "b.nii.gz", "label": 1}])
    assert files_in(tmp_path) == ["m.csv"] and path.read_bytes() == before


def test_load_images_names_the_first_mismatching_id(tmp_path):
    items = [
        {"id": "ok", "image": str(write_nifti(ramp((6, 5)), tmp_path / "a.nii.gz")), "label": 0},
        {"id": "wrong-size", "image": str(write_nifti(ramp((6, 4)), tmp_path / "b.nii.gz")), "label": 1},
    ]
    with pytest.raises(ValueError, match="wrong-size.*(6, 4)"):
        load_images(items)
    items.append({"id": "flat", "image": str(write_nifti(np.ones((6, 5)), tmp_path / "c.nii.gz")), "label": 0})
    with pytest.raises(ImageError, match="flat: .*constant"):
        load_images([items[0], items[2]])
    with pytest.raises(ValueError, match="no 'mask'"):
        load_images(items, key="mask")
    with pytest.raises(ValueError, match="missing: label None"):
        load_labels([{"id": "missing", "image": "x", "label": None}])


def test_declared_shape_reads_headers_only_and_max_voxels_refuses_before_decoding(tmp_path):
    field = np.linspace(0, 1, 12 * 10, dtype=np.float32).reshape(12, 10)
    files = {
        write_nifti(np.stack([field] * 3, axis=-1), tmp_path / "v.nii.gz"): (12, 10, 3),
        write_nrrd(np.stack([field] * 3), tmp_path / "v.nrrd"): (3, 12, 10),
        write_png(field, tmp_path / "x.png"): (12, 10),
        write_dicom(tmp_path / "x.dcm", np.round(field * 1000).astype(np.uint16)): (12, 10),
    }
    for path, shape in files.items():
        assert declared_shape(path) == shape, path
        dims = 3 if len(shape) == 3 else 2
        read_image(path, max_voxels={dims: int(np.prod(shape))})  # at the limit: read
        with pytest.raises(ImageTooLarge, match="nothing was decoded"):
            read_image(path, max_voxels={dims: int(np.prod(shape)) - 1})
    header = nibabel.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(header.binaryblock + b"\0" * 1024))
    with pytest.raises(ImageTooLarge, match="4096x4096x4096"):
        read_image(bomb, max_voxels={2: 8192**2, 3: 512**3})


def test_gzipped_data_inflating_past_its_header_is_refused(tmp_path):
    nrrd = tmp_path / "long.nrrd"
    head = b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nendian: little\nencoding: gzip\n\n"
    values = np.arange(64, dtype=np.float32).tobytes()
    nrrd.write_bytes(head + gzip.compress(values + b"\0" * (32 << 20)))
    with pytest.raises(ImageError, match="inflates past the 256 bytes its header declares"):
        read_image(nrrd)
    nrrd.write_bytes(head + gzip.compress(values))
    np.testing.assert_array_equal(read_image(nrrd)[0].ravel(), np.arange(64))
    good = write_nifti(np.arange(60, dtype=np.float32).reshape(3, 4, 5), tmp_path / "good.nii.gz")
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(gzip.compress(gzip.decompress(good.read_bytes()) + b"\0" * (32 << 20)))
    with pytest.raises(ImageError, match="inflates past"):
        read_image(padded)
