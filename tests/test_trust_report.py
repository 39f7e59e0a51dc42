"""experiments/trust_report.py: a trust card computed in parts (some methods in each process, as
``monai-sal serve`` prepares its default models' cards) is the card computed in one go, and a
killed ``monai-sal trust`` resumes with the methods it had finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import monai_sal_executable
from server_fixtures import save_tiny_checkpoint, smooth_field, write_png

from monai_sal_app.experiments.trust_report import (
    PARTS_FOLDER,
    merge_trust_cards,
    run_trust,
    trust_card_part,
    write_trust_outputs,
)

METHODS = ["gradient", "gradcam", "gradient_x_input"]
TIMINGS = {"seconds", "created", "seconds_per_map", "seconds_per_image"}


def without_timings(value):
    """``value`` (a card or part of one) without the keys that hold when or how fast it was computed."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.fixture
def model_and_images(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", 2)
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(6):
        write_png(smooth_field((32, 32), seed=seed), folder / f"image_{seed}.png")
    return checkpoint, folder


def test_a_card_merged_from_parts_is_the_card_computed_in_one_go(tmp_path, model_and_images):
    checkpoint, folder = model_and_images
    whole = run_trust(checkpoint, folder, tmp_path / "whole", methods=METHODS, max_images=6, workers=0)
    parts = [
        trust_card_part(checkpoint, folder, ["gradient_x_input"], max_images=6, workers=0),
        trust_card_part(checkpoint, folder, ["gradient", "gradcam"], max_images=6, workers=0),
    ]
    merged = merge_trust_cards(parts, order=METHODS)
    assert list(merged["methods"]) == METHODS == merged["settings"]["methods"]
    assert without_timings(merged) == without_timings(whole)
    assert merged["seconds"] == pytest.approx(sum(part["seconds"] for part in parts))

    checkpoint.with_name("model.trust.json").unlink()
    write_trust_outputs(merged, checkpoint, folder, tmp_path / "parts")
    assert json.loads(checkpoint.with_name("model.trust.json").read_text()) == merged
    report = (tmp_path / "parts" / "trust.md").read_text()
    for method in METHODS:  # the example maps at every state, drawn again from the card's first images
        assert (
            f"figures/states_{method}.png" in report
            and (tmp_path / "parts" / "figures" / f"states_{method}.png").is_file()
        )


def test_parts_that_are_not_of_one_card_are_refused(model_and_images):
    checkpoint, folder = model_and_images
    gradient = trust_card_part(checkpoint, folder, ["gradient"], max_images=6, workers=0, checks=["fidelity"])
    fewer_images = trust_card_part(checkpoint, folder, ["gradcam"], max_images=4, workers=0, checks=["fidelity"])
    other_checks = trust_card_part(checkpoint, folder, ["gradcam"], max_images=6, workers=0, checks=["randomization"])
    with pytest.raises(ValueError, match="differ in 'data'"):
        merge_trust_cards([gradient, fewer_images])
    with pytest.raises(ValueError, match="differ in their settings"):
        merge_trust_cards([gradient, other_checks])
    with pytest.raises(ValueError, match=r"\['gradient'\] are in more than one"):
        merge_trust_cards([gradient, gradient])
    with pytest.raises(ValueError, match="no trust card parts"):
        merge_trust_cards([])


@pytest.mark.e2e
def test_a_killed_trust_run_resumes_with_the_methods_it_had_finished(tmp_path, model_and_images):
    checkpoint, folder = model_and_images
    methods = ["gradient", "gradcam", "gradient_x_input", "guided_backprop", "smoothgrad"]

    def command(out, *more):
        return [
            monai_sal_executable(), "--quiet", "trust", "--model", str(checkpoint), str(folder), "--methods",
            ",".join(methods), "--max-images", "6", "--workers", "0", "--out", str(out), *more,
        ]  # fmt: skip

    card_path = checkpoint.with_name("model.trust.json")
    uninterrupted = subprocess.run(command(tmp_path / "reference"), capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    reference = json.loads(card_path.read_text())

    out = tmp_path / "out"
    parts = out / PARTS_FOLDER
    run = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:  # killed once two methods are kept: the methods after them take far longer than one poll
        deadline = time.monotonic() + 300
        while len(set(parts.glob("*.json")) - {parts / "settings.json"}) < 2 and time.monotonic() < deadline:
            if run.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL
    kept = [m for m in methods if (parts / f"{m}.json").is_file()]
    assert 2 <= len(kept) < len(methods), kept

    resumed = subprocess.run(command(out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    count = f"{len(methods)} method(s): {len(methods) - len(kept)} computed now, {len(kept)} kept from an earlier run"
    assert count in resumed.stdout
    card = json.loads(card_path.read_text())
    assert card.pop("kept_methods") == kept
    assert without_timings(card) == without_timings(reference)  # the numbers of an uninterrupted run

    again = subprocess.run(command(out, "--seed", "1"), capture_output=True, text=True, timeout=600)
    assert f"{len(methods)} computed now, 0 kept" in again.stdout  # other settings: everything again
