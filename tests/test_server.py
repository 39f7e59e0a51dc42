"""The MONAI Label app over real HTTP: uvicorn on 127.0.0.1 in a subprocess, tiny checkpoints, tiny images.

Every answer is checked against the in-process path (``load_classifier`` + ``explain_array`` on the
same checkpoint and ``read_image`` of the same file), mask metrics against ``monai-sal evaluate``'s
own function, and heatmap geometry against the input's (nibabel affine, and ITK's physical points
for NRRD). The server is the one the session shares (``conftest.served``); a test that trains or
rescores a model does so on a copy of its own (``server_fixtures.COPIES``).
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from conftest import LABELS, images_for
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from server_fixtures import BAD_REQUESTS, CARD_2D, SERVED, load_nifti_bytes, post_infer

from monai_sal_app.data.io import read_image
from monai_sal_app.evaluation.trust import trust_card, write_trust_card
from monai_sal_app.experiments.workflows import evaluate_maps
from monai_sal_app.inference import explain_array
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.models.device import default_device
from monai_sal_app.saliency import available_methods, get_method

pytestmark = pytest.mark.server  # every test here asks the real server

MODEL_OF_DIM = {2: "classifier_2d", 3: "classifier_3d"}
# The methods that explain any classifier, as /info lists them for the plain models.
ANY_MODEL_METHODS = {name: spec for name, spec in available_methods().items() if get_method(name).requires is None}
# classifier_2d has every trained explainer beside it; classifier_3d ones trained for other weights (not offered).
WITH_EXPLAINER = ANY_MODEL_METHODS
WITHOUT_EXPLAINER = {name: spec for name, spec in ANY_MODEL_METHODS.items() if get_method(name).explainer is None}


def as_json(value):
    """``value`` as a client reads it back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def env(served, tmp_path_factory):
    """The shared server (``conftest.served``), and a folder for the files of the bad requests."""
    return {**served, "bad": tmp_path_factory.mktemp("bad")}


def in_process(env, model: str, path: Path, method: str = "gradcam", target=None, params=None, array=None):
    """The CLI's path on the same checkpoint and file: ``(Explanation, read_image meta)``."""
    network, card = load_classifier(env["model_dir"] / f"{model}.pt", device="cpu")
    image, meta = read_image(path)
    kind = get_method(method).explainer
    if kind is not None:  # the server's: the explainer checkpoint beside the model
        params = {**(params or {}), "explainer": str(env["model_dir"] / f"{model}.{kind}.pt")}
    return explain_array(network, card, image if array is None else array, method, target=target, params=params), meta


def assert_matches_in_process(
    env,
    result: dict,
    heatmap: nib.Nifti1Image,
    model: str,
    path: Path,
    method="gradcam",
    target=None,
    params=None,
    array=None,
):
    expected, meta = in_process(env, model, path, method, target, params, array)
    np.testing.assert_allclose(
        [result["probabilities"][label] for label in LABELS], expected.probabilities, rtol=1e-5, atol=1e-7
    )
    assert result["prediction"]["index"] == expected.prediction
    assert result["target"]["index"] == expected.target
    assert result["method"] == method
    data = np.asarray(heatmap.dataobj)
    assert data.dtype == np.float32
    np.testing.assert_allclose(
        data.reshape(expected.saliency.shape),
        expected.saliency,
        rtol=1e-4,
        atol=1e-6 * max(1.0, float(np.abs(expected.saliency).max())),
    )
    np.testing.assert_allclose(heatmap.affine, meta["affine"], atol=1e-5)
    return expected


# ------------------------------------------------------------------------------------------------
# /info
# ------------------------------------------------------------------------------------------------


def test_info_lists_servable_models_with_methods_and_device(env):
    info = requests.get(f"{env['url']}/info/", timeout=30).json()
    # broken.pt, no_card.pt and no_input_size.pt are left out
    assert set(info["models"]) == SERVED
    assert info["device"] == str(default_device())
    for dim, name in MODEL_OF_DIM.items():
        model = info["models"][name]
        assert model["dimension"] == dim
        assert model["labels"] == LABELS
        assert model["input_size"] == ([32, 32] if dim == 2 else [16, 16, 16])
        assert model["methods"] == as_json(WITH_EXPLAINER if dim == 2 else WITHOUT_EXPLAINER)
        assert model["device"] == str(default_device())
        assert model["default_method"] in model["methods"]
    assert info["models"]["classifier_2d"]["decision_threshold"] == CARD_2D["decision_threshold"]
    assert info["models"]["classifier_2d"]["metrics"] == CARD_2D["metrics"]
    assert info["models"]["classifier_3d"]["decision_threshold"] is None
    trust = info["models"]["classifier_2d"]["trust"]
    assert trust["available"] and not trust["stale"] and set(trust["methods"]) == {"gradient", "gradcam"}
    assert set(trust["methods"]["gradcam"]["verdicts"]) == {"randomization", "fidelity"}
    assert trust["data"]["n_images"] == 4
    assert info["models"]["classifier_3d"]["trust"] == {
        "available": False,
        "why": "no trust card: monai-sal trust --model classifier_3d.pt <images>",
    }
    wildcat_methods = {name: spec for name, spec in available_methods().items() if get_method(name).explainer is None}
    assert info["models"]["wildcat_2d"]["methods"] == as_json(wildcat_methods)  # "wildcat" among them
    assert set(info["trainers"]) == SERVED  # the explainer checkpoints are not models of their own
    log = env["server"].log()
    assert "model broken is not served" in log and "model no_card is not served: model card missing" in log
    assert "model no_input_size is not served" in log and "model card field 'input_size': missing" in log
    assert "model classifier_3d: method mask_generator is not offered: this mask_generator was trained for" in log


# ------------------------------------------------------------------------------------------------
# inputs: datastore, session, direct upload; 2D PNG / DICOM / NIfTI and 3D NIfTI / NRRD
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_id", ["xray_png", "xray_dcm", "slice_nii", "volume_nii", "volume_nrrd"])
def test_datastore_image_with_monailabel_client(env, tmp_path, image_id):
    item = env["items"][image_id]
    client = MONAILabelClient(env["url"], tmpdir=str(tmp_path))
    model = MODEL_OF_DIM[item["dim"]]
    heatmap_file, result = client.infer(model, image_id, {"method": "gradcam"})
    heatmap = nib.load(heatmap_file)
    input_array, _meta = read_image(item["path"])
    assert assert_matches_in_process(env, result, heatmap, model, item["path"]).saliency.shape == input_array.shape
    assert result["image"]["shape"] == list(input_array.shape) == result["heatmap"]["shape"]
    if image_id == "slice_nii":  # stored (H, W, 1): the heatmap keeps the file's own shape and affine
        source = nib.load(item["path"])
        assert heatmap.shape == source.shape == (36, 40, 1)
        np.testing.assert_allclose(heatmap.affine, source.affine)
    else:
        assert heatmap.shape == input_array.shape
    if image_id in ("xray_png", "xray_dcm"):  # each map pixel where ITK (and so Slicer) places the image's
        import itk

        source = itk.imread(str(item["path"]))
        rows, cols = input_array.shape
        for r, c in [(0, 0), (rows - 1, 0), (0, cols - 1), (5, 7)]:
            lps = np.array(source.TransformIndexToPhysicalPoint([c, r, 0][: source.GetImageDimension()]))
            np.testing.assert_allclose((heatmap.affine @ [r, c, 0, 1])[:2], -lps[:2], atol=1e-5)


def test_dicom_monochrome1_is_inverted(env, tmp_path):
    item = env["items"]["xray_dcm"]
    raw = item["raw"].astype(np.float32)
    inverted = raw.max() + raw.min() - raw  # MONOCHROME1: high value = dark
    status, result, heatmap, _ = post_infer(env["url"], "classifier_2d", image="xray_dcm")
    assert status == 200
    assert_matches_in_process(env, result, load_nifti_bytes(heatmap), "classifier_2d", item["path"], array=inverted)


def test_nrrd_heatmap_has_the_input_physical_grid(env):
    import itk

    item = env["items"]["volume_nrrd"]
    status, _, heatmap_bytes, _ = post_infer(env["url"], "classifier_3d", image="volume_nrrd")
    assert status == 200
    heatmap = load_nifti_bytes(heatmap_bytes)
    source = itk.imread(str(item["path"]))
    size = list(source.GetLargestPossibleRegion().GetSize())  # (x, y, z)
    assert heatmap.shape == tuple(reversed(size))  # numpy (z, y, x), as read_image returns the NRRD
    for index in ([0, 0, 0], [size[0] - 1, 0, 0], [0, size[1] - 1, size[2] - 1], [3, 5, 7]):
        lps = np.array(source.TransformIndexToPhysicalPoint([int(i) for i in index]))
        ras = heatmap.affine @ np.array([index[2], index[1], index[0], 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)


@pytest.mark.parametrize("image_id", ["xray_png", "xray_dcm", "slice_nii", "volume_nii"])
def test_session_upload(env, tmp_path, image_id):
    item = env["items"][image_id]
    client = MONAILabelClient(env["url"], tmpdir=str(tmp_path))
    session_id = client.create_session(str(item["path"]))["session_id"]
    model = MODEL_OF_DIM[item["dim"]]
    heatmap_file, result = client.infer(model, "", {"method": "gradient"}, session_id=session_id)
    assert_matches_in_process(env, result, nib.load(heatmap_file), model, item["path"], method="gradient")


@pytest.mark.parametrize("image_id", ["xray_png", "xray_dcm", "slice_nii", "volume_nii", "volume_nrrd"])
def test_direct_upload_raw_http(env, image_id):
    item = env["items"][image_id]
    model = MODEL_OF_DIM[item["dim"]]
    status, result, heatmap, response = post_infer(
        env["url"], model, file=item["path"], params={"method": "gradcam", "target": 1}
    )
    assert status == 200, response.text
    assert result["target"] == {"index": 1, "label": "patient", "probability": result["probabilities"]["patient"]}
    assert_matches_in_process(env, result, load_nifti_bytes(heatmap), model, item["path"], target=1)


def test_direct_upload_with_monailabel_client(env, tmp_path):
    item = env["items"]["volume_nii"]
    client = MONAILabelClient(env["url"], tmpdir=str(tmp_path))
    heatmap_file, result = client.infer("classifier_3d", "", {"target": "patient"}, file=str(item["path"]))
    assert result["target"]["label"] == "patient"
    assert_matches_in_process(env, result, nib.load(heatmap_file), "classifier_3d", item["path"], target=1)


def test_output_json_has_no_heatmap_and_same_numbers(env):
    status, result, heatmap, response = post_infer(env["url"], "classifier_2d", image="slice_nii", output="json")
    assert status == 200 and heatmap is None
    assert response.headers["content-type"].startswith("application/json")
    expected, _ = in_process(env, "classifier_2d", env["items"]["slice_nii"]["path"])
    np.testing.assert_allclose(list(result["probabilities"].values()), expected.probabilities, rtol=1e-5)
    assert set(result["seconds"]) >= {"read", "predict", "explain", "total", "write", "task_total"}
    assert result["device"] == str(default_device())
    assert result["params"] == as_json(available_methods()["gradcam"]["defaults"])


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_registered_method_runs_under_the_server(env, method):
    """Gradient-based methods need autograd although MONAI Label serves under no_grad. A method
    for one kind of model only (``wildcat``) runs on the model it explains."""
    model = "classifier_2d" if method in ANY_MODEL_METHODS else "wildcat_2d"
    item = env["items"]["slice_nii"]
    status, result, heatmap, response = post_infer(env["url"], model, image="slice_nii", params={"method": method})
    assert status == 200, response.text
    assert_matches_in_process(env, result, load_nifti_bytes(heatmap), model, item["path"], method=method)
    if get_method(method).explainer:
        assert result["params"]["explainer"] == f"classifier_2d.{method}.pt"


def test_a_client_cannot_name_an_explainer_file(env):
    params = {"method": "mask_generator", "explainer": "/etc/passwd"}
    status, _, _, response = post_infer(env["url"], "classifier_2d", image="slice_nii", params=params)
    assert status == 400 and "'explainer' is not a request parameter" in response.json()["detail"]
    status, _, _, response = post_infer(
        env["url"], "classifier_3d", image="volume_nii", params={"method": "mask_generator"}
    )
    message = "saliency method 'mask_generator' cannot explain this model: it needs a mask_generator trained for its"
    assert status == 400 and message in response.json()["detail"]


def test_wildcat_on_a_model_without_the_head_is_a_400_naming_what_it_needs(env):
    status, _, _, response = post_infer(env["url"], "classifier_2d", image="slice_nii", params={"method": "wildcat"})
    assert status == 400
    message = response.json()["detail"]
    assert "saliency method 'wildcat' cannot explain this model: it needs a model with a WILDCAT head" in message
    assert "available for this model: " in message and "gradcam" in message


def test_method_options_are_passed_and_echoed(env):
    status, result, heatmap, response = post_infer(
        env["url"], "classifier_2d", image="xray_png", params={"method": "gradcam", "layer": "features.2", "target": 0}
    )
    assert status == 200, response.text
    assert result["params"]["layer"] == "features.2"
    assert_matches_in_process(
        env,
        result,
        load_nifti_bytes(heatmap),
        "classifier_2d",
        env["items"]["xray_png"]["path"],
        target=0,
        params={"layer": "features.2"},
    )


# ------------------------------------------------------------------------------------------------
# masks in, metrics out
# ------------------------------------------------------------------------------------------------


def test_every_answer_carries_the_trust_of_its_method(env):
    _, result, _, response = post_infer(
        env["url"], "classifier_2d", image="xray_png", output="json", params={"method": "gradcam"}
    )
    assert response.status_code == 200, response.text
    trust = result["trust"]
    assert trust["available"] and trust["randomization"]["answer"] in ("yes", "no", "unclear")
    assert trust["verdicts"]["fidelity"] in ("yes", "no", "unclear")
    assert [line.split(":")[0] for line in trust["lines"]] == [
        "Depends on what the model learned",
        "Tracks what the model uses",
    ]
    assert trust["reading"].startswith("'yes' is a minimum requirement") and trust["schema"] == 2
    _, other, _, _ = post_infer(
        env["url"], "classifier_2d", image="xray_png", output="json", params={"method": "smoothgrad", "n_samples": 2}
    )
    assert other["trust"]["available"] is False and "no entry for 'smoothgrad'" in other["trust"]["why"]
    _, three_d, _, _ = post_infer(env["url"], "classifier_3d", image="volume_nii", output="json")
    assert three_d["trust"]["available"] is False


def test_scoring_recomputes_a_trust_card_on_the_datastore(env):
    url, card_path = env["url"], env["model_dir"] / "scored_3d.trust.json"
    params = {"model": "scored_3d", "methods": ["gradient"], "checks": ["randomization", "localization"]}
    response = requests.post(f"{url}/scoring/trust", params={"run_sync": "true"}, json=params, timeout=300)
    assert response.status_code == 200, response.text
    result = response.json()["scored_3d"]
    assert result["n_images"] == sum(item["dim"] == 3 for item in env["items"].values())
    assert set(result["verdicts"]["gradient"]) == {"randomization"}  # the datastore has no masks of these volumes
    card = json.loads(card_path.read_text())
    assert card["data"]["source"] == "datastore" and list(card["methods"]) == ["gradient"]
    assert card["methods"]["gradient"]["localization"] == {"available": False, "why": "no masks given"}
    trust = requests.get(f"{url}/info/", timeout=30).json()["models"]["scored_3d"]["trust"]
    assert trust["available"] and not trust["stale"] and set(trust["methods"]) == {"gradient"}
    assert trust["data"]["images"] == card["data"]["images"] and len(card["data"]["images"]) == result["n_images"]
    bad = requests.post(f"{url}/scoring/trust", params={"run_sync": "true"}, json={"model": "nope"}, timeout=60)
    assert bad.status_code == 404 and "unknown model" in bad.json()["detail"]


def score_trust(url: str, **params) -> dict:
    """``POST /scoring/trust`` (synchronous) for scored_3d with gradient's randomization; its answer."""
    body = {"model": "scored_3d", "methods": ["gradient"], "checks": ["randomization"], **params}
    response = requests.post(f"{url}/scoring/trust", params={"run_sync": "true"}, json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["scored_3d"]


def test_the_served_card_is_never_silently_replaced_by_a_weaker_one(env):
    """Rescoring the same datastore images keeps the card; fewer images keep it unless the request
    says replace; a card of an older schema is never read, and is replaced."""
    url, card_path = env["url"], env["model_dir"] / "scored_3d.trust.json"
    volumes = sum(item["dim"] == 3 for item in env["items"].values())
    assert score_trust(url, replace=True)["written"]
    written = card_path.read_bytes()
    assert "already rests on these" in score_trust(url)["kept"]  # automatic rescoring: no churn
    assert card_path.read_bytes() == written
    # a card on more held-out images than the datastore holds, as `monai-sal serve` writes at first start
    model, _ = load_classifier(env["model_dir"] / "scored_3d.pt", device="cpu")
    held_out = images_for(3, n=volumes + 1, seed=9)
    stronger = trust_card(model, held_out, methods=["gradient"], checks=["randomization"], data={"source": "held out"})
    write_trust_card(stronger, env["model_dir"] / "scored_3d.pt")
    kept = score_trust(url)["kept"]
    assert f"rests on {volumes + 1} images (held out)" in kept and "replace=true" in kept
    assert json.loads(card_path.read_text()) == json.loads(json.dumps(stronger))
    assert score_trust(url, replace=True)["n_images"] == volumes
    written = card_path.read_bytes()
    assert json.loads(written)["data"]["n_images"] == volumes

    old = {key: value for key, value in json.loads(written).items() if key != "schema"}
    card_path.write_text(json.dumps(old))
    trust = requests.get(f"{url}/info/", timeout=30).json()["models"]["scored_3d"]["trust"]
    assert trust["available"] is False and "schema 1, this monai-sal reads schema 2" in trust["why"]
    assert score_trust(url)["written"]  # an outdated card is replaced
    assert requests.get(f"{url}/info/", timeout=30).json()["models"]["scored_3d"]["trust"]["available"]
    card_path.unlink()


@pytest.mark.parametrize("image_id", ["slice_nii", "volume_nii"])
def test_mask_gives_the_evaluate_metrics(env, tmp_path, image_id):
    item = env["items"][image_id]
    model = MODEL_OF_DIM[item["dim"]]
    status, result, heatmap, response = post_infer(
        env["url"], model, image=image_id, label=item["mask"], params={"method": "gradient"}
    )
    assert status == 200, response.text
    map_path = tmp_path / "map.nii"
    map_path.write_bytes(heatmap)
    maps_csv = tmp_path / "maps.csv"
    with open(maps_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "map", "mask", "method"])
        writer.writeheader()
        writer.writerow({"id": image_id, "map": str(map_path), "mask": str(item["mask"]), "method": "gradient"})
    # what `monai-sal evaluate` runs
    rows, _ = evaluate_maps(maps_csv, tmp_path / "evaluation", log=lambda message: None)
    assert rows[0]["error"] == ""
    expected = {k: v for k, v in rows[0].items() if k not in ("id", "method", "subtype", "error")}
    assert result["metrics"].keys() == expected.keys()
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-9), key


def test_mask_with_monailabel_client(env, tmp_path):
    item = env["items"]["volume_nii"]
    client = MONAILabelClient(env["url"], tmpdir=str(tmp_path))
    _, result = client.infer("classifier_3d", "volume_nii", {"method": "gradcam"}, label_in=str(item["mask"]))
    assert 0.0 <= result["metrics"]["roc_auc"] <= 1.0 and "auprc" in result["metrics"]


# ------------------------------------------------------------------------------------------------
# bad input: 4xx with a message, and the server keeps answering
# ------------------------------------------------------------------------------------------------


def uploads_left_with(content: bytes) -> list[Path]:
    """Files named like MONAI Label's upload temp files (``tmpXXXXXXXX*``) in the temp folder holding ``content``."""
    pattern = re.compile(r"^tmp[a-z0-9_]{8}")
    return [
        p
        for p in Path(tempfile.gettempdir()).iterdir()
        if pattern.match(p.name) and p.is_file() and p.stat().st_size == len(content) and p.read_bytes() == content
    ]


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_and_the_server_still_answers(env, case):
    build, expected_status, words = BAD_REQUESTS[case]
    kwargs = {"model": "classifier_2d", "image": "xray_png", **build(env)}
    uploads = [
        kwargs[f].read_bytes()
        for f in ("file", "label")
        if isinstance(kwargs.get(f), Path) and kwargs[f].stat().st_size
    ]
    before = {content: set(uploads_left_with(content)) for content in uploads}
    status, _, _, response = post_infer(env["url"], kwargs.pop("model"), **kwargs)
    assert status == expected_status, response.text
    assert words.lower() in response.json()["detail"].lower(), response.text
    assert "/tmp" not in response.json()["detail"]  # no server path leaks into messages
    for content in uploads:  # a failed request leaves no uploaded file behind
        assert not set(uploads_left_with(content)) - before[content]
    status, _result, _, response = post_infer(env["url"], "classifier_2d", image="xray_png", output="json")
    assert status == 200, response.text
    assert requests.get(f"{env['url']}/info/", timeout=30).status_code == 200


def test_monailabel_client_sees_the_4xx_message(env, tmp_path):
    client = MONAILabelClient(env["url"], tmpdir=str(tmp_path))
    with pytest.raises(MONAILabelClientException, match="Status: 400.*unknown saliency method"):
        client.infer("classifier_2d", "xray_png", {"method": "nope"})


# ------------------------------------------------------------------------------------------------
# concurrency
# ------------------------------------------------------------------------------------------------


def test_16_concurrent_requests_all_succeed_with_correct_results(env):
    jobs = [("xray_png", "gradcam"), ("xray_dcm", "gradient"), ("slice_nii", "gradcam"), ("volume_nii", "gradient")] * 4

    def run(job):
        image_id, method = job
        item = env["items"][image_id]
        return job, post_infer(env["url"], MODEL_OF_DIM[item["dim"]], image=image_id, params={"method": method})

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(run, jobs))
    expected = {}
    for (image_id, method), (status, result, heatmap, response) in answers:
        assert status == 200, response.text
        item = env["items"][image_id]
        if (image_id, method) not in expected:
            expected[image_id, method] = in_process(env, MODEL_OF_DIM[item["dim"]], item["path"], method)[0]
        want = expected[image_id, method]
        np.testing.assert_allclose(list(result["probabilities"].values()), want.probabilities, rtol=1e-5, atol=1e-7)
        got = np.asarray(load_nifti_bytes(heatmap).dataobj).reshape(want.saliency.shape)
        np.testing.assert_allclose(
            got, want.saliency, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(want.saliency).max()))
        )


# ------------------------------------------------------------------------------------------------
# training over the API (on copies of classifier_2d and wildcat_2d: the checkpoints are replaced)
# ------------------------------------------------------------------------------------------------


def test_bad_train_parameters_get_a_4xx(env):
    manifest = {"manifest": "train2d/manifest.csv"}
    for params, status, words in (
        ({"loss": "hinge", **manifest}, 400, "unknown loss"),
        ({"epochs": 0, **manifest}, 400, "epochs"),
        ({"manifest": "/etc/passwd"}, 400, "outside"),
        ({"manifest": "../../etc/passwd"}, 400, "outside"),
        ({"manifest": "nope.csv"}, 404, "not found"),
        ({}, 400, "no manifest"),  # the tiny checkpoints record no manifest
        ({"augmentations": ["rotate"], **manifest}, 400, "augmentations"),
        ({"epoch": 3, **manifest}, 400, "unknown train parameter"),
        ({"head": "cam", **manifest}, 400, "head: unknown head 'cam'"),
        ({"head": {"name": "wildcat", "kmax": 3.5}, **manifest}, 400, "head: kmax must be a fraction in (0, 1)"),
    ):
        response = requests.post(
            f"{env['url']}/train/classifier_2d", params={"run_sync": "true"}, json=params, timeout=60
        )
        assert response.status_code == status, (params, response.text)
        assert words in response.json()["detail"]


def train_over_the_api(url: str, model: str, params: dict) -> None:
    """Start a train task in the background (as MONAI Label runs it) and wait until it is done."""
    response = requests.post(f"{url}/train/{model}", json=params, timeout=60)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 180
    while True:
        task = requests.get(f"{url}/train/", timeout=30).json()
        if task["status"] in ("DONE", "ERROR") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert task["status"] == "DONE", json.dumps(task, indent=1)


def test_training_over_the_api_is_served_without_restart(env):
    url = env["url"]
    before = post_infer(url, "trained_2d", image="xray_png", output="json")[1]
    served = requests.get(f"{url}/info/", timeout=30).json()["models"]["trained_2d"]  # a copy of classifier_2d
    assert not served["trust"]["stale"] and "mask_generator" in served["methods"]
    params = {
        "manifest": "train2d/manifest.csv",
        "epochs": 1,
        "loss": "ce",
        "augmentations": ["noise"],
        "batch_size": 8,
        "patience": 1,
    }
    train_over_the_api(url, "trained_2d", params)
    card = json.loads((env["model_dir"] / "trained_2d.json").read_text())
    assert card["loss"] == "ce" and card["augmentations"] == ["noise"] and card["input_size"] == [32, 32]
    status, after, heatmap, response = post_infer(url, "trained_2d", image="xray_png")
    assert status == 200, response.text
    assert after["checkpoint"]["modified"] != before["checkpoint"]["modified"]
    assert_matches_in_process(env, after, load_nifti_bytes(heatmap), "trained_2d", env["items"]["xray_png"]["path"])
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert info["models"]["trained_2d"]["input_size"] == [32, 32]
    assert info["train_stats"]["trained_2d"]["epochs_run"] == 1
    assert info["models"]["trained_2d"]["trust"]["stale"]  # the card describes the old weights
    assert "mask_generator" not in info["models"]["trained_2d"]["methods"]  # trained for the old weights
    assert "model trained_2d: method mask_generator is not offered" in env["server"].log()


def test_a_wildcat_head_is_trained_over_the_api_and_its_maps_served(env):
    url = env["url"]
    head = {"name": "wildcat", "kmax": 0.5, "maps": 3}
    params = {"manifest": "train2d/manifest.csv", "epochs": 1, "batch_size": 8, "patience": 1, "head": head}
    train_over_the_api(url, "trained_wildcat_2d", params)
    card = json.loads((env["model_dir"] / "trained_wildcat_2d.json").read_text())
    assert card["head"] == {"name": "wildcat", "kmax": 0.5, "kmin": None, "alpha": 0.7, "maps": 3}
    status, result, heatmap, response = post_infer(
        url, "trained_wildcat_2d", image="xray_png", params={"method": "wildcat"}
    )
    assert status == 200, response.text
    path = env["items"]["xray_png"]["path"]
    assert_matches_in_process(env, result, load_nifti_bytes(heatmap), "trained_wildcat_2d", path, method="wildcat")
    assert (
        requests.get(f"{url}/info/", timeout=30).json()["trainers"]["trained_wildcat_2d"]["config"]["head"]
        == card["head"]
    )
