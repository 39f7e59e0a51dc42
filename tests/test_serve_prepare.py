"""``monai-sal serve`` before the server starts: the data, the datastore and the default models it
prepares (``--prepare-only``), the checkpoints and studies of your own it serves (``--data none``),
and the fix it names when the real-anatomy bases are missing. The server start itself is MONAI
Label's (the running server is tested in ``test_server.py``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from server_fixtures import save_tiny_checkpoint

import monai_sal_app
from monai_sal_app.evaluation.trust import DEFAULT_TRUST_METHODS
from monai_sal_app.lib.served_model import find_model_sources
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.saliency.gradcam import gradcam_layer_maps
from monai_sal_app.serve import APP_MAIN_PY, add_parser

PACKAGE_DIR = Path(monai_sal_app.__file__).parent


@pytest.mark.e2e
@pytest.mark.parametrize(
    "data,models,study_glob",
    [
        # the defaults: a chest X-ray classifier and a 3D CT one, on the bases install_data.sh installs
        (
            "real",
            {"chest_xray_2d": (2, 128, ["normal", "opacity"]), "ct_lesion_3d": (3, 64, ["no lesion", "lesion"])},
            {"chest_xray_2d-00?.nii.gz": 8, "ct_lesion_3d-00?.nii.gz": 8},
        ),
        (
            "shepp-logan",
            {"classifier_2d": (2, 64, ["control", "patient"]), "classifier_3d": (3, 32, ["control", "patient"])},
            {"classifier_2d-00?.nii.gz": 8, "classifier_3d-00?.nii.gz": 8},
        ),
    ],
)
def test_serve_prepare_only_builds_data_studies_and_default_models(tmp_path, capfd, data, models, study_glob):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    work = tmp_path / "work"
    # the phantom run keeps the default model folder (<workdir>/model), the other one moves it
    model_dir = work / "model" if data == "shepp-logan" else tmp_path / "checkpoints"
    argv = f"serve --prepare-only --data {data} --workdir {work} --epochs 1 --per-class 2 --test-per-class 4".split()
    if data != "shepp-logan":
        argv += ["--model-dir", str(model_dir)]
    package_files = sorted(p for p in PACKAGE_DIR.rglob("*") if "__pycache__" not in p.parts)
    args = parser.parse_args(argv)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    args.func(args)
    printed = capfd.readouterr().out  # the models are prepared in worker processes: capture their output too
    assert all(f"{name}: training" in printed for name in models), printed
    assert f"monailabel start_server --app {work} --studies {work / 'studies'}" in printed
    assert (f"--conf model_dir {model_dir}" in printed) == (data != "shepp-logan")
    assert (work / "main.py").read_text() == APP_MAIN_PY
    found, skipped = find_model_sources(model_dir)
    assert set(found) == set(models) and not skipped
    for name, (dim, size, labels) in models.items():
        model, card = load_classifier(found[name], device="cpu")
        assert (card.spatial_dims, list(card.input_size), list(card.labels)) == (dim, [size] * dim, labels)
        assert card.metrics["n_test"] == 8 and "test_balanced_accuracy" in card.metrics  # 4 held out per class
        if data == "real":  # maps worth looking at: Grad-CAM works on at least 8 cells per axis
            cam = gradcam_layer_maps(model.eval(), torch.zeros(1, 1, *card.input_size), torch.tensor([1]), None, 1)
            assert min(cam.shape[2:]) >= 8, (name, tuple(cam.shape))
    studies = work / "studies"
    assert {pattern: len(list(studies.glob(pattern))) for pattern in study_glob} == study_glob
    labels = list((studies / "labels" / "final").glob("*.nii.gz"))
    assert len(labels) == 8 and all((studies / label.name).is_file() for label in labels)  # every positive has its mask
    stamps = {name: path.stat().st_mtime_ns for name, path in found.items()}
    for name, path in found.items():  # each default model has its trust card beside it, and a report
        card = json.loads(path.with_name(f"{name}.trust.json").read_text())
        assert card["data"]["n_images"] == 8 and (work / "trust" / name / "trust.md").is_file()
        # computed in parts by the two processes, merged in the usual order
        assert list(card["methods"]) == card["settings"]["methods"] == list(DEFAULT_TRUST_METHODS)
        assert card["settings"]["localization_reference"] == "mean training mask"  # the training masks
        assert len(card["data"]["images"]) == 8 and card["data"]["train_masks"].endswith("manifest.csv")
    args.func(parser.parse_args(argv))  # a second run reuses the checkpoints and their trust cards
    second = capfd.readouterr().out
    assert "training" not in second and "trust card" not in second
    assert {name: path.stat().st_mtime_ns for name, path in found.items()} == stamps
    name = next(iter(found))  # a card of an older schema is recomputed, never read
    card_path = found[name].with_name(f"{name}.trust.json")
    card_path.write_text(json.dumps({k: v for k, v in json.loads(card_path.read_text()).items() if k != "schema"}))
    args.func(parser.parse_args(argv))
    third = capfd.readouterr().out
    assert f"{name}: recomputing the trust card" in third and "schema 1" in third and "training" not in third
    assert json.loads(card_path.read_text())["schema"] == 2
    assert sorted(p for p in PACKAGE_DIR.rglob("*") if "__pycache__" not in p.parts) == package_files


@pytest.mark.e2e
def test_serve_data_none_serves_the_checkpoints_there_on_your_studies(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    studies, checkpoints = tmp_path / "my_images", tmp_path / "my_models"
    argv = (
        f"serve --data none --prepare-only --workdir {tmp_path / 'work'} --studies {studies} --model-dir {checkpoints}"
    )
    with pytest.raises(FileNotFoundError, match="my_images"):
        parser.parse_args(argv.split()).func(parser.parse_args(argv.split()))
    studies.mkdir()
    save_tiny_checkpoint(checkpoints / "mine.pt", 2)
    args = parser.parse_args(argv.split())
    args.func(args)
    printed = capsys.readouterr().out
    # the launcher listens on 0.0.0.0 unless told: the command names the address serve would use
    assert (
        f"--app {tmp_path / 'work'} --studies {studies} --host 127.0.0.1 --port 8000 --conf model_dir {checkpoints}"
        in printed
    )
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["main.py"]  # nothing generated or trained
    assert sorted(p.name for p in checkpoints.iterdir()) == ["mine.json", "mine.pt"]


def test_serve_real_data_without_the_bases_names_the_fix(tmp_path, monkeypatch):
    from monai_sal_app.data import bases
    from monai_sal_app.serve import prepare

    monkeypatch.delenv("MONAI_SAL_DATA", raising=False)
    monkeypatch.setattr(bases, "REPO_DATA", tmp_path / "no-bases")
    monkeypatch.setitem(sys.modules, "data_store", None)  # hides pydicom-data's radiograph as well
    with pytest.raises(bases.BaseNotInstalled, match=r"install_data.sh.*monai-sal serve --data shepp-logan"):
        prepare(tmp_path / "work", tmp_path / "model", data="real")
    assert not (tmp_path / "work").exists() and not (tmp_path / "model").exists()  # nothing written


@pytest.mark.e2e
def test_killing_serve_while_it_prepares_ends_its_training_processes(tmp_path):
    # The default models train in two worker processes; SIGKILL leaves `serve` no chance to end
    # them, so they must end with it (they went on alone before).
    work = tmp_path / "work"
    command = [sys.executable, "-m", "monai_sal_app", "serve", "--prepare-only", "--data", "shepp-logan"]
    command += ["--workdir", str(work), "--epochs", "500", "--per-class", "20", "--test-per-class", "4"]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        parent = psutil.Process(serve.pid)
        deadline = time.monotonic() + 240
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, "the two training processes did not start"
        while time.monotonic() < deadline and not list((work / "data").glob("*/test/manifest.csv")):
            time.sleep(0.5)  # wait until they work: the data of at least one model is there
        serve.kill()
        serve.wait(30)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if serve.poll() is None:
            serve.kill()
