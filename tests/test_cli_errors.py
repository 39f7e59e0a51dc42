"""Every bad input the `monai-sal` commands can meet ends with one `error:` line and exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import monai_sal_executable, untrained_explainer
from server_fixtures import save_tiny_checkpoint, smooth_field

from monai_sal_app.cli import main
from monai_sal_app.data.generators import GENERATORS
from monai_sal_app.explainers import save_explainer
from monai_sal_app.models.checkpoint import load_classifier


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint, broken variants of it, images good and bad, and small manifests."""
    root = tmp_path_factory.mktemp("cli_errors")
    model = save_tiny_checkpoint(root / "model.pt", 2)
    card = json.loads((root / "model.json").read_text())

    def variant(name: str, card_change: dict | None = None, drop: tuple[str, ...] = (), weights: bytes | None = None):
        shutil.copyfile(model, root / f"{name}.pt")
        changed = {**card, **(card_change or {})}
        for key in drop:
            del changed[key]
        (root / f"{name}.json").write_text(json.dumps(changed))
        if weights is not None:
            (root / f"{name}.pt").write_bytes(weights)
        return str(root / f"{name}.pt")

    paths = {
        "model": str(model),
        "no_input_size": variant("no_input_size", drop=("input_size",)),
        "typo_field": variant("typo_field", {"input_sise": [32, 32]}),
        "bad_threshold": variant("bad_threshold", {"decision_threshold": 2}),
        "wrong_widths": variant("wrong_widths", {"arch_kwargs": {"channels": [4, 4, 8, 8, 16]}}),
        "corrupt_weights": variant("corrupt_weights", weights=b"not a checkpoint"),
        "no_card": str(root / "no_card.pt"),
    }
    shutil.copyfile(model, root / "no_card.pt")
    other = load_classifier(save_tiny_checkpoint(root / "other.pt", 2, seed=1), device="cpu")[0]
    explainer = untrained_explainer("mask_generator", other)  # trained for other weights than model.pt
    paths["explainer"] = str(save_explainer(explainer, root / "other.mask_generator.pt", explainer.card))
    (root / "broken_json.pt").write_bytes(model.read_bytes())
    (root / "broken_json.json").write_text("{")
    paths["broken_json"] = str(root / "broken_json.pt")

    def nifti(name: str, array: np.ndarray) -> str:
        nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), root / name)
        return str(root / name)

    paths["image"] = nifti("image.nii.gz", smooth_field((32, 32), seed=0))
    paths["volume"] = nifti("volume.nii.gz", smooth_field((16, 16, 16), seed=1))
    paths["nan"] = nifti("nan.nii.gz", np.full((32, 32), np.nan))
    paths["constant"] = nifti("constant.nii.gz", np.ones((32, 32)))
    (root / "garbage.nii.gz").write_text("this is not a NIfTI file")
    paths["garbage"] = str(root / "garbage.nii.gz")
    generate = GENERATORS["shepp-logan"].generate
    paths["manifest"] = str(generate(root / "data", dim=2, size=32, per_class=4, progress=False))
    one_class = root / "one_class.csv"
    lines = Path(paths["manifest"]).read_text().splitlines()
    label = lines[0].split(",").index("label")
    one_class.write_text("\n".join([lines[0]] + [row for row in lines[1:] if row.split(",")[label] == "0"]) + "\n")
    shutil.copytree(root / "data" / "images", root / "images")
    shutil.copytree(root / "data" / "masks", root / "masks")
    paths["one_class"] = str(one_class)
    (root / "maps.csv").write_text("id,map\nx,y.nii.gz\n")
    paths["maps_without_columns"] = str(root / "maps.csv")
    paths["root"] = root
    return paths


# (argv with {placeholders}, a fragment the message must contain)
CASES = {
    "card-without-input-size": (["explain", "--model", "{no_input_size}", "{image}"], "'input_size': missing"),
    "card-with-unknown-field": (["explain", "--model", "{typo_field}", "{image}"], "'input_sise': unknown field"),
    "card-threshold-out-of-range": (["explain", "--model", "{bad_threshold}", "{image}"], "'decision_threshold'"),
    "card-not-json": (["explain", "--model", "{broken_json}", "{image}"], "corrupt model card"),
    "card-missing": (["explain", "--model", "{no_card}", "{image}"], "model card not found"),
    "weights-not-matching-card": (["explain", "--model", "{wrong_widths}", "{image}"], "do not match"),
    "weights-corrupt": (["explain", "--model", "{corrupt_weights}", "{image}"], "unreadable weights"),
    "weights-missing": (["explain", "--model", "{root}/absent.pt", "{image}"], "absent.pt"),
    "image-missing": (["explain", "--model", "{model}", "{root}/absent.nii.gz"], "absent.nii.gz"),
    "image-corrupt": (["explain", "--model", "{model}", "{garbage}"], "garbage"),
    "image-nan": (["explain", "--model", "{model}", "{nan}"], "NaN"),
    "image-constant": (["explain", "--model", "{model}", "{constant}"], "constant"),
    "volume-to-2d-model": (["explain", "--model", "{model}", "{volume}"], "takes 2D images"),
    "unknown-method": (["explain", "--model", "{model}", "{image}", "--method", "gradcamm"], "unknown saliency method"),
    "unknown-param": (["explain", "--model", "{model}", "{image}", "--param", "stepz=3"], "stepz"),
    "param-of-wrong-type": (
        ["explain", "--model", "{model}", "{image}", "--method", "smoothgrad", "--param", "n_samples=many"],
        "n_samples",
    ),
    "param-without-value": (["explain", "--model", "{model}", "{image}", "--param", "steps"], "key=value"),
    "param-over-its-bound-with-max-cost": (
        [
            "explain",
            "--model",
            "{model}",
            "{image}",
            "--method",
            "smoothgrad",
            "--param",
            "n_samples=2000",
            "--max-cost",
            "1e9",
        ],
        "n_samples=2000 is above its bound of 1000",
    ),
    "request-over-max-cost": (
        ["explain", "--model", "{model}", "{image}", "--method", "integrated_gradients", "--max-cost", "1e4"],
        "estimated cost 5.12e+04",
    ),
    "target-out-of-range": (["explain", "--model", "{model}", "{image}", "--target", "5"], "target"),
    "unknown-postprocess": (["explain", "--model", "{model}", "{image}", "--postprocess", "blur"], "blur"),
    "wildcat-without-head": (["explain", "--model", "{model}", "{image}", "--method", "wildcat"], "WILDCAT head"),
    "explainer-missing": (
        ["explain", "--model", "{model}", "{image}", "--method", "mask_generator"],
        "needs explainer=",
    ),
    "explainer-file-missing": (
        ["explain", "--model", "{model}", "{image}", "--method", "mask_generator", "--param", "explainer={root}/no.pt"],
        "explainer checkpoint not found",
    ),
    "explainer-of-other-weights": (
        ["explain", "--model", "{model}", "{image}", "--method", "mask_generator", "--param", "explainer={explainer}"],
        "trained for another classifier",
    ),
    "wildcat-option-without-head": (
        ["train", "--data", "{manifest}", "--out", "{root}/w.pt", "--kmax", "0.3"],
        "--head",
    ),
    "wildcat-bad-kmax": (
        ["train", "--data", "{manifest}", "--out", "{root}/w.pt", "--head", "wildcat", "--kmax", "2.5"],
        "kmax must be",
    ),
    "explainer-unknown-setting": (
        [
            "train-explainer",
            "mask-generator",
            "--classifier",
            "{model}",
            "--data",
            "{manifest}",
            "--out",
            "{root}/e.pt",
            "--set",
            "areaweight=3",
        ],
        "unknown mask_generator setting",
    ),
    "evaluate-missing": (["evaluate", "{root}/absent_maps.csv"], "absent_maps.csv"),
    "evaluate-without-columns": (["evaluate", "{maps_without_columns}"], "missing column"),
    "data-unknown-preset": (["data", "shepp-logan", "--preset", "huge"], "unknown preset"),
    "data-negative-seed": (["data", "shepp-logan", "--seed", "-1"], "seed"),
    "data-zero-per-class": (["data", "shepp-logan", "--per-class", "0"], "per_class"),
    "data-wrong-dim": (["data", "chest-xray", "--dim", "3"], "2D only"),
    "train-manifest-missing": (["train", "--data", "{root}/absent.csv"], "absent.csv"),
    "train-one-class": (["train", "--data", "{one_class}"], "two classes"),
    "train-bad-input-size": (["train", "--data", "{manifest}", "--input-size", "big"], "--input-size"),
    "train-unknown-architecture": (["train", "--data", "{manifest}", "--arch", "vgg"], "unknown 'vgg'"),
    "train-unknown-loss": (["train", "--data", "{manifest}", "--loss", "hinge"], "hinge"),
    "train-unknown-augmentation": (["train", "--data", "{manifest}", "--aug", "rotate"], "rotate"),
    "train-labels-count": (["train", "--data", "{manifest}", "--labels", "a,b,c"], "'labels'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_ends_with_one_error_line(files, tmp_path, capsys, case):
    argv, fragment = CASES[case]
    argv = [arg.format(**files) for arg in argv] + ["--out", str(tmp_path / "out")]
    assert main(["--quiet", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert fragment in captured.err, captured.err
    assert not (tmp_path / "out").exists() or not any(p.suffix == ".pt" for p in (tmp_path / "out").rglob("*"))


@pytest.mark.e2e
def test_console_script_prints_no_traceback_for_an_invalid_card(files, tmp_path):
    exe = monai_sal_executable()
    argv = [exe, "--quiet", "explain", "--model", files["no_input_size"], files["image"], "--out", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "'input_size'" in result.stderr


@pytest.mark.e2e
def test_bounds_apply_to_the_cli_only_with_max_cost(files, tmp_path):
    argv = ["--quiet", "explain", "--model", files["model"], files["image"], "--method", "smoothgrad"]
    argv += ["--param", "n_samples=1001", "--param", "batch_size=1001"]  # over the server's bounds
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "maps.csv").is_file()
