"""The trust card: every check per method in one JSON-safe dict, stored beside the checkpoint."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import images_for, tiny_resnet

from monai_sal_app.evaluation.trust import (
    TrustCardError,
    read_trust_card,
    trust_card,
    trust_card_path,
    write_trust_card,
)


@pytest.fixture(scope="module")
def setup():
    model = tiny_resnet(2).eval()
    images = images_for(2, n=6, side=32, seed=5)
    masks = [None] + [np.pad(np.ones((8, 8), dtype=bool), ((4 + i, 20 - i), (4, 20))) for i in range(5)]
    return model, images, masks


def test_card_holds_every_check_per_method_and_is_json(setup):
    model, images, masks = setup
    card = trust_card(model, images, masks=masks, methods=["gradient", "gradcam"], data={"source": "test"})
    json.dumps(card, allow_nan=False)
    assert set(card["methods"]) == {"gradient", "gradcam"}
    assert card["data"] == {"n_images": 6, "image_shape": [1, 32, 32], "n_masks": 5, "source": "test"}
    for entry in card["methods"].values():
        assert set(entry["verdicts"]) == {"randomization", "fidelity", "localization"}
        assert entry["randomization"]["verdict"] in ("passes", "fails")
        assert entry["randomization"]["states"][0] == "fc"
        assert entry["fidelity"]["verdict"] in ("tracks the model", "does not track the model")
        assert entry["localization"]["roc_auc"]["n"] == 5
        assert entry["seconds_per_map"] > 0


def test_checks_can_be_chosen_and_repeatability_compares_models(setup):
    model, images, _ = setup
    card = trust_card(
        model, images, methods=["gradient"], checks=["repeatability"], compare_with={"copy": copy.deepcopy(model)}
    )
    entry = card["methods"]["gradient"]
    assert set(entry) == {"repeatability", "verdicts", "seconds_per_map"}
    assert entry["repeatability"]["others"] == ["copy"] and entry["verdicts"]["repeatability"] == "passes"


def test_localization_without_masks_says_so(setup):
    model, images, _ = setup
    card = trust_card(model, images, methods=["gradient"], checks=["localization"])
    assert card["methods"]["gradient"]["localization"] == {"available": False, "why": "no masks given"}


def test_no_trace_on_the_users_model(setup):
    model, images, masks = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    trust_card(model, images, masks=masks, methods=["guided_backprop"])
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    model.eval()


def test_written_atomically_beside_the_checkpoint_and_read_back(tmp_path, setup):
    model, images, _ = setup
    card = trust_card(model, images, methods=["gradient"], checks=["fidelity"])
    checkpoint = tmp_path / "chest.pt"
    path = write_trust_card(card, checkpoint)
    assert path == trust_card_path(checkpoint) == tmp_path / "chest.trust.json"
    assert read_trust_card(checkpoint) == json.loads(json.dumps(card))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.trust.json"]
    assert read_trust_card(tmp_path / "other.pt") is None
    (tmp_path / "bad.trust.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt trust card"):
        read_trust_card(tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        write_trust_card({"methods": {"x": float("nan")}}, checkpoint)  # not JSON: nothing written
    assert read_trust_card(checkpoint) == json.loads(json.dumps(card))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"images": "first"}, "at least 2 images"),
        ({"methods": ["gradcamm"]}, "unknown method"),
        ({"checks": ["sanity"]}, "checks must be drawn from"),
        ({"checks": ["repeatability"]}, "needs other models"),
        ({"masks": "small"}, "on the images' grid"),
        ({"labels": [0, 1]}, "2 labels for 6 images"),
    ],
)
def test_bad_input_raises_before_any_check(setup, arguments, message):
    model, images, _ = setup
    if arguments.get("images") == "first":
        arguments = {**arguments, "images": images[:1]}
    if arguments.get("masks") == "small":
        arguments = {**arguments, "masks": [np.zeros((16, 16), dtype=bool)] * 6}
    with pytest.raises(TrustCardError, match=message):
        trust_card(model, **{"images": images, **arguments})


def test_cli_writes_the_card_beside_the_checkpoint_and_a_report(tmp_path, capsys):
    from server_fixtures import save_tiny_checkpoint

    from monai_sal_app.cli import main
    from monai_sal_app.data.shepp_logan import generate_shepp_logan

    manifest = generate_shepp_logan(tmp_path / "data", preset="test", dim=2, size=32, per_class=3, progress=False)
    model = save_tiny_checkpoint(tmp_path / "model.pt", 2)
    twin = save_tiny_checkpoint(tmp_path / "twin.pt", 2, seed=1)
    argv = ["--quiet", "trust", "--model", str(model), str(manifest), "--methods", "gradient,gradcam"]
    argv += ["--checks", "randomization,fidelity,localization,repeatability", "--compare-with", str(twin)]
    assert main([*argv, "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "| gradient |" in printed and "| gradcam |" in printed and "model.trust.json" in printed
    card = read_trust_card(model)
    assert card["data"]["n_images"] == 6 and card["data"]["n_masks"] == 3  # the patients' region masks
    assert card["methods"]["gradient"]["repeatability"]["others"] == ["twin"]
    report = tmp_path / "report"
    assert json.loads((report / "trust.json").read_text()) == card
    figures = {p.name for p in (report / "figures").iterdir()}
    assert figures == {"randomization.png", "fidelity.png", "states_gradient.png", "states_gradcam.png"}
    text = (report / "trust.md").read_text()
    assert all(f"figures/{name}" in text for name in figures)


def test_cli_refuses_to_compare_models_of_other_labels(tmp_path, capsys):
    from server_fixtures import save_tiny_checkpoint

    from monai_sal_app.cli import main
    from monai_sal_app.data.shepp_logan import generate_shepp_logan

    manifest = generate_shepp_logan(tmp_path / "data", preset="test", dim=2, size=32, per_class=2, progress=False)
    model = save_tiny_checkpoint(tmp_path / "model.pt", 2)
    other = save_tiny_checkpoint(tmp_path / "other.pt", 2, labels=["normal", "opacity"])
    argv = ["--quiet", "trust", "--model", str(model), str(manifest), "--checks", "repeatability"]
    assert main([*argv, "--compare-with", str(other), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other labels" in err and err.count("\n") == 1
    assert not (tmp_path / "model.trust.json").exists() and not (tmp_path / "report").exists()


def test_an_untrained_model_localizes_at_chance_where_the_mask_is_not_in_the_image(setup):
    """The masks mark places the images do not show (drawn independently of them): an untrained
    model's maps then score ROC AUC about 0.5, and the verdict says so. (On anatomy masks an
    untrained network's edge-like maps do better than 0.5: docs/TRUST_CARD.md.)"""
    model, _, _ = setup
    images = images_for(2, n=24, side=32, seed=11)
    rng = np.random.default_rng(12)
    masks = []
    for _ in range(24):
        y, x = rng.integers(0, 24, size=2)
        mask = np.zeros((32, 32), dtype=bool)
        mask[y : y + 8, x : x + 8] = True
        masks.append(mask)
    card = trust_card(model, images, masks=masks, methods=["gradient", "gradcam"], checks=["localization"])
    for entry in card["methods"].values():
        roc = entry["localization"]["roc_auc"]
        assert roc["ci_low"] <= 0.5 <= roc["ci_high"] and abs(roc["mean"] - 0.5) < 0.1
        assert entry["localization"]["verdict"] == "not better than chance"
