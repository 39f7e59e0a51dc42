"""A real DICOMweb store for the tests: Orthanc with its DICOMweb plugin on 127.0.0.1, DICOM images made
with pydicom (a CT series, an MR series, a CR and a DX image), STOW-RS, and dciodvfy.

Orthanc and dciodvfy come from Debian (``scripts/install_pacs.sh``, run by ``scripts/install.sh
--test``); a test that needs them and does not find them skips, or fails under CI
(:func:`conftest.not_installed`).

A Lua filter makes the store refuse (403) every STOW-RS into one study, the ``refused_study`` of
:class:`Orthanc`: a real refusal, for the test that the infer answer reports it. (A filter on the
received instances would not do: Orthanc 1.10 drops such an instance but its DICOMweb plugin
reports it as stored.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import requests
from conftest import not_installed
from pydicom.uid import generate_uid
from server_fixtures import new_dicom_dataset, smooth_field

from monai_sal_app.serve import free_port

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # dpkg -L orthanc-dicomweb
_REFUSE_STOW_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == 'POST' and string.find(uri, '/studies/{study}', 1, true) then
    return false
  end
  return true
end
"""


def dciodvfy_or_skip() -> str:
    """The path of ``dciodvfy`` (Debian dicom3tools), or :func:`conftest.not_installed`."""
    path = shutil.which("dciodvfy")
    if path is None:
        not_installed("dciodvfy (Debian package dicom3tools; scripts/install_pacs.sh)")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy``'s report on ``path`` that are errors (warnings are left out)."""
    result = subprocess.run([dciodvfy_or_skip(), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


class Orthanc:
    """A real Orthanc on 127.0.0.1 (a free HTTP port, no DICOM port, no remote access, no
    authentication), its storage in ``folder``; the DICOMweb root is :attr:`dicomweb`. It refuses
    STOW-RS into ``refused_study`` (module docstring)."""

    def __init__(self, folder: Path, refused_study: str) -> None:
        if shutil.which(ORTHANC) is None or not DICOMWEB_PLUGIN.is_file():
            not_installed(
                "Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb; scripts/install_pacs.sh)"
            )
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "refuse_stow.lua").write_text(_REFUSE_STOW_LUA.replace("{study}", refused_study))
        config = {
            "Name": "monai-sal-tests",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [str(folder / "refuse_stow.lua")],
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait until ``/system`` answers."""
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - the process writes it until it stops
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not answer within {timeout} s")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # in case a test left it paused
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def pause(self) -> None:
        """Freeze Orthanc (SIGSTOP): it keeps its port, accepts connections and answers nothing."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stow(self, files: list[Path]) -> None:
        """Store ``files`` by STOW-RS (one multipart request); AssertionError when the store refuses one."""
        boundary = "monai-sal-test-boundary"
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + Path(f).read_bytes() + b"\r\n"
                for f in files
            )
            + f"--{boundary}--\r\n".encode()
        )
        response = requests.post(
            f"{self.dicomweb}/studies",
            data=body,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
            timeout=60,
        )
        assert response.ok and "FailedSOPSequence" not in response.text, response.text

    def series_of_study(self, study_uid: str) -> list[dict]:
        """QIDO-RS: the series of a study, as DICOM JSON."""
        response = requests.get(f"{self.dicomweb}/studies/{study_uid}/series", timeout=30)
        response.raise_for_status()
        return response.json() if response.content else []


def _dataset(path: Path, modality: str, patient: str, study_uid: str, series_uid: str, pixels: np.ndarray):
    """A single-frame DICOM image of ``pixels`` (uint16) with the patient, study and series given."""
    ds = new_dicom_dataset(path, modality)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"Test^{patient}", patient, "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
        "20260101",
        "120000",
        "1",
        "",
        "",
    )
    ds.SeriesNumber, ds.Manufacturer = 1, "monai-sal tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_volume_series(
    folder: Path, modality: str, patient: str, shape=(12, 20, 24), spacing=(2.5, 0.8, 0.9), seed: int = 0
) -> dict:
    """A CT or MR series of ``shape`` (slices, rows, cols) with ``spacing`` (slice, row, column) mm, an
    oblique orientation, its files named in shuffled order; returns {"study", "series", "folder", "files"}."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    volume = np.round(smooth_field(shape, seed=seed) * 3000).astype(np.uint16)
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-20.0, 15.0, 40.0])
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in np.random.default_rng(seed).permutation(shape[0]):
        path = folder / f"IM{len(files):04d}.dcm"
        ds = _dataset(path, modality, patient, study_uid, series_uid, volume[k])
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.ImageOrientationPatient = [f"{v:.8g}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.8g}" for v in origin + k * spacing[0] * normal]
        ds.PixelSpacing = [str(spacing[1]), str(spacing[2])]
        ds.SliceThickness = str(spacing[0])
        ds.InstanceNumber = int(k) + 1
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.save_as(str(path), write_like_original=False)
        files.append(path)
    return {"study": study_uid, "series": series_uid, "folder": folder, "files": files}


def write_projection(path: Path, modality: str, patient: str, shape=(40, 36), seed: int = 0) -> dict:
    """A CR or DX image with ImagerPixelSpacing (0.15 x 0.2 mm) and a Frame of Reference, no patient
    position; returns {"study", "series", "folder", "files"}."""
    study_uid, series_uid = generate_uid(), generate_uid()
    pixels = np.round(smooth_field(shape, seed=seed) * 4000).astype(np.uint16)
    ds = _dataset(path, modality, patient, study_uid, series_uid, pixels)
    ds.ImagerPixelSpacing = ["0.15", "0.2"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientOrientation = ["L", "F"]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), write_like_original=False)
    return {"study": study_uid, "series": series_uid, "folder": path.parent, "files": [path]}


# The DICOMweb server's settings: a time limit short enough for the fault tests, and a cache bound
# (MiB) that holds the CT series (about 29 kB) or the MR series (about 21 kB), not both.
PACS_TIMEOUT_S = 3
PACS_CACHE_MB = 0.035


def start_pacs_server(root: Path):
    """Orthanc with a CT series, an MR series, a CR and a DX image, and a CT series in the study it
    refuses maps for (``refused_ct``), stored by STOW-RS, and the server (``classifier_2d`` and
    ``classifier_3d``, tiny checkpoints) with ``--studies <Orthanc>/dicom-web``, ``dicomweb_timeout_s``
    :data:`PACS_TIMEOUT_S` and ``dicomweb_cache_mb`` :data:`PACS_CACHE_MB`.
    Returns ``(Orthanc, BackgroundServer, {"images": {name: write_* result}, "model_dir", "root"})``."""
    from server_fixtures import save_tiny_checkpoint

    from monai_sal_app.serve import start_background_server

    images = {
        "ct": write_volume_series(root / "images" / "ct", "CT", "PAT-CT", seed=1),
        "mr": write_volume_series(root / "images" / "mr", "MR", "PAT-MR", shape=(10, 18, 16), seed=2),
        "cr": write_projection(root / "images" / "cr" / "cr.dcm", "CR", "PAT-CR", seed=3),
        "dx": write_projection(root / "images" / "dx" / "dx.dcm", "DX", "PAT-DX", seed=4),
        "refused_ct": write_volume_series(root / "images" / "refused", "CT", "PAT-REFUSED", shape=(8, 16, 16), seed=5),
    }
    orthanc = Orthanc(root / "orthanc", refused_study=images["refused_ct"]["study"])
    try:
        for image in images.values():
            orthanc.stow(image["files"])
        model_dir = root / "model"
        save_tiny_checkpoint(model_dir / "classifier_2d.pt", 2, seed=0)
        save_tiny_checkpoint(model_dir / "classifier_3d.pt", 3, seed=1)
        server = start_background_server(
            orthanc.dicomweb,
            conf={
                "model_dir": str(model_dir),
                "dicomweb_timeout_s": str(PACS_TIMEOUT_S),
                "dicomweb_cache_mb": str(PACS_CACHE_MB),
            },
            workdir=root / "run",
            extra_env={"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"},
            timeout=240,
        )
    except BaseException:
        orthanc.stop()
        raise
    return orthanc, server, {"images": images, "model_dir": model_dir, "root": root}
