"""What one request may cost the real server: bounds, budget, size limits, time limit, disconnects, SIGTERM.

The server is the one the session shares (``conftest.served``), with a short ``request_timeout_s``,
a small ``max_upload_mb`` and a small ``max_request_cost`` (``server_fixtures``); the SIGTERM test
starts a server of its own, which it ends. The long legitimate request is meaningful perturbation at
its bounds on the 3D model (5000 steps x 16 jittered copies, a few minutes of work if nothing
stopped it).
"""

from __future__ import annotations

import gzip
import json
import signal
import threading
import time

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from conftest import LONG_REQUEST
from server_fixtures import BUDGET, MAX_UPLOAD_MB, TIMEOUT_S, make_studies, post_infer, save_tiny_checkpoint

from monai_sal_app.lib.limits import ServerLimits
from monai_sal_app.saliency import available_methods
from monai_sal_app.serve import start_background_server

pytestmark = pytest.mark.server  # every test here but the last asks the real server

# Within the bounds and the budget: 80000 passes of 16^3 voxels (3.3e8)
LONG = {"method": "meaningful_perturbation", **LONG_REQUEST}


@pytest.fixture(scope="module")
def server(served):
    """The shared server's BackgroundServer (``url``, ``pid``)."""
    return served["server"]


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def bomb_nifti(shape=(2048, 2048, 2048)) -> bytes:
    """A gzipped NIfTI whose header declares ``shape`` float32 and whose data is 8 MB of zeros."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * (8 << 20), compresslevel=9)


def test_info_shows_every_bound_next_to_its_default_and_the_limits(server):
    info = requests.get(f"{server.url}/info/", timeout=10).json()
    assert info["limits"] == {
        "max_request_cost": BUDGET,
        "max_upload_mb": MAX_UPLOAD_MB,
        "max_pixels": 8192 * 8192,  # the documented defaults: 8192 px a side in 2D,
        "max_voxels": 512 * 512 * 512,  # 512 voxels a side in 3D
        "request_timeout_s": TIMEOUT_S,
    }
    methods = info["models"]["classifier_3d"]["methods"]
    for name, spec in methods.items():
        assert spec["bounds"] == available_methods()[name]["bounds"]
        assert set(spec["bounds"]) - {"passes"} <= set(spec["defaults"])
    assert methods["integrated_gradients"]["bounds"]["steps"] == 1000
    assert methods["meaningful_perturbation"]["bounds"]["steps"] == 5000


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"method": "integrated_gradients", "steps": 100_000_000}, "steps=100000000 is above its bound of 1000"),
        ({"method": "smoothgrad", "n_samples": 10**9}, "n_samples=1000000000 is above its bound of 1000"),
        ({"method": "meaningful_perturbation", "steps": 10**9}, "steps=1000000000 is above its bound of 5000"),
        ({"method": "xrai", "scales": [50] * 40}, "scales has 40 values, at most 16"),
        ({"method": "gradient", "batch_size": 10**6}, "batch_size=1000000 is above its bound of 1024"),
        # 16^3 windows of one voxel: 4097 passes of 4096 voxels each is within the passes bound
        ({"method": "occlusion", "window": 1, "stride": 1}, None),
    ],
)
def test_a_parameter_over_its_bound_is_a_400_in_under_a_second(server, params, says):
    (status, _, _, response), seconds = timed(
        lambda: post_infer(server.url, "classifier_3d", image="volume_nii", params=params)
    )
    if says is None:
        assert status == 200, response.text
        return
    assert status == 400 and says in response.json()["detail"], response.text
    assert seconds < 1.0


def test_a_request_over_the_cost_budget_is_a_400_saying_what_to_lower(server):
    params = {"method": "smoothgrad_ig", "n_samples": 100, "steps": 1000}  # each within its bound
    (status, _, _, response), seconds = timed(
        lambda: post_infer(server.url, "classifier_3d", image="volume_nii", params=params)
    )
    detail = response.json()["detail"]
    assert status == 400 and seconds < 1.0
    assert "estimated cost 4.1e+08" in detail and "budget of 3.5e+08" in detail, detail
    assert "lower n_samples or steps" in detail and "max_request_cost" in detail


def test_a_header_declaring_2048_cubed_is_a_413_before_decoding(server):
    upload = bomb_nifti()
    assert len(upload) < 100_000
    process = psutil.Process(server.pid)
    before = process.memory_info().rss
    (status, _, _, response), seconds = timed(
        lambda: post_infer(server.url, "classifier_3d", file=("bomb.nii.gz", upload), params={"method": "gradcam"})
    )
    assert status == 413 and seconds < 1.0, response.text
    assert "2048x2048x2048" in response.json()["detail"] and "max_pixels or max_voxels" in response.json()["detail"]
    assert process.memory_info().rss - before < 16 * 2**20  # nothing near the 32 GB the header declares


def test_data_that_inflates_past_its_header_is_refused(server):
    header = nib.Nifti1Header()
    header.set_data_shape((16, 16, 16))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    data = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32).tobytes(order="F")
    upload = gzip.compress(header.binaryblock + b"\0" * 4 + data + b"\0" * (64 << 20))
    status, _, _, response = post_infer(server.url, "classifier_3d", file=("inflates.nii.gz", upload))
    assert status == 400 and "inflates past the 16,736 bytes its header declares" in response.json()["detail"]


def test_an_upload_over_max_upload_mb_is_a_413_unread(server):
    status, _, _, response = post_infer(server.url, "classifier_2d", file=("big.nii.gz", b"\0" * (2 << 20)))
    assert status == 413 and "limit of 1 MB (max_upload_mb)" in response.json()["detail"]
    # The same as a streamed multipart body (no Content-Length): stopped once past 1 MB.
    head = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="big.nii.gz"\r\n\r\n'
    chunks = [head, *(b"\0" * 65536 for _ in range(40)), b"\r\n--b0undary--\r\n"]
    response = requests.post(
        f"{server.url}/infer/classifier_2d",
        data=iter(chunks),
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        timeout=30,
    )
    assert response.status_code == 413 and "max_upload_mb" in response.json()["detail"], response.text
    assert post_infer(server.url, "classifier_2d", image="xray_png")[0] == 200


def test_the_server_answers_while_a_long_request_runs_and_the_time_limit_stops_it(server):
    outcome = {}

    def long_request():
        outcome["answer"], outcome["seconds"] = timed(
            lambda: post_infer(server.url, "classifier_3d", image="volume_nii", params=LONG)
        )

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)
    try:
        for _ in range(3):
            info, seconds = timed(lambda: requests.get(f"{server.url}/info/", timeout=10))
            assert info.status_code == 200 and seconds < 1.0
            datastore, seconds = timed(lambda: requests.get(f"{server.url}/datastore/", timeout=10))
            assert datastore.status_code == 200 and seconds < 1.0
        other, seconds = timed(lambda: post_infer(server.url, "classifier_2d", image="xray_png"))
        assert other[0] == 200 and seconds < 3.0  # another model's request is not queued behind it
        assert worker.is_alive()
    finally:
        worker.join(60)
    status, _, _, response = outcome["answer"]
    assert status == 503, response.text
    assert f"longer than this server's limit of {TIMEOUT_S} s (request_timeout_s)" in response.json()["detail"]
    assert TIMEOUT_S <= outcome["seconds"] < TIMEOUT_S + 5
    assert post_infer(server.url, "classifier_3d", image="volume_nii")[0] == 200  # the next one is served


def test_a_client_that_disconnects_stops_its_work(server):
    with pytest.raises(requests.exceptions.ReadTimeout):
        post_infer(server.url, "classifier_3d", image="volume_nii", params=LONG, timeout=1.0)
    # The next request on the same model waits for the model's lock: it is served as soon as the
    # abandoned work stopped, well before the time limit would have stopped it (TIMEOUT_S - 1 s from now).
    (status, _, _, response), seconds = timed(lambda: post_infer(server.url, "classifier_3d", image="volume_nii"))
    assert status == 200, response.text
    assert seconds < 3.5


def test_sigterm_mid_request_ends_the_server_within_seconds(tmp_path):
    """On a server of its own, which the test ends, with the default time limit (600 s): only the
    SIGTERM can stop the long request within seconds."""
    save_tiny_checkpoint(tmp_path / "model" / "classifier_3d.pt", 3, seed=1)
    make_studies(tmp_path / "studies")
    running = start_background_server(
        tmp_path / "studies",
        conf={"model_dir": str(tmp_path / "model")},
        workdir=tmp_path / "run",
        extra_env={"OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    outcome = {}

    def long_request():
        try:
            outcome["status"] = post_infer(running.url, "classifier_3d", image="volume_nii", params=LONG)[0]
        except requests.exceptions.ConnectionError as error:
            outcome["status"] = error

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        time.sleep(1.5)
        assert running.process.poll() is None
        start = time.perf_counter()
        running.process.send_signal(signal.SIGTERM)
        running.process.wait(timeout=15)
        assert time.perf_counter() - start < 10
    finally:
        running.process.kill() if running.process.poll() is None else None
        worker.join(30)
    assert outcome["status"] == 503 or isinstance(outcome["status"], Exception)


def test_infers_keep_answering_while_the_model_is_retrained_then_switch_once(server, served):
    """On ``retrained_2d``, a copy of classifier_2d that no other test uses; the retrained network
    keeps the served one's options (its channels)."""
    card_path = served["model_dir"] / "retrained_2d.json"
    arch_kwargs = json.loads(card_path.read_text())["arch_kwargs"]
    assert arch_kwargs  # the tiny conv5-fc3's channels: not the defaults
    before = post_infer(server.url, "retrained_2d", image="xray_png", output="json")[1]["checkpoint"]["modified"]
    params = {"manifest": "train2d/manifest.csv", "epochs": 3, "batch_size": 4, "patience": 3}
    response = requests.post(f"{server.url}/train/retrained_2d", json=params, timeout=60)
    assert response.status_code == 200, response.text
    seen, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        status, result, _, response = post_infer(server.url, "retrained_2d", image="xray_png", output="json")
        assert status == 200, response.text  # no failed request while the checkpoint is replaced
        seen.append(result["checkpoint"]["modified"])
        if requests.get(f"{server.url}/train/", timeout=30).json()["status"] in ("DONE", "ERROR"):
            break
    seen.append(post_infer(server.url, "retrained_2d", image="xray_png", output="json")[1]["checkpoint"]["modified"])
    assert requests.get(f"{server.url}/train/", timeout=30).json()["status"] == "DONE"
    assert seen[0] == before and seen[-1] != before and len(seen) > 3
    switches = [i for i in range(1, len(seen)) if seen[i] != seen[i - 1]]
    assert len(switches) == 1, seen  # old weights until the new checkpoint is written, then the new ones
    assert json.loads(card_path.read_text())["arch_kwargs"] == arch_kwargs


def test_limits_in_conf_must_be_positive_numbers():
    assert ServerLimits.from_conf({"max_upload_mb": "2.5", "max_voxels": "1e6"}).max_voxels == 1_000_000
    for bad in ("0", "-1", "lots", "inf", "nan"):
        with pytest.raises(ValueError, match=f"--conf request_timeout_s must be a positive number, got '{bad}'"):
            ServerLimits.from_conf({"request_timeout_s": bad})
