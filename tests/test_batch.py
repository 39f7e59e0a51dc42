"""Batch work over a manifest (``experiments.workflows``, ``distributed.read_ahead``): files read
ahead by worker processes, results written block by block, a killed run resumed with the same
bytes, an unreadable file as an error row while the others go on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import monai_sal_executable, read_rows
from server_fixtures import save_tiny_checkpoint, smooth_field, write_nrrd

from monai_sal_app.cli import main
from monai_sal_app.data.io import write_nifti
from monai_sal_app.distributed import read_ahead
from monai_sal_app.evaluation.inputs import load_trust_inputs, read_trust_inputs
from monai_sal_app.experiments.workflows import BLOCKS_FOLDER, evaluate_maps, explain_items
from monai_sal_app.models.inputs import read_items
from monai_sal_app.models.sources import load_model_source

N_ITEMS = 24  # 16^3 volumes of the manifest below; every third has a mask
BATCH = 4
NRRD_CASE = 13  # the one volume written as NRRD (the others NIfTI)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """``manifest.csv`` of :data:`N_ITEMS` smooth 16^3 volumes (NIfTI, one NRRD; labels alternate,
    every third with a mask of its brightest voxels) and an untrained tiny 3D checkpoint
    ``model.pt``, in one folder."""
    root = tmp_path_factory.mktemp("batch")
    lines = ["id,image,label,mask"]
    for k in range(N_ITEMS):
        image = smooth_field((16, 16, 16), seed=k)
        name = f"images/case{k:03d}" + (".nrrd" if k == NRRD_CASE else ".nii.gz")
        (write_nrrd if k == NRRD_CASE else write_nifti)(image, root / name)
        mask = ""
        if k % 3 == 0:
            mask = f"masks/case{k:03d}.nii.gz"
            write_nifti(image > np.quantile(image, 0.9), root / mask)
        lines.append(f"case{k:03d},{name},{k % 2},{mask}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    save_tiny_checkpoint(root / "model.pt", 3)
    return root


def copy_of(volumes: Path, folder: Path) -> Path:
    """The data and model of ``volumes`` copied into ``folder`` (for a test that changes files)."""
    shutil.copytree(volumes, folder)
    return folder


def source_and_items(root: Path):
    return load_model_source(root / "model.pt", device="cpu"), read_items(root / "manifest.csv")


def tree_bytes(out: Path, left_out: tuple[str, ...] = (BLOCKS_FOLDER, "timings.csv")) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``out`` except ``left_out`` (top-level names)."""
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.relative_to(out).parts[0] not in left_out
    }


def test_read_ahead_gives_every_block_in_order_read_by_other_processes():
    blocks = [3, 0, 7, 5, 1]
    inline = list(read_ahead(blocks, lambda block: (block * block, os.getpid()), workers=0))
    ahead = list(read_ahead(blocks, lambda block: (block * block, os.getpid()), workers=2))
    assert [block for block, _ in ahead] == [block for block, _ in inline] == blocks
    assert [value for _, (value, _) in ahead] == [b * b for b in blocks]
    assert {pid for _, (_, pid) in inline} == {os.getpid()}
    assert os.getpid() not in {pid for _, (_, pid) in ahead}
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        list(read_ahead(blocks, lambda block: block, workers=-1))


def test_maps_read_ahead_by_workers_are_those_read_inline(volumes, tmp_path):
    source, items = source_and_items(volumes)
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        explain_items(
            source, items, out, methods=("gradient", "gradcam"), batch_size=BATCH, overlays=2, workers=workers,
            progress=False,
        )  # fmt: skip
        outputs[workers] = out
    rows = [
        [{k: v.replace(str(outputs[w]), "OUT") for k, v in row.items()} for row in read_rows(outputs[w] / "maps.csv")]
        for w in (0, 2)
    ]
    assert len(rows[0]) == 2 * N_ITEMS and rows[0] == rows[1]
    assert not any(row["error"] for row in rows[0])
    assert tree_bytes(outputs[0], (BLOCKS_FOLDER, "timings.csv", "maps.csv")) == tree_bytes(
        outputs[2], (BLOCKS_FOLDER, "timings.csv", "maps.csv")
    )
    assert len(list((outputs[2] / "overlays").glob("*/*.png"))) == 4
    timings = read_rows(outputs[2] / "timings.csv")
    assert [(t["id"], t["method"]) for t in timings] == [(r["id"], r["method"]) for r in rows[1]]
    assert all(float(t["seconds_per_image"]) > 0 for t in timings)


def test_an_unreadable_image_becomes_an_error_row_and_the_others_are_written(volumes, tmp_path, capsys):
    root = copy_of(volumes, tmp_path / "data")
    (root / "images" / "case005.nii.gz").write_bytes(b"not a NIfTI file")
    (root / "images" / "case006.nii.gz").unlink()
    out = tmp_path / "out"
    argv = ["--quiet", "explain", "--model", str(root / "model.pt"), str(root / "manifest.csv")]
    assert main([*argv, "--method", "gradient", "--batch-size", str(BATCH), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: 2 of 24 images could not be explained")
    assert "case005.nii.gz" in captured.err and "maps.csv" in captured.err
    assert f"wrote {out / 'maps.csv'}" in captured.out
    rows = {row["id"]: row for row in read_rows(out / "maps.csv")}
    assert len(rows) == N_ITEMS
    assert "cannot read nifti file" in rows["case005"]["error"] and "no such file" in rows["case006"]["error"]
    for broken in ("case005", "case006"):
        assert rows[broken]["map"] == "" and rows[broken]["probability"] == ""
        assert not (out / "maps" / "gradient" / f"{broken}.nii.gz").exists()
    fine = [row for key, row in rows.items() if key not in ("case005", "case006")]
    assert all(row["error"] == "" and Path(row["map"]).is_file() for row in fine)

    # evaluate: a map that cannot be read is a row with its reason; the summary rests on the others
    (out / "maps" / "gradient" / "case003.nii.gz").write_bytes(b"truncated")
    assert main(["--quiet", "evaluate", str(out), "--out", str(tmp_path / "evaluation")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 1 of 7 maps could not be scored")
    per_image = {row["id"]: row for row in read_rows(tmp_path / "evaluation" / "per_image.csv")}
    assert len(per_image) == 7  # the masked cases 0, 3, ..., 21 but case006, which could not be read
    assert per_image["case003"]["error"] and per_image["case003"]["roc_auc"] == ""
    assert all(row["error"] == "" and float(row["roc_auc"]) >= 0 for k, row in per_image.items() if k != "case003")
    assert read_rows(tmp_path / "evaluation" / "summary.csv")[0]["n"] == "6"


def test_a_rerun_computes_only_what_is_missing_and_other_settings_start_again(volumes, tmp_path):
    source, items = source_and_items(volumes)
    out, messages = tmp_path / "out", []
    explain_items(source, items[:8], out, methods=("gradient",), batch_size=BATCH, overlays=0, progress=False)
    first = tree_bytes(out)
    explain_items(
        source, items, out, methods=("gradient",), batch_size=BATCH, overlays=0, progress=False, log=messages.append
    )
    explain_items(
        source, items, out, methods=("gradient",), batch_size=BATCH, overlays=0, progress=False, log=messages.append
    )
    explain_items(
        source, items, out, methods=("gradcam",), batch_size=BATCH, overlays=0, progress=False, log=messages.append
    )
    assert messages == [
        "24 images x 1 method(s): 24 computed now, 0 kept from an earlier run, 0 could not be read",  # other items
        "24 images x 1 method(s): 0 computed now, 24 kept from an earlier run, 0 could not be read",
        "24 images x 1 method(s): 24 computed now, 0 kept from an earlier run, 0 could not be read",  # other method
    ]
    assert first["maps/gradient/case000.nii.gz"] == tree_bytes(out)["maps/gradient/case000.nii.gz"]
    assert {row["method"] for row in read_rows(out / "maps.csv")} == {"gradcam"}

    rows, _ = evaluate_maps(out / "maps.csv", tmp_path / "evaluation", log=lambda _: None)
    kept = sorted((tmp_path / "evaluation" / BLOCKS_FOLDER).glob("block*.json"))
    stamps = [path.stat().st_mtime_ns for path in kept]
    again, _ = evaluate_maps(out / "maps.csv", tmp_path / "evaluation", log=lambda _: None)
    assert again == rows and [path.stat().st_mtime_ns for path in kept] == stamps  # read back, not computed


def test_images_the_trust_checks_cannot_read_are_left_out_and_listed(volumes, tmp_path):
    root = copy_of(volumes, tmp_path / "data")
    (root / "images" / "case002.nii.gz").write_bytes(b"corrupt")
    source, items = source_and_items(root)
    inputs = read_trust_inputs(items, source.card, 8, source=source, workers=2)
    assert [entry["id"] for entry in inputs.unreadable] == ["case002"]
    assert "cannot read nifti file" in inputs.unreadable[0]["error"]
    readable = [item for item in items[:8] if item["id"] != "case002"]
    images, labels, masks = load_trust_inputs(readable, source.card, source=source)
    assert inputs.ids == [item["id"] for item in readable]
    assert torch.equal(inputs.images, images) and torch.equal(inputs.labels, labels)
    assert [m is None for m in inputs.masks] == [m is None for m in masks]
    assert all(np.array_equal(a, b) for a, b in zip(inputs.masks, masks) if a is not None)
    with pytest.raises(ValueError, match="case002: .*cannot read nifti file"):
        load_trust_inputs(items[:8], source.card, source=source)


@pytest.mark.e2e
def test_a_killed_explain_resumes_where_it_stopped_and_writes_the_same_bytes(volumes, tmp_path):
    root = copy_of(volumes, tmp_path / "data")
    out = tmp_path / "out"
    command = [
        monai_sal_executable(),
        "--quiet",
        "explain",
        "--model",
        str(root / "model.pt"),
        str(root / "manifest.csv"),
    ]
    command += ["--method", "gradient,gradcam", "--batch-size", str(BATCH), "--overlays", "6", "--out", str(out)]
    uninterrupted = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    reference = tree_bytes(out)
    out.rename(tmp_path / "reference")

    # The NRRD case (block 3) becomes a FIFO with no writer: the worker that reads it waits there, as
    # on a hung file system, so blocks 0-2 finish and the run is killed before it computes block 3.
    image = root / "images" / f"case{NRRD_CASE:03d}.nrrd"
    image.rename(tmp_path / image.name)
    os.mkfifo(image)
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        finished = out / BLOCKS_FOLDER
        deadline = time.monotonic() + 300
        while len(list(finished.glob("block*.json"))) < 3 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # nothing more finishes meanwhile: block 3 waits for the FIFO
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert sorted(p.name for p in finished.glob("block*.json")) == [f"block{b:06d}.json" for b in range(3)]
    assert not (out / "maps.csv").exists()
    stale = out / "maps" / "gradient" / ".case013.nii.gz.x1y2z3.tmp.nii.gz"
    stale.write_bytes(b"what a write cut short by the kill leaves")

    image.unlink()
    (tmp_path / image.name).rename(image)
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "24 images x 2 method(s): 12 computed now, 12 kept from an earlier run, 0 could not be read" in (
        resumed.stdout
    )
    assert not stale.exists()
    assert tree_bytes(out) == reference
