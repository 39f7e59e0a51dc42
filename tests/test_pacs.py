"""The server with a real DICOMweb store (Orthanc) as its datastore: series of CT, MR, CR and DX
listed, inferred, and their maps stored back into their studies as Parametric Maps that QIDO finds
referencing the source and WADO returns equal to the map the answer carries; a refused STOW, a
store that is slow or down, and the bounded cache of downloaded series."""

from __future__ import annotations

import io
import time

import numpy as np
import pydicom
import pytest
import requests
from pacs_fixtures import PACS_CACHE_MB, PACS_TIMEOUT_S, dciodvfy_errors
from server_fixtures import load_nifti_bytes, post_infer

pytestmark = pytest.mark.server

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
MODEL_OF = {"ct": "classifier_3d", "mr": "classifier_3d", "cr": "classifier_2d", "dx": "classifier_2d"}


def _retrieve(pacs, study: str, series: str) -> list[pydicom.Dataset]:
    """WADO-RS: every instance of a series, parsed by pydicom."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    response = requests.get(
        f"{pacs['orthanc'].dicomweb}/studies/{study}/series/{series}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=60,
    )
    response.raise_for_status()
    parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
    return [pydicom.dcmread(io.BytesIO(part.content)) for part in parts]


def _map_at_positions(parametric_map: pydicom.Dataset) -> dict[tuple, np.ndarray]:
    """{ImagePositionPatient (rounded to 1 µm): frame} of a Parametric Map, read by pydicom."""
    frames = parametric_map.pixel_array.reshape(-1, parametric_map.Rows, parametric_map.Columns)
    return {
        tuple(np.round([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], 3)): frames[k]
        for k, item in enumerate(parametric_map.PerFrameFunctionalGroupsSequence)
    }


def test_the_store_lists_ct_mr_cr_and_dx_series(pacs):
    listed = requests.get(f"{pacs['url']}/datastore/?output=all", timeout=60)
    assert listed.status_code == 200, listed.text
    info = requests.get(f"{pacs['url']}/info/", timeout=60).json()
    assert info["datastore"]["total"] == len(pacs["images"])  # MONAI Label alone lists only CT
    assert set(info["dicomweb"]["modalities"]) == {"CT", "MR", "CR", "DX"}
    for name, image in pacs["images"].items():
        status, result, _heatmap, response = post_infer(
            pacs["url"], MODEL_OF.get(name, "classifier_3d"), image=image["series"], params={"method": "gradient"}
        )
        assert status == 200, (name, response.text)
        assert "dicom" not in result  # stored only when asked (store, or --conf store_heatmaps)


@pytest.mark.parametrize("name", ["ct", "dx"])
def test_a_map_goes_back_into_its_study(pacs, name, tmp_path):
    image = pacs["images"][name]
    status, result, heatmap, response = post_infer(
        pacs["url"], MODEL_OF[name], image=image["series"], params={"method": "gradcam", "store": True}
    )
    assert status == 200, response.text
    assert result["dicom"]["stored"] is True, result["dicom"]
    stored = result["dicom"]["objects"]
    assert [o["sop_class_uid"] for o in stored] == [PARAMETRIC_MAP_STORAGE]
    local_map = np.asarray(load_nifti_bytes(heatmap).get_fdata(dtype=np.float32))

    # QIDO: the study now has a map series that references the source series
    series = pacs["orthanc"].series_of_study(image["study"])
    map_series = [s for s in series if s["0020000E"]["Value"][0] == stored[0]["series_instance_uid"]]
    assert len(map_series) == 1
    [parametric_map] = _retrieve(pacs, image["study"], stored[0]["series_instance_uid"])  # WADO
    assert parametric_map.SOPClassUID == PARAMETRIC_MAP_STORAGE
    assert parametric_map.ReferencedSeriesSequence[0].SeriesInstanceUID == image["series"]
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in image["files"]]
    assert parametric_map.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert parametric_map.StudyInstanceUID == image["study"]
    assert (
        "gradcam" in parametric_map.ContentDescription
        and result["target"]["label"] in parametric_map.ContentDescription
    )
    mapping = parametric_map.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "gradcam" and result["target"]["label"] in mapping.LUTExplanation
    assert parametric_map.BitsAllocated == 32 and "FloatPixelData" in parametric_map

    frames = _map_at_positions(parametric_map)
    if name == "dx":
        np.testing.assert_array_equal(next(iter(frames.values())), local_map)
    else:  # the NIfTI map's slices are the source slices sorted along the normal: match them by position
        positions = sorted(
            (tuple(np.round([float(v) for v in s.ImagePositionPatient], 3)) for s in sources),
            key=lambda p: np.dot(p, np.cross([1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)])),
        )
        assert sorted(frames) == sorted(positions)
        for k, position in enumerate(positions):
            np.testing.assert_array_equal(frames[position], local_map[k])
    path = tmp_path / "map.dcm"
    parametric_map.save_as(str(path))
    assert dciodvfy_errors(path) == []


def test_a_refused_stow_is_reported_and_the_map_still_comes_back(pacs):
    image = pacs["images"]["refused_ct"]
    status, result, heatmap, response = post_infer(
        pacs["url"], "classifier_3d", image=image["series"], params={"method": "gradient", "store": True}
    )
    assert status == 200, response.text
    assert result["dicom"]["stored"] is False and "refused" in result["dicom"]["why"]
    assert load_nifti_bytes(heatmap).shape == (8, 16, 16)


def test_store_is_refused_for_an_upload_and_must_be_true_or_false(pacs):
    upload = pacs["images"]["dx"]["files"][0]
    status, _, _, response = post_infer(pacs["url"], "classifier_2d", file=upload, params={"store": True})
    assert status == 400 and "DICOMweb" in response.json()["detail"]
    status, _, _, response = post_infer(
        pacs["url"], "classifier_2d", image=pacs["images"]["dx"]["series"], params={"store": "yes"}
    )
    assert status == 400 and "true or false" in response.json()["detail"]
    status, _, _, response = post_infer(
        pacs["url"], "classifier_2d", image=pacs["images"]["dx"]["series"], params={"stor": True}
    )
    assert status == 400 and "stor" in response.json()["detail"]


def test_a_slow_store_is_a_503_within_the_time_limit(pacs):
    image = pacs["images"]["mr"]
    pacs["orthanc"].pause()
    try:
        start = time.monotonic()
        status, _, _, response = post_infer(pacs["url"], "classifier_3d", image=image["series"], timeout=120)
        waited = time.monotonic() - start
    finally:
        pacs["orthanc"].resume()
    assert status == 503 and "did not answer in time" in response.json()["detail"], response.text
    print(f"a paused store answered 503 after {waited:.1f} s (time limit {PACS_TIMEOUT_S} s per request)")
    status, _, _, response = post_infer(pacs["url"], "classifier_3d", image=image["series"])
    assert status == 200, response.text


def test_a_store_that_is_down_is_a_503_and_the_server_recovers(pacs):
    image = pacs["images"]["cr"]
    pacs["orthanc"].stop()
    try:
        status, _, _, response = post_infer(pacs["url"], "classifier_2d", image=image["series"], timeout=120)
        info = requests.get(f"{pacs['url']}/info/", timeout=60)
    finally:
        pacs["orthanc"].start()
    assert status == 503 and "cannot be reached" in response.json()["detail"], response.text
    assert info.status_code == 200  # the models are still listed
    status, _, _, response = post_infer(pacs["url"], "classifier_2d", image=image["series"])
    assert status == 200, response.text


def test_the_cache_of_downloaded_series_stays_bounded(pacs):
    cache = next((pacs["root"] / "run" / "dicomweb-cache").iterdir())
    sizes = {}
    for name, before in (("ct", None), ("mr", "ct"), ("ct", "mr")):
        status, _, _, response = post_infer(
            pacs["url"], MODEL_OF[name], image=pacs["images"][name]["series"], params={"method": "gradient"}
        )
        assert status == 200, response.text
        folders = {f.name: f for f in cache.iterdir() if f.is_dir() and f.name[0].isdigit()}
        sizes[name] = sum(p.stat().st_size for p in folders[pacs["images"][name]["series"]].rglob("*") if p.is_file())
        assert sum(p.stat().st_size for f in folders.values() for p in f.rglob("*") if p.is_file()) <= (
            PACS_CACHE_MB * 2**20
        )
        if before is not None:  # the two do not fit together: the one used before is gone
            assert pacs["images"][before]["series"] not in folders
    assert sizes["ct"] + sizes["mr"] > PACS_CACHE_MB * 2**20


def test_monai_sal_serve_with_a_dicomweb_url_lists_the_four_modalities(pacs, tmp_path):
    """The command a user types, started as a process of its own on the same store."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    from monai_sal_app.serve import free_port

    port = free_port()
    command = [sys.executable, "-m", "monai_sal_app.cli", "serve", "--data", "none", "--workdir", str(tmp_path)]
    command += ["--model-dir", str(pacs["model_dir"]), "--studies", pacs["orthanc"].dicomweb, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, info = time.monotonic() + 240, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                info = requests.get(f"http://127.0.0.1:{port}/info/", timeout=30).json()
                break
            except requests.RequestException:
                time.sleep(0.5)
        assert info is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert info["datastore"]["total"] == len(pacs["images"]) and set(info["models"]) == set(MODEL_OF.values())
        # MONAI Label's clients pick the next image from the listed series (active learning)
        picked = requests.post(f"http://127.0.0.1:{port}/activelearning/random", json={}, timeout=60)
        assert picked.status_code == 200, picked.text
        assert picked.json()["id"] in {image["series"] for image in pacs["images"].values()}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
