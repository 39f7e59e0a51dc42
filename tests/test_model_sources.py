"""Classifiers from other sources: MONAI bundles made with ``monai.bundle.init_bundle`` (2D and 3D,
with the bundle's own preprocessing), a TorchScript export and a factory module, each loaded by
``models.sources.load_model_source`` and explained on an oblique, anisotropic input.
"""

from __future__ import annotations

import json
import socket

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import INPUT_SIZE, LABELS, read_rows, tiny_conv5fc3
from server_fixtures import oblique_affine, smooth_field, write_nrrd, write_png
from source_fixtures import (
    BUNDLE_LABELS,
    FACTORY_MODULE,
    classifier_def,
    hand_built_explanation,
    make_bundle,
    oblique_image,
    sidecar,
)

from monai_sal_app.cli import main
from monai_sal_app.data.io import read_image
from monai_sal_app.models.sources import SourceError, load_model_source, onto_grid, source_kind
from monai_sal_app.saliency import explain


@pytest.mark.parametrize(("dims", "config_format"), [(2, "yaml"), (3, "json")])
def test_a_bundle_map_equals_explain_on_the_hand_built_network_inverted_to_the_input_grid(
    tmp_path, dims, config_format
):
    bundle = make_bundle(tmp_path / "bundle", dims, config_format=config_format)
    assert (bundle / "configs" / f"inference.{config_format}").is_file()
    image, affine = oblique_image(tmp_path / "image.nii.gz", dims)
    loaded = load_model_source(bundle, device="cpu")
    assert (loaded.kind, list(loaded.card.labels), loaded.card.spatial_dims) == ("bundle", BUNDLE_LABELS, dims)
    prepared = loaded.prepare(image)
    served = prepared.restore(explain(loaded.network, prepared.input, "gradient", target=1))

    expected, expected_affine = hand_built_explanation(bundle, image, dims, "gradient", target=1)
    original = np.asarray(nib.load(str(image)).dataobj)
    assert served.shape == original.shape
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(prepared.affine, affine, atol=1e-5)
    np.testing.assert_allclose(expected_affine, affine, atol=1e-4)  # Invertd put it on the file's grid
    # the geometry, not only the same code twice: the network's input taken back is the image
    back = prepared.restore(prepared.input)
    inside = np.abs(back) > 1e-6  # Invertd pads outside what the resampled grid covered
    assert inside.mean() > 0.8
    assert np.corrcoef(back[inside], original[inside])[0, 1] > 0.97


def test_a_mismatched_bundle_is_refused_naming_the_first_keys(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", 3, weights_of=classifier_def(3, channels=(4, 8, 16)))
    with pytest.raises(SourceError, match=r"do not match the bundle's network_def .*unexpected \(first \['net\."):
        load_model_source(bundle, device="cpu")


def test_a_pretrained_network_def_downloads_nothing(tmp_path, monkeypatch):
    """``pretrained: true`` (as in MONAI's breast_density bundle) is turned off; sockets are blocked."""
    network_def = {
        "_target_": "monai.networks.nets.TorchVisionFCModel",
        "model_name": "resnet18",
        "num_classes": 2,
        "pretrained": True,
    }
    weights_of = {**network_def, "pretrained": False}
    bundle = make_bundle(tmp_path / "bundle", 2, network_def=network_def, weights_of=weights_of)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["inputs"]["image"].update(num_channels=3, spatial_shape=[224, 224])
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    loaded = load_model_source(bundle, device="cpu")
    assert loaded.card.in_channels == 3 and not attempts


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda m: m["network_data_format"]["outputs"]["pred"].pop("channel_def"), "channel_def"),
        (lambda m: m["network_data_format"]["inputs"]["image"].update(spatial_shape=["*", "*", "*"]), "spatial_shape"),
        (lambda m: m.pop("network_data_format"), "network_data_format"),
        (lambda m: m["network_data_format"]["inputs"]["image"].update(spatial_shape=[8, 8, 8]), "fails on an input"),
    ],
    ids=["no channel_def", "no input size", "no data format", "wrong input size"],
)
def test_wrong_bundle_metadata_is_one_clear_error(tmp_path, change, says):
    bundle = make_bundle(tmp_path / "bundle", 3)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    change(metadata)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(SourceError, match=says):
        load_model_source(bundle, device="cpu")


def test_missing_bundle_parts_are_named(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", 2)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(SourceError, match=r"model\.pt: no such file"):
        load_model_source(bundle, device="cpu")
    (bundle / "configs" / "inference.json").unlink()
    with pytest.raises(SourceError, match="no inference.json"):
        load_model_source(bundle, device="cpu")
    with pytest.raises(SourceError, match="not a model source"):
        load_model_source(tmp_path, device="cpu")


# ------------------------------------------------------------------------------------------------
# TorchScript and factories
# ------------------------------------------------------------------------------------------------

NO_HOOK_METHODS = {
    "gradient": {},
    "gradient_x_input": {},
    "smoothgrad": {"n_samples": 4},
    "integrated_gradients": {"steps": 8},
    "xrai": {"steps": 8},
    "occlusion": {},
}


@pytest.mark.parametrize("dims", [2, 3])
def test_torchscript_maps_equal_the_eager_models_and_hook_methods_are_refused(tmp_path, dims):
    eager = tiny_conv5fc3(dims, seed=3).eval()
    blank = torch.zeros((1, 1, *INPUT_SIZE[dims]))
    torch.jit.save(torch.jit.trace(eager, blank), str(tmp_path / "net.ts"))
    sidecar(tmp_path / "net.json", dims)
    assert source_kind(tmp_path / "net.ts") == "torchscript"
    loaded = load_model_source(tmp_path / "net.ts", device="cpu")
    assert isinstance(loaded.network, torch.jit.ScriptModule) and list(loaded.card.labels) == LABELS
    x = torch.from_numpy(smooth_field(tuple(INPUT_SIZE[dims]), seed=1))[None, None]
    for method, params in NO_HOOK_METHODS.items():
        scripted = explain(loaded.network, x, method, target=1, **params)
        torch.testing.assert_close(scripted, explain(eager, x, method, target=1, **params), rtol=1e-4, atol=1e-6)
    for method in ("gradcam", "guided_backprop", "guided_gradcam"):
        with pytest.raises(ValueError, match="TorchScript module takes no hooks"):
            explain(loaded.network, x, method, target=1)


def test_a_torchscript_file_without_its_sidecar_is_refused(tmp_path):
    eager = tiny_conv5fc3(2).eval()
    torch.jit.save(torch.jit.trace(eager, torch.zeros((1, 1, *INPUT_SIZE[2]))), str(tmp_path / "net.ts"))
    with pytest.raises(SourceError, match=r"needs net\.json beside it"):
        load_model_source(tmp_path / "net.ts", device="cpu")


def test_a_factory_and_its_weights_load_and_a_tuple_output_is_refused(tmp_path, monkeypatch):
    (tmp_path / "site_models.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import site_models

    network = site_models.make(channels=6).eval()
    torch.save(network.state_dict(), tmp_path / "mine.pt")
    sidecar(tmp_path / "mine.json", 2, factory="site_models:make", kwargs={"channels": 6})
    loaded = load_model_source(tmp_path / "mine.pt", device="cpu")
    assert loaded.kind == "factory"
    x = torch.from_numpy(smooth_field((32, 32), seed=2))[None, None]
    torch.testing.assert_close(
        explain(loaded.network, x, "gradcam", target=0), explain(network, x, "gradcam", target=0)
    )

    sidecar(tmp_path / "mine.json", 2, factory="site_models:make", kwargs={"channels": 4})
    with pytest.raises(SourceError, match="do not match the network of site_models:make"):
        load_model_source(tmp_path / "mine.pt", device="cpu")
    torch.save(site_models.make(pair=True).state_dict(), tmp_path / "mine.pt")
    sidecar(tmp_path / "mine.json", 2, factory="site_models:make", kwargs={"pair": True})
    with pytest.raises(SourceError, match="returns a tuple, not a tensor of logits"):
        load_model_source(tmp_path / "mine.pt", device="cpu")
    sidecar(tmp_path / "mine.json", 2, factory="no_such_module:make")
    with pytest.raises(SourceError, match="cannot import the factory"):
        load_model_source(tmp_path / "mine.pt", device="cpu")


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


def test_explain_on_the_command_line_takes_a_bundle_and_writes_maps_on_the_input_grid(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle", 3)
    image, affine = oblique_image(tmp_path / "image.nii.gz", 3)
    assert (
        main(
            [
                "--quiet",
                "explain",
                "--model",
                str(bundle),
                str(image),
                "--method",
                "gradient",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    (row,) = read_rows(tmp_path / "out" / "maps.csv")
    written = nib.load(row["map"])
    assert written.shape == (20, 18, 17)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    loaded = load_model_source(bundle, device="cpu")
    prepared = loaded.prepare(image)
    expected = prepared.restore(explain(loaded.network, prepared.input, "gradient", target=int(row["target"])))
    np.testing.assert_allclose(np.asarray(written.dataobj), expected, rtol=1e-5, atol=1e-7)


def test_the_command_line_says_in_one_line_what_a_source_lacks(tmp_path, capsys):
    eager = tiny_conv5fc3(2).eval()
    torch.jit.save(torch.jit.trace(eager, torch.zeros((1, 1, *INPUT_SIZE[2]))), str(tmp_path / "net.ts"))
    sidecar(tmp_path / "net.json", 2)
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(smooth_field((40, 36), seed=1), np.eye(4)), str(image))
    for model, method, says in (
        (tmp_path / "net.ts", "gradcam", "TorchScript module takes no hooks"),
        (tmp_path / "missing", "gradient", "no such file or folder"),
        (
            make_bundle(tmp_path / "bundle", 3, weights_of=classifier_def(3, channels=(4, 8, 16))),
            "gradient",
            "do not match",
        ),
    ):
        out = tmp_path / f"out_{method}"
        assert (
            main(["--quiet", "explain", "--model", str(model), str(image), "--method", method, "--out", str(out)]) == 2
        )
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error:") and says in errors[0], errors
        assert not out.exists()  # nothing half-written


def test_trust_on_your_own_images_takes_a_bundle_and_a_torchscript_model(tmp_path, capsys):
    """``monai-sal trust --model SOURCE FOLDER``: randomization and fidelity need no masks."""
    bundle = make_bundle(tmp_path / "bundle", 3)
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(4):
        oblique_image(images / f"volume_{seed}.nii.gz", 3, seed=seed)
    out = tmp_path / "trust"
    argv = ["--quiet", "trust", "--model", str(bundle), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--methods", "gradient"]) == 0
    card = json.loads((tmp_path / "bundle.trust.json").read_text())
    assert card["data"]["n_images"] == 4 and set(card["methods"]["gradient"]["verdicts"]) == {
        "randomization",
        "fidelity",
    }

    eager = tiny_conv5fc3(2).eval()
    torch.jit.save(torch.jit.trace(eager, torch.zeros((1, 1, *INPUT_SIZE[2]))), str(tmp_path / "net.ts"))
    sidecar(tmp_path / "net.json", 2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for seed in range(4):
        nib.save(nib.Nifti1Image(smooth_field((40, 36), seed=seed), np.eye(4)), str(flat / f"image_{seed}.nii.gz"))
    argv = [
        "--quiet",
        "trust",
        "--model",
        str(tmp_path / "net.ts"),
        str(flat),
        "--out",
        str(out),
        "--methods",
        "gradient",
    ]
    capsys.readouterr()
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error:") and "TorchScript module does not expose" in line
    assert main([*argv, "--checks", "fidelity"]) == 0
    assert set(json.loads((tmp_path / "net.trust.json").read_text())["methods"]["gradient"]["verdicts"]) == {"fidelity"}


@pytest.mark.parametrize("dims", [2, 3])
def test_a_bundle_map_returns_onto_the_grid_monai_sal_reads_for_nrrd_and_png(tmp_path, dims):
    """MONAI reads NRRD and PNG in another array order than ``data.io.read_image``: the map is put
    on read_image's grid (the network input taken back is the image read there)."""
    bundle = make_bundle(tmp_path / "bundle", dims)
    if dims == 3:
        direction = oblique_affine((1, 1, 1), (0, 0, 0), degrees=-15)[:3, :3]
        image = write_nrrd(
            smooth_field((17, 19, 21), seed=5), tmp_path / "v.nrrd", (0.9, 1.1, 2.0), (-5.0, 8.0, 40.0), direction
        )
    else:
        # pixel values 0 and 1, inside the bundle's intensity window [0, 1]
        image = write_png((smooth_field((48, 40), seed=1) > 0.5) / 255.0, tmp_path / "x.png")
    array, meta = read_image(image)
    prepared = load_model_source(bundle, device="cpu").prepare(image)
    back = prepared.restore(prepared.input)
    assert back.shape == array.shape
    np.testing.assert_allclose(prepared.affine, meta["affine"])
    # the 3D volume is resampled, and Invertd pads what the resampled grid did not cover
    inside = np.abs(back) > 1e-6 if dims == 3 else np.ones(back.shape, bool)
    assert inside.mean() > 0.8 and np.corrcoef(back[inside], array[inside])[0, 1] > 0.9  # resized there and back


def test_onto_grid_reorders_axes_and_refuses_other_grids():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    flip_first = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip_first[0, 3] = 1.0  # voxel i of the flipped grid is voxel 1 - i of the other
    np.testing.assert_array_equal(onto_grid(array[::-1], flip_first, (2, 3, 4), np.eye(4)), array)
    swap = np.eye(4)[[1, 0, 2, 3]]
    np.testing.assert_array_equal(onto_grid(array.transpose(1, 0, 2), swap, (2, 3, 4), np.eye(4)), array)
    with pytest.raises(ValueError, match="send it as NIfTI"):
        onto_grid(array, np.diag([2.0, 1.0, 1.0, 1.0]), (2, 3, 4), np.eye(4))
