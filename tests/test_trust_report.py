"""experiments/trust_report.py: a trust card computed in parts (some methods in each process, as
``monai-sal serve`` prepares its default models' cards) is the card computed in one go."""

from __future__ import annotations

import json

import pytest
from server_fixtures import save_tiny_checkpoint, smooth_field, write_png

from monai_sal_app.experiments.trust_report import (
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
