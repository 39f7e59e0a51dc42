"""The server's model folder holding models from other sources: a 3D MONAI bundle, a TorchScript
export, a factory module and a bundle whose weights do not match, served by the real server on
127.0.0.1 and asked over HTTP.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import requests
import torch
from conftest import INPUT_SIZE, LABELS, tiny_conv5fc3
from server_fixtures import load_nifti_bytes, make_studies, post_infer
from source_fixtures import (
    BUNDLE_LABELS,
    FACTORY_MODULE,
    classifier_def,
    hand_built_explanation,
    make_bundle,
    oblique_image,
    sidecar,
)

from monai_sal_app.serve import start_background_server

pytestmark = pytest.mark.server

HOOK_METHODS = {"gradcam", "guided_backprop", "guided_gradcam"}


@pytest.fixture(scope="module")
def sources_server(tmp_path_factory):
    """The server on a model folder with ``ct_bundle`` (3D bundle), ``scripted`` (TorchScript of a
    tiny 2D conv5-fc3), ``site_model`` (a factory in ``site_models.py``) and ``mismatched`` (a
    bundle whose weights belong to another network: not served), and a folder ``runs`` that is
    not a model."""
    root = tmp_path_factory.mktemp("sources")
    models = root / "model"
    models.mkdir()
    make_bundle(models / "ct_bundle", 3)
    (models / "runs").mkdir()  # a folder that is not a bundle: not a model, nothing to report
    make_bundle(models / "mismatched", 3, weights_of=classifier_def(3, channels=(4, 8, 16)))
    eager = tiny_conv5fc3(2, seed=3).eval()
    torch.jit.save(torch.jit.trace(eager, torch.zeros((1, 1, *INPUT_SIZE[2]))), str(models / "scripted.ts"))
    sidecar(models / "scripted.json", 2)
    code = root / "code"
    code.mkdir()
    (code / "site_models.py").write_text(FACTORY_MODULE)
    namespace: dict = {}
    exec(compile(FACTORY_MODULE, "site_models.py", "exec"), namespace)  # the same network, for its weights
    torch.manual_seed(5)
    torch.save(namespace["make"](channels=6).state_dict(), models / "site_model.pt")
    sidecar(models / "site_model.json", 2, factory="site_models:make", kwargs={"channels": 6})
    items = make_studies(root / "studies")
    server = start_background_server(
        root / "studies",
        conf={"model_dir": str(models)},
        workdir=root / "run",
        extra_env={
            "OMP_NUM_THREADS": "1",
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "PYTHONPATH": os.pathsep.join(
                p for p in (os.environ.get("PYTHONPATH", ""), str(code), str(root / "run")) if p
            ),
        },
        timeout=240,
    )
    try:
        yield {"url": server.url, "root": root, "models": models, "items": items, "server": server, "eager": eager}
    finally:
        server.stop()


def test_info_lists_each_source_with_its_labels_dims_and_methods(sources_server):
    info = requests.get(f"{sources_server['url']}/info/", timeout=30).json()
    models = info["models"]
    assert set(models) == {"ct_bundle", "scripted", "site_model"}
    assert (models["ct_bundle"]["source"], models["ct_bundle"]["labels"], models["ct_bundle"]["dimension"]) == (
        "bundle",
        BUNDLE_LABELS,
        3,
    )
    assert (models["scripted"]["source"], models["scripted"]["labels"]) == ("torchscript", LABELS)
    assert models["site_model"]["source"] == "factory"
    assert not HOOK_METHODS & set(models["scripted"]["methods"])  # no hooks on TorchScript, and /info says so
    assert all("takes no hooks" in models["scripted"]["methods_unavailable"][m] for m in HOOK_METHODS)
    assert "WILDCAT head" in models["scripted"]["methods_unavailable"]["wildcat"]
    assert {"gradient", "integrated_gradients", "xrai", "occlusion"} <= set(models["scripted"]["methods"])
    assert set(models["ct_bundle"]["methods"]) >= HOOK_METHODS
    assert set(info["trainers"]) == set()  # only our own checkpoints are retrained over the API
    log = sources_server["server"].log()
    assert "model mismatched is not served" in log and "do not match" in log
    assert "model runs" not in log


def test_a_bundle_heatmap_equals_explain_on_the_hand_built_network_on_the_oblique_input_grid(sources_server, tmp_path):
    image, affine = oblique_image(tmp_path / "oblique.nii.gz", 3)
    status, result, heatmap, response = post_infer(
        sources_server["url"], "ct_bundle", file=image, params={"method": "gradient", "target": "lesion"}
    )
    assert status == 200, response.text
    served = load_nifti_bytes(heatmap)
    expected, expected_affine = hand_built_explanation(sources_server["models"] / "ct_bundle", image, 3, "gradient", 1)
    assert result["target"] == {"index": 1, "label": "lesion", "probability": result["probabilities"]["lesion"]}
    np.testing.assert_allclose(np.asarray(served.dataobj), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(served.affine, affine, atol=1e-5)
    np.testing.assert_allclose(expected_affine, affine, atol=1e-4)


def test_torchscript_refuses_hook_methods_saying_why_and_equals_the_eager_model(sources_server):
    url, items = sources_server["url"], sources_server["items"]
    status, _, _, response = post_infer(url, "scripted", image="xray_png", params={"method": "gradcam"})
    assert status == 400 and "TorchScript module takes no hooks" in response.json()["detail"], response.text
    status, result, heatmap, response = post_infer(url, "scripted", image="xray_png", params={"method": "gradient"})
    assert status == 200, response.text
    from monai_sal_app.data.io import read_image
    from monai_sal_app.inference import explain_array
    from monai_sal_app.models.sources import load_model_source

    loaded = load_model_source(sources_server["models"] / "scripted.ts", device="cpu")
    array, _ = read_image(items["xray_png"]["path"])
    expected = explain_array(sources_server["eager"], loaded.card, array, "gradient", target=result["target"]["index"])
    np.testing.assert_allclose(
        np.asarray(load_nifti_bytes(heatmap).dataobj).reshape(array.shape), expected.saliency, rtol=1e-4, atol=1e-6
    )


def test_a_factory_model_is_served_and_a_broken_source_leaves_the_others_serving(sources_server):
    url = sources_server["url"]
    status, result, _, response = post_infer(
        url, "site_model", image="xray_png", params={"method": "gradcam"}, output="json"
    )
    assert status == 200 and result["method"] == "gradcam", response.text
    status, _, _, response = post_infer(url, "mismatched", image="volume_nii")
    assert status == 404 and "unknown model" in response.json()["detail"]
    # a source that breaks while served: 503 naming why, the others go on
    scripted = sources_server["models"] / "scripted.ts"
    backup = scripted.with_suffix(".bak")
    shutil.copyfile(scripted, backup)
    try:
        scripted.write_bytes(b"not a TorchScript file")
        status, _, _, response = post_infer(url, "scripted", image="xray_png")
        assert status == 503 and "unavailable" in response.json()["detail"], response.text
        assert post_infer(url, "site_model", image="xray_png", output="json")[0] == 200
    finally:
        shutil.copyfile(backup, scripted)
    assert post_infer(url, "scripted", image="xray_png", output="json")[0] == 200


def test_a_bundle_map_of_an_nrrd_volume_lies_on_the_volume_as_monai_sal_reads_it(sources_server):
    """MONAI reads NRRD in another axis order than the server: the map is put back on the server's grid."""
    from monai_sal_app.data.io import read_image
    from monai_sal_app.models.sources import load_model_source
    from monai_sal_app.saliency import explain

    path = sources_server["items"]["volume_nrrd"]["path"]
    status, _, heatmap, response = post_infer(
        sources_server["url"], "ct_bundle", image="volume_nrrd", params={"method": "gradient", "target": 1}
    )
    assert status == 200, response.text
    array, meta = read_image(path)
    served = load_nifti_bytes(heatmap)
    np.testing.assert_allclose(served.affine, meta["affine"], atol=1e-5)
    loaded = load_model_source(sources_server["models"] / "ct_bundle", device="cpu")
    prepared = loaded.prepare(path)
    expected = prepared.restore(explain(loaded.network, prepared.input, "gradient", target=1))
    assert expected.shape == array.shape
    np.testing.assert_allclose(np.asarray(served.dataobj).reshape(array.shape), expected, rtol=1e-4, atol=1e-6)
