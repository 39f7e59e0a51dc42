"""The typed model card: validation that names the field, the decision threshold, and its use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from server_fixtures import save_tiny_checkpoint, smooth_field
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from monai_sal_app.data.generators import GENERATORS
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.inference import explain_array
from monai_sal_app.models import (
    CardError,
    CheckpointError,
    ModelCard,
    choose_decision_threshold,
    load_classifier,
    predict_classes,
    read_card,
)
from monai_sal_app.models.inputs import load_inputs
from monai_sal_app.models.manifest_training import train_from_manifest

VALID = {
    "architecture": "conv5fc3",
    "spatial_dims": 2,
    "in_channels": 1,
    "num_classes": 2,
    "labels": ["normal", "opacity"],
    "input_size": [32, 32],
    "arch_kwargs": {"channels": [4, 4, 8, 8, 8]},
}


def without(key: str) -> dict:
    return {k: v for k, v in VALID.items() if k != key}


BAD_CARDS = [
    (without("input_size"), "input_size", "missing"),
    (without("architecture"), "architecture", "missing"),
    (without("labels"), "labels", "missing"),
    ({**VALID, "input_size": None}, "input_size", "2 sides"),
    ({**VALID, "input_size": [32, 32, 32]}, "input_size", "2 sides"),
    ({**VALID, "input_size": [32, 0]}, "input_size", "integer >= 1"),
    ({**VALID, "input_size": "32"}, "input_size", "2 sides"),
    ({**VALID, "input_size": [32.5, 32]}, "input_size", "integer >= 1"),
    ({**VALID, "spatial_dims": 4}, "spatial_dims", "2 or 3"),
    ({**VALID, "architecture": "vgg16"}, "architecture", "unknown"),
    ({**VALID, "in_channels": 0}, "in_channels", "integer >= 1"),
    ({**VALID, "num_classes": 1, "labels": ["a"]}, "num_classes", "at least 2"),
    ({**VALID, "labels": ["a", "b", "c"]}, "labels", "3 names for num_classes=2"),
    ({**VALID, "labels": ["a", "a"]}, "labels", "distinct"),
    ({**VALID, "labels": "ab"}, "labels", "list of strings"),
    ({**VALID, "decision_threshold": 1.5}, "decision_threshold", "(0, 1)"),
    ({**VALID, "decision_threshold": "0.5"}, "decision_threshold", "(0, 1)"),
    (
        {**VALID, "num_classes": 3, "labels": ["a", "b", "c"], "decision_threshold": 0.5},
        "decision_threshold",
        "two-class",
    ),
    ({**VALID, "arch_kwargs": [4, 4]}, "arch_kwargs", "JSON object"),
    ({**VALID, "history": {"epoch": 1}}, "history", "list"),
    ({**VALID, "input_sise": [32, 32]}, "input_sise", "unknown field"),
]


@pytest.mark.parametrize(("data", "field", "fragment"), BAD_CARDS, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_CARDS)])
def test_invalid_card_is_refused_naming_the_field(data, field, fragment):
    with pytest.raises(CardError) as caught:
        ModelCard.from_dict(data)
    assert caught.value.field == field
    assert f"'{field}'" in str(caught.value) and fragment in str(caught.value)


def test_card_that_is_not_an_object_is_refused():
    with pytest.raises(CardError, match="JSON object"):
        ModelCard.from_dict(["architecture", "conv5fc3"])


def test_card_round_trips_through_json():
    card = ModelCard.from_dict({**VALID, "decision_threshold": 0.3, "metrics": {"test_auc": 0.9}})
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    assert card.input_size == (32, 32) and card.labels == ("normal", "opacity")


@pytest.mark.parametrize(
    ("data", "field"),
    [(without("input_size"), "input_size"), ({**VALID, "spatial_dims": 3}, "input_size")],
    ids=["missing", "wrong-length"],
)
def test_reading_an_invalid_card_names_file_and_field(tmp_path, data, field):
    path = save_tiny_checkpoint(tmp_path / "model.pt", 2)
    (tmp_path / "model.json").write_text(json.dumps(data))
    for read in (read_card, lambda p: load_classifier(p, device="cpu")):
        with pytest.raises(CheckpointError) as caught:
            read(path)
        assert "model.json" in str(caught.value) and f"'{field}'" in str(caught.value)


def test_an_input_size_the_network_cannot_take_is_refused_on_load(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "model.pt", 2)
    card = json.loads((tmp_path / "model.json").read_text())
    card["input_size"] = [8, 8]  # conv5-fc3 needs at least 16 px per side
    (tmp_path / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="'input_size': \\[8, 8\\] does not fit"):
        load_classifier(path, device="cpu")


# ----------------------------------------------------------------------------- decision threshold


@pytest.mark.slow
def test_threshold_maximises_balanced_accuracy_against_a_brute_force_search():
    rng = np.random.default_rng(0)
    y = torch.tensor(np.r_[np.zeros(30), np.ones(12)].astype(np.int64))
    p1 = np.clip(np.r_[rng.normal(0.75, 0.1, 30), rng.normal(0.9, 0.05, 12)], 0.01, 0.99)  # shifted: argmax fails
    probabilities = torch.tensor(np.stack([1 - p1, p1], axis=1))
    threshold = choose_decision_threshold(probabilities, y)
    chosen = balanced_accuracy_score(y.numpy(), (p1 >= threshold).astype(int))
    brute = max(balanced_accuracy_score(y.numpy(), (p1 >= t).astype(int)) for t in np.linspace(0, 1, 10001))
    assert chosen == pytest.approx(brute)
    assert chosen > balanced_accuracy_score(y.numpy(), p1 >= 0.5) + 0.2
    assert 0 < threshold < 1


def test_threshold_is_none_without_two_classes_or_distinct_scores():
    same = torch.full((6, 2), 0.5, dtype=torch.float64)
    assert choose_decision_threshold(same, torch.tensor([0, 1, 0, 1, 0, 1])) is None
    spread = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    assert choose_decision_threshold(spread, torch.tensor([1, 1, 1])) is None


def test_predict_classes_uses_the_threshold_only_for_two_classes():
    p = np.array([[0.7, 0.3], [0.45, 0.55], [0.2, 0.8]])
    assert predict_classes(p).tolist() == [0, 1, 1]
    assert predict_classes(p, 0.25).tolist() == [1, 1, 1]
    assert predict_classes(p, 0.6).tolist() == [0, 0, 1]
    assert predict_classes(np.array([0.1, 0.2, 0.7])).tolist() == 2
    with pytest.raises(ValueError, match="two classes"):
        predict_classes(np.array([[0.1, 0.2, 0.7]]), 0.5)


@pytest.mark.parametrize(("threshold", "expected"), [(1e-6, 1), (1 - 1e-6, 0)])
def test_explain_array_predicts_and_explains_by_the_cards_threshold(tmp_path, threshold, expected):
    path = save_tiny_checkpoint(tmp_path / "model.pt", 2, decision_threshold=threshold)
    model, card = load_classifier(path, device="cpu")
    explanation = explain_array(model, card, smooth_field((40, 40), seed=3), "gradient")
    assert 0 < explanation.probabilities[1] < 1
    assert explanation.prediction == explanation.target == expected


def test_training_records_the_validation_threshold_and_test_numbers(tmp_path):
    generate = GENERATORS["shepp-logan"].generate
    train = generate(tmp_path / "train", preset="homogeneous", dim=2, size=32, per_class=12, seed=0, progress=False)
    test = generate(tmp_path / "test", preset="test", dim=2, size=32, per_class=6, seed=1, progress=False)
    model, card = train_from_manifest(
        train, tmp_path / "model.pt", epochs=2, batch_size=8, labels=["control", "patient"],
        test_manifest=test, progress=False, log=lambda message: None,
    )  # fmt: skip
    assert read_card(tmp_path / "model.pt") == card
    assert card.decision_threshold is None or 0 < card.decision_threshold < 1
    assert card.data["test_manifest"] == str(test.resolve()) and card.metrics["n_test"] == 12
    items = read_manifest(test)
    x, _ = load_inputs(items, card.input_size, progress=False)
    y = torch.tensor([int(i["label"]) for i in items])
    # by hand: the softmax of each test image, class 1 where P(patient) is at or above the card's
    # threshold (the argmax without one), and scikit-learn's balanced accuracy and AUC
    with torch.no_grad():
        probabilities = model.eval()(x).softmax(1).numpy()
    if card.decision_threshold is None:
        predicted = probabilities.argmax(1)
    else:
        predicted = (probabilities[:, 1] >= card.decision_threshold).astype(int)
    assert card.metrics["test_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y.numpy(), predicted))
    assert card.metrics["test_auc"] == pytest.approx(roc_auc_score(y.numpy(), probabilities[:, 1]))
