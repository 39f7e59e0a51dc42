"""The experiment runner: recipe files checked before any work, outputs, resuming, torchrun, and the
report as headless Chromium shows it. The recipe used is ``subtypes`` at ``smoke`` (a rerun's CSVs,
for every recipe: test_determinism.py)."""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, open_in_chromium, read_rows, results_text, screenshot
from PIL import Image

from monai_sal_app.allocator import jemalloc_library, without_batch_allocator
from monai_sal_app.cli import main
from monai_sal_app.experiments import studies
from monai_sal_app.experiments.runner import (
    SCALES,
    ExperimentError,
    config_folder,
    experiment_names,
    resolve_config,
    run_experiment,
)
from monai_sal_app.experiments.studies import RECIPES
from monai_sal_app.experiments.studies.subtypes import conditions

RECIPE = "subtypes"  # conftest's smoke_run


def test_every_study_module_is_registered_under_its_name():
    modules = sorted(module.name for module in pkgutil.iter_modules(studies.__path__))
    assert list(RECIPES) == modules


def test_every_builtin_recipe_resolves_at_every_scale():
    assert config_folder() == REPO / "configs" / "experiments"
    names = experiment_names()
    assert "subtypes" in names
    assert {resolve_config(name, "smoke")["recipe"] for name in names} <= set(RECIPES)
    for name in names:
        for scale in SCALES:
            config = resolve_config(name, scale)
            assert config["scale"] == scale and config["title"] and config["question"]
            assert set(config["settings"]) == set(RECIPES[config["recipe"]].settings)


def test_settings_given_with_set_replace_the_scales_and_keep_the_rest():
    smoke = resolve_config("subtypes", "smoke")["settings"]
    changed = resolve_config("subtypes", "smoke", overrides={"losses": ["ce"], "replicates": 1})["settings"]
    assert changed == {**smoke, "losses": ["ce"], "replicates": 1}


def test_experiment_list_prints_every_recipe(capsys):
    assert main(["experiment", "list"]) == 0
    printed = capsys.readouterr().out
    for name in experiment_names():
        assert name in printed


@pytest.mark.e2e
def test_a_run_writes_results_figures_config_versions_hashes_and_report(smoke_run):
    config = yaml.safe_load((smoke_run / "config.yaml").read_text())
    assert config["recipe"] == "subtypes" and config["scale"] == "smoke" and config["seed"] == 0
    rows = read_rows(smoke_run / "results" / "subtypes.csv")
    assert len(rows) == len(conditions(config["settings"]))
    for row in rows:
        assert 0 <= float(row["test_auc"]) <= 1 and -1 <= float(row["ari"]) <= 1
    summary = read_rows(smoke_run / "results" / "subtypes_summary.csv")
    assert {"ari_mean", "ari_ci_low", "ari_ci_high", "b_dagger_mean", "n"} <= set(summary[0])
    for figure in ("subtype_group_maps", "ari_by_condition"):
        assert Image.open(smoke_run / "figures" / f"{figure}.png").format == "PNG"
    environment = json.loads((smoke_run / "environment.json").read_text())
    assert environment["packages"]["torch"] and environment["world_size"] == 1
    assert environment["torch_threads"] == torch.get_num_threads()  # the numbers depend on it
    data = json.loads((smoke_run / "data.json").read_text())
    assert set(data) == {"test", "homogeneous"}
    assert all(len(entry["files_sha256"]) == 64 and entry["files"] > 0 for entry in data.values())
    report = (smoke_run / "report.html").read_text()
    assert "Losses" in report and "Augmentations" in report and "data:image/png;base64," in report


@pytest.mark.e2e
def test_a_resumed_run_computes_only_what_is_missing(smoke_run, tmp_path):
    again = tmp_path / "again"
    run_experiment("subtypes", again, scale="smoke", progress=False, log=lambda _: None)

    # An interrupted run: the last block lost and a half-written line, no tables, no report.
    blocks = again / "steps" / "models" / "rank0.jsonl"
    lines = blocks.read_text().splitlines()
    blocks.write_text("\n".join(lines[:-1]) + '\n{"block": 9, "ro')
    for path in [*(again / "results").glob("*.csv"), again / "report.html"]:
        path.unlink()
    finished = {json.loads(line)["block"] for line in lines[:-1]}
    messages = []
    run_experiment("subtypes", again, scale="smoke", progress=False, log=messages.append)
    assert results_text(again) == results_text(smoke_run)
    assert "step data" not in messages  # the data step's result was on disk
    redone = [json.loads(line)["block"] for line in blocks.read_text().splitlines()[len(lines) :]]
    assert redone == [json.loads(lines[-1])["block"]] and not set(redone) & finished


@pytest.mark.e2e
def test_a_folder_holding_another_runs_settings_is_refused(smoke_run):
    before = (smoke_run / "config.yaml").read_text()
    with pytest.raises(ExperimentError, match="other settings"):
        run_experiment("subtypes", smoke_run, scale="smoke", seed=5, progress=False, log=lambda _: None)
    assert (smoke_run / "config.yaml").read_text() == before


def write_recipe(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((config_folder() / "subtypes.yaml").read_text())
    for key, value in changes.items():
        target = raw
        *parents, last = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"recipe": "nope"}, "unknown recipe 'nope'"),
        ({"colour": "red"}, "unknown key(s) ['colour']"),
        ({"settings.learning_rate": 0.1}, "settings: unknown key(s) ['learning_rate']"),
        ({"scales.paper.epoch": 3}, "scales.paper: unknown key(s) ['epoch']"),
        ({"scales.huge": {}}, "scales: unknown key(s) ['huge']"),
        ({"scales.smoke.losses": ["ce", "hinge"]}, "unknown loss 'hinge'"),
        ({"scales.smoke.size": 0}, "size must be an integer >= 1"),
        ({"seed": "zero"}, "seed must be an integer"),
    ],
)
def test_a_bad_recipe_file_is_one_clear_error_before_any_work(tmp_path, capsys, changes, message):
    recipe = write_recipe(tmp_path, **changes)
    out = tmp_path / "out"
    assert main(["--quiet", "experiment", "run", str(recipe), "--scale", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope"], "unknown experiment 'nope'; choose one of"),
        (["missing.yaml"], "no recipe file missing.yaml"),
        (["subtypes", "--data", "manifest.csv"], "recipe subtypes makes its own data and takes no --data"),
        (["subtypes", "--model", "model.pt"], "recipe subtypes trains its own models and takes no --model"),
        (["subtypes", "--set", "colour=red"], "subtypes: --set: unknown key(s) ['colour']"),
        (["subtypes", "--set", "losses"], "--set takes key=value, got 'losses'"),
        (["subtypes", "--set", 'losses=["hinge"]'], "(smoke, --set losses): unknown loss 'hinge'"),
    ],
)
def test_unknown_recipes_and_inputs_a_recipe_does_not_take_are_refused(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["--quiet", "experiment", "run", *argv, "--scale", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def run_cli(arguments: str, processes: int) -> subprocess.CompletedProcess:
    """``python -m monai_sal_app --quiet <arguments>`` (the ``monai-sal`` command: with the batch
    memory allocator) in one process, or under torchrun in ``processes`` of one thread each
    (``arguments`` split at spaces); it must succeed."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, "-m", "monai_sal_app", "--quiet", *arguments.split()]
    env = {**without_batch_allocator(os.environ), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, (arguments, result.stderr[-3000:])
    return result


def run_on_two_ranks(recipe: str, out: Path) -> None:
    """The smoke run of ``recipe`` under torchrun on two ranks, each with the batch allocator (the
    runs it is compared with ran inside pytest, on glibc's defaults)."""
    run_cli(f"experiment run {recipe} --scale smoke --out {out}", 2)
    environment = json.loads((out / "environment.json").read_text())
    assert environment["world_size"] == 2
    assert environment["allocator"] == ("jemalloc" if jemalloc_library() else "glibc-tunables")
    assert 100 < environment["peak_resident_memory_mb"] < 8192


@pytest.mark.e2e
def test_torchrun_with_two_processes_gives_the_csvs_of_one(smoke_run, tmp_path):
    # One process per rank, one thread each (torchrun's default and this test session's), the same
    # blocks of work: the numbers agree to the last bit.
    out = tmp_path / "two"
    run_on_two_ranks("subtypes", out)
    assert sorted(p.name for p in (out / "steps" / "models").glob("*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    assert results_text(out) == results_text(smoke_run)


@pytest.mark.e2e
def test_a_block_that_explains_a_manifest_runs_whole_on_its_rank_under_torchrun(smoke_runs, tmp_path):
    # trainable_vs_posthoc explains each block's images with explain_items, which shares its own
    # work out under torchrun: inside a block it must not wait for the other rank.
    one = smoke_runs("trainable_vs_posthoc")
    two = tmp_path / "two"
    run_on_two_ranks("trainable_vs_posthoc", two)
    assert results_text(two) == results_text(one)


@pytest.mark.e2e
def test_the_report_shows_every_table_and_image_in_headless_chromium(smoke_run, tmp_path):
    page = open_in_chromium(smoke_run / "report.html", tmp_path)
    assert page["tables"] >= 3 and page["tables_shown"] == page["tables"]
    assert page["images"] == 2 and page["images_shown"] == page["images"]
    assert page["external"] == []  # nothing loaded from outside the file
    shot = np.asarray(Image.open(screenshot(smoke_run / "report.html", tmp_path / "report.png")).convert("L"))
    assert shot.std() > 10 and (shot < 128).mean() > 0.01  # text, tables and figures drawn, not a blank page


def phantoms_and_a_model(folder: Path, per_class: int, seed: int) -> Path:
    """A manifest of 2D 32 px Shepp-Logan test phantoms (``per_class`` a class, drawn with ``seed``)
    in ``folder/data``, and a conv5-fc3 trained one epoch on it, ``folder/model.pt``; returns the manifest."""
    from monai_sal_app.data.shepp_logan import generate_shepp_logan
    from monai_sal_app.models.manifest_training import train_from_manifest

    manifest = generate_shepp_logan(folder / "data", "test", 2, 32, per_class, seed=seed, progress=False)
    train_from_manifest(manifest, folder / "model.pt", epochs=1, progress=False, log=lambda _: None)
    return manifest


@pytest.mark.e2e
def test_explain_and_evaluate_under_torchrun_give_the_rows_and_maps_of_one_process(tmp_path):
    from monai_sal_app.data.io import read_image

    manifest = phantoms_and_a_model(tmp_path, per_class=5, seed=3)
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        for step in (
            f"explain --model {tmp_path / 'model.pt'} {manifest} --method gradient,gradcam --batch-size 4 --out {out}",
            f"evaluate {out} --out {out / 'evaluation'}",
        ):
            run_cli(step, processes)
        outputs[processes] = out
    one, two = (read_rows(outputs[p] / "maps.csv") for p in (1, 2))
    assert len(one) == 2 * 10
    strip = [
        {k: v.replace(str(outputs[p]), "OUT") for k, v in row.items()}
        for p, rows in ((1, one), (2, two))
        for row in rows
    ]
    assert strip[: len(one)] == strip[len(one) :]
    for a, b in zip(one, two):
        assert np.array_equal(
            read_image(a["map"], allow_constant=True)[0], read_image(b["map"], allow_constant=True)[0]
        )
    per_image = [(outputs[p] / "evaluation" / "per_image.csv").read_text() for p in (1, 2)]
    assert per_image[0] == per_image[1] and len(per_image[0].splitlines()) > 1


def test_overlay_layer_makes_low_values_transparent_and_clips_at_the_percentile():
    from monai_sal_app.experiments.report import CLIP_PERCENTILE, overlay_layer

    saliency = np.linspace(0.0, 1.0, 10_000).reshape(100, 100)
    saliency[0, 0] = -50.0  # one strong pixel of either sign
    rgba, vmax = overlay_layer(saliency)
    assert vmax == pytest.approx(np.percentile(np.abs(saliency), CLIP_PERCENTILE))
    alpha = rgba[..., 3].ravel()
    assert alpha[1] < 0.01 and alpha[0] == pytest.approx(0.85)  # weak: see-through; the hot pixel clipped
    assert np.all(np.diff(alpha[1:]) >= 0)  # opacity rises with the value
    assert (alpha >= 0.85 - 1e-9).mean() == pytest.approx(1 - CLIP_PERCENTILE / 100, abs=0.002)
    assert overlay_layer(np.zeros((8, 8)))[0][..., 3].max() == 0.0  # a zero map draws nothing


def test_pooled_roc_and_pr_points_are_sklearns():
    from sklearn.metrics import precision_recall_curve
    from sklearn.metrics import roc_curve as sklearn_roc

    from monai_sal_app.experiments.report import pooled_roc_pr

    rng = np.random.default_rng(0)
    masks = rng.random((3, 12, 12)) > 0.8
    values = rng.normal(size=(3, 12, 12)) + 2.0 * masks
    values[1] *= 40.0  # the per-image scaling removes this image's scale
    curve = pooled_roc_pr(values, masks)
    scaled = (np.abs(values).reshape(3, -1) / np.abs(values).reshape(3, -1).max(axis=1, keepdims=True)).ravel()
    fpr, tpr, _ = sklearn_roc(masks.ravel(), scaled, drop_intermediate=False)
    assert np.allclose(curve["fpr"], fpr) and np.allclose(curve["tpr"], tpr)
    precision, recall, _ = precision_recall_curve(masks.ravel(), scaled)
    assert np.allclose(curve["precision"], precision[:-1][::-1]) and np.allclose(curve["recall"], recall[:-1][::-1])
    with pytest.raises(ValueError, match="both inside and outside"):
        pooled_roc_pr(values, np.zeros_like(masks))


def without_timings(value):
    """``value`` (JSON) without the wall times and the creation date, which differ between any two runs."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k and k != "created"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.mark.e2e
def test_trust_under_torchrun_shares_the_methods_out_and_gives_the_card_of_one_process(tmp_path):
    manifest = phantoms_and_a_model(tmp_path, per_class=3, seed=4)
    cards = {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        for suffix in (".pt", ".json"):
            shutil.copy(tmp_path / f"model{suffix}", folder / f"model{suffix}")
        step = (
            f"trust --model {folder / 'model.pt'} {manifest} --methods gradient,gradcam,guided_backprop "
            f"--checks randomization,fidelity --out {folder / 'report'}"
        )
        result = run_cli(step, processes)
        assert result.stdout.count("wrote ") == 1  # rank 0 alone reports
        cards[processes] = json.loads((folder / "model.trust.json").read_text())
    assert list(cards[2]["methods"]) == ["gradient", "gradcam", "guided_backprop"]
    assert without_timings(cards[2]["methods"]) == without_timings(cards[1]["methods"])


def test_a_manifest_without_the_columns_a_recipe_needs_is_refused_before_any_work(tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,image,label\na,a.nii.gz,1\n")
    out = tmp_path / "out"
    argv = ["--quiet", "experiment", "run", "ct_importance", "--scale", "smoke", "--data", str(manifest)]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing column(s) ['mask'] that this recipe needs" in err
    assert not out.exists()
