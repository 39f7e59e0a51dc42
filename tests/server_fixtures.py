"""Files the tests read, the server the server, limits and Slicer tests share, and HTTP helpers.

Tiny checkpoints (a real conv5-fc3, or one with a WILDCAT head, and its card), and smooth random images written as PNG, DICOM
(MONOCHROME1 with a PixelSpacing), 2D NIfTI stored as (H, W, 1), 3D NIfTI with an oblique affine
and NRRD with a non-trivial direction, so that geometry mistakes (a transposed or dropped axis, a
lost spacing or origin) show up as failures. The DICOM and NRRD writers also serve the reader tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import requests
import torch
from conftest import TINY_WILDCAT_HEAD, tiny_card, untrained_explainer
from requests_toolbelt.multipart.decoder import MultipartDecoder
from scipy import ndimage

from monai_sal_app.data.io import write_nifti
from monai_sal_app.evaluation.trust import trust_card
from monai_sal_app.models.checkpoint import build_network, load_classifier, save_classifier

DICOM_SPACING = (0.5, 0.7)  # (row, column) mm
# SOP class by modality: Secondary Capture Image Storage; Digital X-Ray Image Storage - For Presentation
# SOP classes of the single-frame images the tests write: Secondary Capture, CT, MR, CR, DX
DICOM_STORAGE = {
    "OT": "1.2.840.10008.5.1.4.1.1.7",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}


def save_tiny_checkpoint(path: Path, spatial_dims: int, seed: int = 0, **card_fields) -> Path:
    """An untrained ``conftest.tiny_conv5fc3`` (weights seeded with ``seed``) saved at ``path`` as a
    real checkpoint + ``conftest.tiny_card`` (``card_fields``: further or other ModelCard fields,
    e.g. ``decision_threshold``, or ``head=conftest.TINY_WILDCAT_HEAD`` for ``conftest.tiny_wildcat``)."""
    card = tiny_card(spatial_dims, **card_fields)
    torch.manual_seed(seed)
    return save_classifier(build_network(card), path, card)


def tiny_trust_card(checkpoint: Path) -> dict:
    """A real trust card of the tiny checkpoint: randomization and fidelity of two methods on 4 smooth images."""
    model, _ = load_classifier(checkpoint, device="cpu")
    images = torch.from_numpy(np.stack([smooth_field((32, 32), seed=s) for s in range(4)]))[:, None]
    return trust_card(model, images, methods=["gradient", "gradcam"], checks=["randomization", "fidelity"])


def smooth_field(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A smooth random float32 field in [0, 1] of ``shape``."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
    return ((field - field.min()) / (field.max() - field.min())).astype(np.float32)


def write_png(array: np.ndarray, path: Path) -> Path:
    """An 8-bit grayscale PNG of ``array`` (rows, cols) with values in [0, 1]."""
    from PIL import Image

    Image.fromarray(np.round(array * 255).astype(np.uint8)).save(path)
    return path


def new_dicom_dataset(path: Path, modality: str):
    """An empty explicit-VR little-endian DICOM dataset for ``path`` of ``modality`` (a key of
    :data:`DICOM_STORAGE`), with its file meta, SOP class and a new SOP instance UID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DICOM_STORAGE[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "OT",
    bits_stored: int = 16,
    spacing: tuple[float, float] | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    position: tuple[float, float, float] | None = None,
    orientation: tuple[float, ...] | None = None,
) -> Path:
    """A single-frame DICOM of ``pixels`` (rows, cols) stored as uint16, ``bits_stored`` of them
    used; ``modality`` "OT" (Secondary Capture) or "DX" (digital X-ray); optional PixelSpacing
    (row, column) in mm, RescaleSlope/RescaleIntercept, ImagePositionPatient (LPS mm) and
    ImageOrientationPatient (row then column direction cosines, LPS)."""
    ds = new_dicom_dataset(path, modality)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if spacing is not None:
        ds.PixelSpacing = [str(s) for s in spacing]
    if position is not None:
        ds.ImagePositionPatient = [f"{p:.8g}" for p in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{o:.8g}" for o in orientation]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), write_like_original=False)
    return path


def oblique_affine(
    spacing: tuple[float, float, float], origin: tuple[float, float, float], degrees: float
) -> np.ndarray:
    """A 4x4 affine: rotation about the third axis, then per-axis spacing, then origin."""
    t = np.deg2rad(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def write_nrrd(
    array: np.ndarray,
    path: Path,
    spacing: tuple = (1.0, 1.0, 1.0),
    origin: tuple = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
) -> Path:
    """NRRD through ITK, in ``array``'s dtype: ``array`` in numpy (z, y, x) order; spacing/origin
    (x, y, z); ``direction`` a 3x3 LPS matrix (identity when None). Creates the parent folder."""
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    image.SetDirection(itk.matrix_from_array(direction))
    path.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(image, str(path))
    return path


def make_studies(studies: Path) -> dict[str, dict]:
    """Write every test image into ``studies``; returns {id: {"path", "dim", "mask" (path or None)}}."""
    studies.mkdir(parents=True, exist_ok=True)
    masks = studies.parent / "masks"
    masks.mkdir(exist_ok=True)
    items: dict[str, dict] = {}

    png = smooth_field((48, 40), seed=1)
    items["xray_png"] = {"path": write_png(png, studies / "xray_png.png"), "dim": 2, "mask": None}

    raw = np.round(smooth_field((44, 52), seed=2) * 4000 + 10).astype(np.uint16)
    xray = write_dicom(
        studies / "xray_dcm.dcm", raw, photometric="MONOCHROME1", modality="DX", bits_stored=12, spacing=DICOM_SPACING
    )
    items["xray_dcm"] = {"path": xray, "dim": 2, "mask": None, "raw": raw}

    ct2d = smooth_field((36, 40), seed=3)
    affine2d = np.diag([0.8, 0.6, 2.0, 1.0])
    affine2d[:3, 3] = [-10.0, 5.0, 3.0]
    write_nifti(ct2d[..., None], studies / "slice_nii.nii.gz", affine=affine2d)  # stored (H, W, 1)
    mask2d = np.zeros((36, 40), dtype=np.uint8)
    mask2d[8:20, 10:24] = 1
    items["slice_nii"] = {
        "path": studies / "slice_nii.nii.gz",
        "dim": 2,
        "mask": write_nifti(mask2d, masks / "slice_nii_mask.nii.gz", affine=affine2d),
    }

    vol = smooth_field((20, 18, 17), seed=4)
    affine3d = oblique_affine((1.5, 1.2, 2.5), (12.0, -30.0, 7.5), degrees=20)
    write_nifti(vol, studies / "volume_nii.nii.gz", affine=affine3d)
    mask3d = np.zeros(vol.shape, dtype=np.uint8)
    mask3d[4:10, 5:12, 3:9] = 1
    items["volume_nii"] = {
        "path": studies / "volume_nii.nii.gz",
        "dim": 3,
        "mask": write_nifti(mask3d, masks / "volume_nii_mask.nii.gz", affine=affine3d),
    }

    direction = oblique_affine((1, 1, 1), (0, 0, 0), degrees=-15)[:3, :3]
    nrrd = smooth_field((17, 19, 21), seed=5)  # (z, y, x)
    items["volume_nrrd"] = {
        "path": write_nrrd(nrrd, studies / "volume_nrrd.nrrd", (0.9, 1.1, 2.0), (-5.0, 8.0, 40.0), direction),
        "dim": 3,
        "mask": None,
    }
    return items


# ----------------------------------------------------------------------------- the shared server

# The shared server's limits: small enough that a test reaches each of them in a second or two.
TIMEOUT_S = 8  # request_timeout_s
BUDGET = 3.5e8  # max_request_cost
MAX_UPLOAD_MB = 1  # max_upload_mb
# classifier_2d decides at a threshold (as trained models do) and carries test numbers for /info.
CARD_2D = {"decision_threshold": 0.45, "metrics": {"test_auc": 0.93, "test_balanced_accuracy": 0.88, "n_test": 120}}
# Copies, under names of their own, of the models a test trains or rescores: the original stays as
# every other test expects it. {copy: (original, the files of the original copied)}
COPIES = {
    # trained over the API, with a trust card and a mask generator for the weights it had before
    "trained_2d": ("classifier_2d", (".pt", ".json", ".trust.json", ".mask_generator.pt", ".mask_generator.json")),
    "trained_wildcat_2d": ("wildcat_2d", (".pt", ".json")),  # a WILDCAT head trained over the API
    "retrained_2d": ("classifier_2d", (".pt", ".json")),  # retrained while it serves
    "scored_3d": ("classifier_3d", (".pt", ".json")),  # trust cards written by /scoring/trust
}
# The models the shared server serves (broken, no_card and no_input_size are not).
SERVED = {"classifier_2d", "classifier_3d", "wildcat_2d", *COPIES}


def start_shared_server(root: Path):
    """The real server on 127.0.0.1 that the server, limits and Slicer tests share: the app started
    once with uvicorn in a subprocess, serving ``root/model``.

    - ``classifier_2d`` (2D, weights seeded 0, :data:`CARD_2D`) with a trust card and an untrained
      explainer of every kind beside it; ``classifier_3d`` (3D, seed 1, no trust card) with
      explainers trained for other weights (not offered); ``wildcat_2d`` (2D, seed 2, a WILDCAT head);
    - :data:`COPIES` of them for the tests that change a model;
    - ``broken`` (weights that are not weights), ``no_card`` and ``no_input_size``: not served.

    The studies folder holds :func:`make_studies`' images and ``train2d`` (a Shepp-Logan training
    set with its manifest). Limits: :data:`TIMEOUT_S`, :data:`BUDGET`, :data:`MAX_UPLOAD_MB`; no
    background scoring after a training run (a stale trust card stays as the test left it).
    Returns ``(BackgroundServer, {"root", "model_dir", "studies", "items"})``."""
    from monai_sal_app.data.shepp_logan import generate_shepp_logan
    from monai_sal_app.evaluation.trust import write_trust_card
    from monai_sal_app.explainers import EXPLAINER_KINDS, save_explainer
    from monai_sal_app.serve import start_background_server

    model_dir = root / "model"
    save_tiny_checkpoint(model_dir / "classifier_2d.pt", 2, seed=0, **CARD_2D)
    save_tiny_checkpoint(model_dir / "classifier_3d.pt", 3, seed=1)
    save_tiny_checkpoint(model_dir / "wildcat_2d.pt", 2, seed=2, head=TINY_WILDCAT_HEAD)
    write_trust_card(tiny_trust_card(model_dir / "classifier_2d.pt"), model_dir / "classifier_2d.pt")
    classifier_2d, _ = load_classifier(model_dir / "classifier_2d.pt", device="cpu")
    for kind in EXPLAINER_KINDS:
        explainer = untrained_explainer(kind, classifier_2d)
        save_explainer(explainer, model_dir / f"classifier_2d.{kind}.pt", explainer.card)
        save_explainer(explainer, model_dir / f"classifier_3d.{kind}.pt", explainer.card)  # for other weights
    for copy, (original, suffixes) in COPIES.items():
        for suffix in suffixes:
            shutil.copyfile(model_dir / f"{original}{suffix}", model_dir / f"{copy}{suffix}")
    (model_dir / "broken.pt").write_bytes(b"these are not weights")
    shutil.copyfile(model_dir / "classifier_2d.json", model_dir / "broken.json")
    shutil.copyfile(model_dir / "classifier_2d.pt", model_dir / "no_card.pt")
    shutil.copyfile(model_dir / "classifier_2d.pt", model_dir / "no_input_size.pt")
    card = json.loads((model_dir / "classifier_2d.json").read_text())
    del card["input_size"]
    (model_dir / "no_input_size.json").write_text(json.dumps(card))
    studies = root / "studies"
    items = make_studies(studies)
    generate_shepp_logan(studies / "train2d", preset="homogeneous", dim=2, size=32, per_class=6, seed=0, progress=False)
    server = start_background_server(
        studies,
        conf={
            "model_dir": str(model_dir),
            "request_timeout_s": str(TIMEOUT_S),
            "max_upload_mb": str(MAX_UPLOAD_MB),
            "max_request_cost": str(BUDGET),
        },
        workdir=root / "run",
        extra_env={"OMP_NUM_THREADS": "1", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"},
        timeout=240,
    )
    return server, {"root": root, "model_dir": model_dir, "studies": studies, "items": items}


def post_infer(
    url: str,
    model: str,
    *,
    image: str = "",
    session_id: str = "",
    params: dict | str | None = None,
    file: Path | tuple | None = None,
    label: Path | tuple | None = None,
    output: str | None = "all",
    timeout: float = 120,
    headers: dict | None = None,
):
    """Raw-HTTP infer. Returns ``(status, json or None, heatmap NIfTI bytes or None, response)``.

    ``file``/``label``: a path, or ``(filename, bytes)``. ``params`` dict is JSON-encoded; a str is sent as is.
    """
    query = {"image": image}
    if session_id:
        query["session_id"] = session_id
    if output:
        query["output"] = output
    files = {}
    for field, value in (("file", file), ("label", label)):
        if value is not None:
            files[field] = (value.name, value.read_bytes()) if isinstance(value, Path) else value
    data = {"params": params if isinstance(params, str) else json.dumps(params or {})}
    response = requests.post(
        f"{url}/infer/{model}", params=query, data=data, files=files or None, timeout=timeout, headers=headers
    )
    if response.status_code != 200:
        return response.status_code, None, None, response
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("multipart/"):
        parts = MultipartDecoder(response.content, content_type).parts
        result, heatmap = None, None
        for part in parts:
            disposition = part.headers.get(b"Content-Disposition", b"").decode()
            if 'name="params"' in disposition:
                result = json.loads(part.content)
            elif 'name="image"' in disposition:
                heatmap = part.content
        return response.status_code, result, heatmap, response
    return response.status_code, response.json(), None, response


# ----------------------------------------------------------------------------- bad requests


def _bad_file(env: dict, name: str, content: bytes | None = None, array: np.ndarray | None = None) -> Path:
    """A file for a bad request in ``env["bad"]``: ``content`` as is, or ``array`` as NIfTI."""
    path = env["bad"] / name
    if array is not None:
        write_nifti(array, path)
    else:
        path.write_bytes(content)
    return path


# Infer requests every server must answer 4xx with a message, the one that serves the shared
# folders (``env``: its "items", and "bad", a folder for the files of these requests).
BAD_REQUESTS = {
    # name: (post_infer kwargs built from env, expected status, words the message must contain)
    "3d volume to the 2d model": (lambda e: dict(model="classifier_2d", image="volume_nii"), 400, "2D"),
    "2d image to the 3d model": (lambda e: dict(model="classifier_3d", image="xray_png"), 400, "3D"),
    "unreadable nifti": (
        lambda e: dict(file=_bad_file(e, "garbage.nii.gz", b"this is not a nifti file")),
        400,
        "cannot read",
    ),
    "unsupported file type": (lambda e: dict(file=_bad_file(e, "notes.txt", b"hello")), 400, "unsupported"),
    "empty file": (lambda e: dict(file=_bad_file(e, "empty.png", b"")), 400, "cannot read"),
    "nan image": (
        lambda e: dict(file=_bad_file(e, "nan.nii.gz", array=np.where(np.eye(32) > 0, np.nan, 1.0).astype(np.float32))),
        400,
        "NaN",
    ),
    "constant image": (
        lambda e: dict(file=_bad_file(e, "constant.nii.gz", array=np.full((32, 32), 7.0, np.float32))),
        400,
        "constant",
    ),
    "unknown model": (lambda e: dict(model="no_such_model", image="xray_png"), 404, "unknown model"),
    "broken model": (lambda e: dict(model="broken", image="xray_png"), 404, "unknown model"),
    "unknown method": (lambda e: dict(params={"method": "no_such_method"}), 400, "unknown saliency method"),
    "target out of range": (lambda e: dict(params={"target": 2}), 400, "out of range"),
    "negative target": (lambda e: dict(params={"target": -1}), 400, "out of range"),
    "target not a class": (lambda e: dict(params={"target": "tumour"}), 400, "neither"),
    "float target": (lambda e: dict(params={"target": 1.5}), 400, "class index"),
    "unknown parameter": (lambda e: dict(params={"method": "gradcam", "stpes": 5}), 400, "stpes"),
    "bad method option": (lambda e: dict(params={"method": "gradcam", "layer": "no.such.layer"}), 400, "layer"),
    "params not json": (lambda e: dict(params="{method: gradcam"), 400, "not valid JSON"),
    "no input at all": (lambda e: dict(image=""), 400, "no input image"),
    "relative path as id": (lambda e: dict(image="../../etc/passwd"), 400, "not a datastore id"),
    "absolute path as id": (lambda e: dict(image="/etc/passwd"), 400, "not a datastore id"),
    "path injected in params": (lambda e: dict(params={"image": "/etc/passwd"}), 400, "not a datastore id"),
    "label path injected in params": (lambda e: dict(params={"label": "/etc/passwd"}), 400, "'label' form field"),
    "unknown image id": (lambda e: dict(image="no_such_image"), 404, "not found"),
    "unknown session": (lambda e: dict(image="", session_id="../../etc"), 404, "session"),
    "mask on another grid": (
        lambda e: dict(image="slice_nii", label=e["items"]["volume_nii"]["mask"]),
        400,
        "mask shape",
    ),
    "empty mask": (
        lambda e: dict(image="slice_nii", label=_bad_file(e, "empty_mask.nii.gz", array=np.zeros((36, 40), np.uint8))),
        400,
        "foreground",
    ),
    "unreadable mask": (lambda e: dict(image="slice_nii", label=_bad_file(e, "bad_mask.nii.gz", b"nope")), 400, "mask"),
}


def load_nifti_bytes(data: bytes):
    """A nibabel image from the bytes of a .nii file (the server's heatmaps are not compressed)."""
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(data)
