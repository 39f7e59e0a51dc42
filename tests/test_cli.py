"""The `monai-sal` commands end to end on tiny inputs, through the installed console script."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import monai_sal_executable
from sklearn.metrics import roc_auc_score

from monai_sal_app.cli import main
from monai_sal_app.data.io import read_image

pytestmark = pytest.mark.e2e  # every test here runs whole commands (data, train, explain, evaluate, demo)


def run(*argv: str) -> int:
    return main(["--quiet", *argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2D dataset, test set and a conv5fc3 trained for two epochs on it."""
    root = tmp_path_factory.mktemp("cli")
    shepp_logan = ["data", "shepp-logan", "--dim", "2", "--size", "32"]
    assert run(*shepp_logan, "--preset", "homogeneous", "--per-class", "8", "--out", str(root / "train")) == 0
    assert run(*shepp_logan, "--preset", "test", "--per-class", "3", "--seed", "1", "--out", str(root / "test")) == 0
    manifests = ["--data", str(root / "train" / "manifest.csv"), "--test", str(root / "test" / "manifest.csv")]
    options = ["--epochs", "2", "--aug", "noise,croppad", "--loss", "l1norm", "--labels", "control,patient"]
    assert run("train", *manifests, *options, "--out", str(root / "model.pt")) == 0
    return root


def test_data_writes_manifest_images_and_masks(trained):
    rows = list(csv.DictReader(Path(trained / "train" / "manifest.csv").read_text().splitlines()))
    assert len(rows) == 16
    assert {r["label"] for r in rows} == {"0", "1"}
    image, meta = read_image(trained / "train" / rows[0]["image"])
    assert image.shape == (32, 32) and meta["format"] == "nifti"


def test_train_writes_state_dict_and_card(trained):
    card = json.loads((trained / "model.json").read_text())
    assert card["architecture"] == "conv5fc3" and card["spatial_dims"] == 2
    assert card["labels"] == ["control", "patient"] and card["input_size"] == [32, 32]
    assert card["loss"] == "l1norm" and card["augmentations"] == ["noise", "croppad"]
    assert {"val_auc", "test_auc", "test_balanced_accuracy"} <= set(card["metrics"])
    assert len(card["history"]) >= 1 and "val_balanced_accuracy" in card["history"][0]
    import torch

    state = torch.load(trained / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def test_train_resizes_to_the_requested_input_size(trained, tmp_path, capsys):
    one_epoch = ["train", "--data", str(trained / "train" / "manifest.csv"), "--epochs", "1"]
    assert run(*one_epoch, "--input-size", "16", "--out", str(tmp_path / "small.pt")) == 0
    assert json.loads((tmp_path / "small.json").read_text())["input_size"] == [16, 16]
    assert run(*one_epoch, "--input-size", "24,16", "--out", str(tmp_path / "wide.pt")) == 0
    assert json.loads((tmp_path / "wide.json").read_text())["input_size"] == [24, 16]
    capsys.readouterr()
    assert run(*one_epoch, "--input-size", "big", "--out", str(tmp_path / "bad.pt")) == 2
    assert "--input-size takes one int" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_explain_then_evaluate(trained, tmp_path):
    out = tmp_path / "maps"
    options = ["--method", "gradient,gradcam", "--postprocess", "abs", "--overlays", "2"]
    model, manifest = str(trained / "model.pt"), str(trained / "test" / "manifest.csv")
    assert run("explain", "--model", model, manifest, *options, "--out", str(out)) == 0
    rows = list(csv.DictReader(Path(out / "maps.csv").read_text().splitlines()))
    assert len(rows) == 12 and {r["method"] for r in rows} == {"gradient", "gradcam"}
    first = rows[0]
    saliency_img = nib.load(first["map"])
    input_img = nib.load(first["image"])
    assert saliency_img.shape == input_img.shape
    np.testing.assert_allclose(saliency_img.affine, input_img.affine)
    assert saliency_img.get_data_dtype() == np.float32
    assert all(r["postprocess"] == "abs" for r in rows)
    assert min(float(nib.load(r["map"]).get_fdata().min()) for r in rows) >= 0
    assert len(list((out / "overlays").glob("*/*.png"))) == 4

    assert run("evaluate", str(out), "--out", str(tmp_path / "eval")) == 0
    per_image = list(csv.DictReader(Path(tmp_path / "eval" / "per_image.csv").read_text().splitlines()))
    with_mask = [r for r in rows if r["mask"]]
    assert len(per_image) == len(with_mask) == 6  # 3 patients x 2 methods; controls have no mask
    # The numbers in the table are those of the written files: scikit-learn's ROC AUC of the map
    # against the mask, pixel by pixel.
    r = next(p for p in per_image if p["id"] == with_mask[0]["id"] and p["method"] == with_mask[0]["method"])
    saliency = read_image(with_mask[0]["map"], allow_constant=True)[0]
    mask = read_image(with_mask[0]["mask"], allow_constant=True)[0] > 0.5
    assert float(r["roc_auc"]) == pytest.approx(roc_auc_score(mask.ravel(), saliency.ravel()), abs=1e-12)
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "roc_auc_mean" in summary and "gradcam" in summary


def test_train_explainer_then_explain_with_it(trained, tmp_path):
    out = tmp_path / "model.mask_generator.pt"
    manifest = str(trained / "train" / "manifest.csv")
    options = ["--epochs", "2", "--batch-size", "4", "--set", "channels=[4,4,8,8]", "--set", "area_weight=6"]
    assert run("train-explainer", "mask-generator", "--classifier", str(trained / "model.pt"), "--data", manifest,
               *options, "--out", str(out)) == 0  # fmt: skip
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["kind"] == "mask_generator" and card["settings"]["area_weight"] == 6
    assert card["classifier"]["file"] == "model.pt" and len(card["classifier"]["fingerprint"]) == 64
    history = list(csv.DictReader((tmp_path / "model.mask_generator.history.csv").read_text().splitlines()))
    assert len(history) == card["training"]["epochs_run"] and "val_destroyer" in history[0]
    assert (tmp_path / "model.mask_generator.history.png").stat().st_size > 0
    maps = tmp_path / "maps"
    test = str(trained / "test" / "manifest.csv")
    assert run("explain", "--model", str(trained / "model.pt"), test, "--method", "mask_generator",
               "--param", f"explainer={out}", "--out", str(maps)) == 0  # fmt: skip
    rows = list(csv.DictReader(Path(maps / "maps.csv").read_text().splitlines()))
    assert len(rows) == 6 and all(nib.load(r["map"]).get_fdata().min() >= 0 for r in rows)


def test_train_with_a_wildcat_head_then_explain_with_its_class_maps(trained, tmp_path):
    manifest = str(trained / "train" / "manifest.csv")
    options = ["--epochs", "1", "--head", "wildcat", "--kmax", "0.3", "--kmin", "2", "--alpha", "0.5", "--maps", "4"]
    assert run("train", "--data", manifest, *options, "--out", str(tmp_path / "w.pt")) == 0
    card = json.loads((tmp_path / "w.json").read_text())
    assert card["head"] == {"name": "wildcat", "kmax": 0.3, "kmin": 2, "alpha": 0.5, "maps": 4}
    test = str(trained / "test" / "manifest.csv")
    maps = tmp_path / "maps"
    assert run("explain", "--model", str(tmp_path / "w.pt"), test, "--method", "wildcat", "--out", str(maps)) == 0
    assert len(list((maps / "maps" / "wildcat").glob("*.nii.gz"))) == 6


def test_explain_image_files_on_their_own_grid(trained, tmp_path):
    """A NIfTI with a non-identity affine and another size: the map keeps both."""
    image, _ = read_image(next((trained / "test" / "images").glob("*.nii.gz")))
    big = np.kron(image, np.ones((2, 2), dtype=np.float32))  # 64 x 64, resized to 32 for the model
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [10, -5, 3]
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(big, affine), path)
    model = str(trained / "model.pt")
    assert run("explain", "--model", model, str(path), "--method", "gradcam", "--out", str(tmp_path / "o")) == 0
    out = nib.load(tmp_path / "o" / "maps" / "gradcam" / "case.nii.gz")
    assert out.shape == (64, 64)
    np.testing.assert_allclose(out.affine, affine)


def test_console_script_is_installed_and_lists_methods():
    exe = monai_sal_executable()
    result = subprocess.run([exe, "methods"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    methods = json.loads(result.stdout)
    assert {"gradient", "gradcam"} <= set(methods)


def test_bad_inputs_give_one_line_errors(trained, tmp_path, capsys):
    model = str(trained / "model.pt")
    not_an_image = tmp_path / "notes.nii.gz"
    not_an_image.write_text("this is not a NIfTI file")
    nan_image = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((32, 32), np.nan, dtype=np.float32), np.eye(4)), nan_image)
    volume = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)), volume)
    cases = [
        (["explain", "--model", model, str(not_an_image), "--out", str(tmp_path / "a")], "notes"),
        (["explain", "--model", model, str(nan_image), "--out", str(tmp_path / "b")], "NaN"),
        (["explain", "--model", model, str(volume), "--out", str(tmp_path / "c")], "takes 2D images"),
        (
            ["explain", "--model", model, str(volume), "--method", "gradcamm", "--out", str(tmp_path / "d")],
            "unknown saliency method",
        ),
        (["explain", "--model", str(tmp_path / "missing.pt"), str(volume), "--out", str(tmp_path / "e")], "missing.pt"),
        (["evaluate", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "f")], "nothing.csv"),
    ]
    for argv, fragment in cases:
        capsys.readouterr()
        assert run(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err, (argv, err)
        assert err.count("\n") == 1, err  # one line, no traceback


def test_demo_quick_writes_a_report(tmp_path):
    assert run("demo", "--quick", "--out", str(tmp_path / "demo")) == 0
    out = tmp_path / "demo"
    with open(out / "results" / "localization_summary.csv", newline="") as f:
        methods = {row["method"] for row in csv.DictReader(f)}
    assert {"gradient", "gradcam", "baseline_mean_mask"} <= methods
    for table in ("classifier", "randomization", "fidelity", "subtypes"):
        assert (out / "results" / f"{table}.csv").stat().st_size > 0
    report = (out / "report.html").read_text()
    for section in ("Localization", "Cascading randomization", "Fidelity", "Latent subtypes"):
        assert f"<h2>{section}</h2>" in report
