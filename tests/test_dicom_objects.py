"""DICOM in and out without a server: multi-frame (enhanced) CT and MR and single-frame CR and DX read
with the geometry ITK gives them, and saliency maps written as Parametric Maps (and RGB overlays) that
dciodvfy passes and that pydicom reads back equal to the map, frame by frame at matching
ImagePositionPatient; ``monai-sal explain --dicom-out`` on a DICOM series."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest
from conftest import REPO, read_rows
from pacs_fixtures import dciodvfy_errors, write_projection, write_volume_series
from server_fixtures import save_tiny_checkpoint

from monai_sal_app.data.dicom_objects import SaliencyDescription, saliency_objects, write_dicom_objects
from monai_sal_app.data.io import read_image

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
DESCRIPTION = SaliencyDescription("integrated_gradients", "lesion", 0.8125, "classifier_3d")


def _itk_reference(source, tmp_path):
    """``source`` read by ITK (GDCM), passed through read_image's NRRD conventions."""
    import itk

    nrrd = tmp_path / "itk_reference.nrrd"
    itk.imwrite(itk.imread(str(source)), str(nrrd))
    return read_image(nrrd)


def _multiframe(series: dict, path, modality: str, frame_order=None):
    """The series converted by highdicom into one Legacy Converted Enhanced CT/MR file, its frames in
    slice order or in ``frame_order`` (indices into the slices sorted along the normal)."""
    import highdicom as hd

    _, meta = read_image(series["folder"])
    slices = [pydicom.dcmread(file) for file, _ in meta["sources"]]
    if frame_order is not None:
        slices = [slices[k] for k in frame_order]
    convert = {"CT": hd.legacy.LegacyConvertedEnhancedCTImage, "MR": hd.legacy.LegacyConvertedEnhancedMRImage}
    multiframe = convert[modality](
        slices, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1
    )
    multiframe.save_as(str(path))
    return path


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_multiframe_volumes_read_as_itk_reads_them(tmp_path, modality):
    series = write_volume_series(tmp_path / "series", modality, "P1", shape=(7, 12, 10), seed=3)
    volume, meta = read_image(series["folder"])
    enhanced = _multiframe(series, tmp_path / "enhanced.dcm", modality)
    array, enhanced_meta = read_image(enhanced)
    assert enhanced_meta["format"] == "dicom-multiframe" and array.shape == (7, 12, 10)
    reference, reference_meta = _itk_reference(enhanced, tmp_path)
    np.testing.assert_allclose(array, reference)
    np.testing.assert_allclose(enhanced_meta["affine"], reference_meta["affine"], atol=1e-4)
    np.testing.assert_array_equal(array, volume)  # the same slices, in modality units
    np.testing.assert_allclose(enhanced_meta["affine"], meta["affine"], atol=1e-4)
    # frames stored in another order read as the same volume (sorted along the normal)
    shuffled = _multiframe(series, tmp_path / "shuffled.dcm", modality, frame_order=[3, 0, 6, 1, 5, 2, 4])
    array, shuffled_meta = read_image(shuffled)
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(shuffled_meta["affine"], meta["affine"], atol=1e-4)
    assert [frame for _, frame in shuffled_meta["sources"]] == [1, 3, 5, 0, 6, 4, 2]


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_projection_images_use_imager_pixel_spacing_as_itk_does(tmp_path, modality):
    image = write_projection(tmp_path / f"{modality}.dcm", modality, "P2", shape=(30, 26))
    array, meta = read_image(image["files"][0])
    reference, reference_meta = _itk_reference(image["files"][0], tmp_path)
    np.testing.assert_allclose(array, reference.reshape(array.shape))
    np.testing.assert_allclose(meta["affine"], reference_meta["affine"], atol=1e-6)
    assert sorted(np.round(np.linalg.norm(meta["affine"][:3, :2], axis=0), 6)) == [0.15, 0.2]


def _frames_by_position(parametric_map) -> dict[tuple, np.ndarray]:
    """{ImagePositionPatient rounded to 1 µm: frame} as pydicom decodes it (highdicom 0.22's frame
    reader needs BitsStored, which float pixel data has not)."""
    frames = parametric_map.pixel_array.reshape(-1, parametric_map.Rows, parametric_map.Columns)
    return {
        tuple(np.round([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], 3)): frames[k]
        for k, item in enumerate(parametric_map.PerFrameFunctionalGroupsSequence)
    }


def _positions(meta, array) -> list[tuple]:
    """ImagePositionPatient of each array slice (rounded to 1 µm)."""
    if "positions" in meta:
        return [tuple(np.round(p, 3)) for p in meta["positions"]]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ meta["affine"]
    return [tuple(np.round(lps[:3, 3], 3))]


@pytest.mark.parametrize("kind", ["ct_series", "mr_multiframe", "dx"])
def test_saliency_maps_written_as_dicom_read_back_equal_and_pass_dciodvfy(tmp_path, kind):
    if kind == "ct_series":
        source = write_volume_series(tmp_path / "ct", "CT", "P3", shape=(6, 12, 10), seed=4)["folder"]
    elif kind == "mr_multiframe":
        series = write_volume_series(tmp_path / "mr", "MR", "P4", shape=(6, 12, 10), seed=5)
        source = _multiframe(series, tmp_path / "mr.dcm", "MR", frame_order=[5, 3, 1, 0, 2, 4])
    else:
        source = write_projection(tmp_path / "dx" / "dx.dcm", "DX", "P5", shape=(30, 26))["files"][0]
    image, meta = read_image(source)
    saliency = np.random.default_rng(0).normal(scale=1e-3, size=image.shape).astype(np.float32)
    objects = saliency_objects(image, meta, saliency, DESCRIPTION, overlay=True)
    paths = write_dicom_objects(objects, tmp_path / "out")
    assert len(paths) == 1 + (1 if image.ndim == 2 else image.shape[0])  # the map, one overlay per slice
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name
    parametric_map = pydicom.dcmread(str(paths[0]))
    assert parametric_map.SOPClassUID == PARAMETRIC_MAP_STORAGE and parametric_map.BitsAllocated == 32
    first_source = pydicom.dcmread(meta["sources"][0][0], stop_before_pixels=True)
    assert parametric_map.StudyInstanceUID == first_source.StudyInstanceUID
    assert parametric_map.FrameOfReferenceUID == first_source.FrameOfReferenceUID
    assert parametric_map.ReferencedSeriesSequence[0].SeriesInstanceUID == first_source.SeriesInstanceUID
    assert parametric_map.ContentLabel == "INTEGRATED_GRADI" and "class lesion" in parametric_map.ContentDescription
    frames = _frames_by_position(parametric_map)
    slices = saliency if saliency.ndim == 3 else saliency[None]
    positions = _positions(meta, image)
    assert sorted(frames) == sorted(positions)
    for k, position in enumerate(positions):
        np.testing.assert_array_equal(frames[position], slices[k])
    overlay = pydicom.dcmread(str(paths[1]))
    assert overlay.PhotometricInterpretation == "RGB" and overlay.StudyInstanceUID == first_source.StudyInstanceUID


def test_a_map_of_a_non_dicom_image_or_on_another_grid_is_refused(tmp_path):
    from server_fixtures import smooth_field

    from monai_sal_app.data.io import write_nifti

    nifti = write_nifti(smooth_field((8, 8), seed=0), tmp_path / "image.nii.gz")
    image, meta = read_image(nifti)
    with pytest.raises(ValueError, match="DICOM images only"):
        saliency_objects(image, meta, image, DESCRIPTION)
    dx = write_projection(tmp_path / "dx.dcm", "DX", "P6", shape=(10, 12))["files"][0]
    image, meta = read_image(dx)
    with pytest.raises(ValueError, match="differs from the image"):
        saliency_objects(image, meta, image[:5], DESCRIPTION)


@pytest.mark.e2e
def test_explain_dicom_out_writes_the_map_of_a_series_as_a_parametric_map(tmp_path):
    series = write_volume_series(tmp_path / "series", "CT", "P7", shape=(8, 14, 12), seed=6)
    model = save_tiny_checkpoint(tmp_path / "ct_model.pt", 3, seed=1)
    command = [sys.executable, "-m", "monai_sal_app.cli", "--quiet", "explain", "--model", str(model)]
    result = subprocess.run(
        [*command, str(series["folder"]), "--method", "gradient", "--out", str(tmp_path / "maps"),
         "--dicom-out", str(tmp_path / "dicom")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [row] = read_rows(tmp_path / "maps" / "maps.csv")
    local_map, _ = read_image(row["map"], allow_constant=True)
    [path] = (tmp_path / "dicom" / "series" / "gradient").glob("PM_*.dcm")
    assert dciodvfy_errors(path) == []
    _, meta = read_image(series["folder"])
    frames = _frames_by_position(pydicom.dcmread(str(path)))
    for k, position in enumerate(_positions(meta, local_map)):
        np.testing.assert_array_equal(frames[position], local_map[k])

    refused = subprocess.run(
        [*command, row["map"], "--out", str(tmp_path / "maps2"), "--dicom-out", str(tmp_path / "dicom2")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error:") and "not DICOM" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "maps2").exists()
