"""The real-time mask generator: its network and loss terms on hand-made tensors, training against a
classifier whose evidence is known, its checkpoints and cards, and the ``mask_generator`` method."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BLOB_CENTRES,
    BLOB_SIDE,
    BlobModel,
    blob_images,
    blob_mask,
    tiny_conv5fc3,
    trained_blob_explainer,
)

from monai_sal_app.explainers import ExplainerMismatch, explainer_settings, load_explainer, save_explainer
from monai_sal_app.explainers.mask_generator import (
    MaskGenerator,
    _margin_over_best_other,
    alternative_images,
    mask_generator_losses,
    smoothness_loss,
)
from monai_sal_app.explainers.train import DecisionLogits
from monai_sal_app.metrics.localization import localization_metrics
from monai_sal_app.models.card import predict_classes
from monai_sal_app.models.checkpoint import CheckpointError
from monai_sal_app.saliency import explain

SIDE, CENTRES = BLOB_SIDE, BLOB_CENTRES
SMALL = {"channels": [8, 8, 16, 16]}


def test_mask_shape_range_and_grid(dims):
    side = 64 if dims == 2 else 32
    torch.manual_seed(0)
    generator = MaskGenerator(dims, num_classes=3, channels=(4, 4, 8, 8)).eval()
    masks = generator(torch.rand(2, 1, *[side] * dims), torch.tensor([0, 2]))
    assert masks.shape == (2, 1, *[side // 4] * dims)
    assert masks.min() >= 0 and masks.max() <= 1
    with pytest.raises(ValueError, match="multiples of 16"):
        generator(torch.rand(1, 1, *[side + 8] * dims), torch.tensor([0]))


def test_margin_over_the_best_other_class():
    logits = torch.tensor([[1.0, 4.0, 2.5], [3.0, -1.0, 0.0]])
    torch.testing.assert_close(_margin_over_best_other(logits, torch.tensor([1, 1])), torch.tensor([1.5, -4.0]))


@pytest.mark.parametrize("threshold", [None, 0.2, 0.5, 0.93])
def test_decision_logits_argmax_is_the_cards_prediction(threshold):
    torch.manual_seed(0)
    classifier, x = torch.nn.Linear(3, 2), torch.randn(400, 3) * 3
    with torch.no_grad():
        shifted = DecisionLogits(classifier, threshold)(x)
        expected = predict_classes(classifier(x).softmax(1).numpy(), threshold)
    assert (shifted.argmax(1).numpy() == expected).all()


def test_smoothness_loss_by_hand():
    mask = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]])  # one 2x2 mask
    differences = (1.0**2 + 0.0**2) + (0.5**2 + 0.5**2)  # along rows: (0.5-0)^2, (0.5-1)^2; along columns: 1, 0
    border = 0.3 * 2 * (0.0 + 1.0 + 0.25 + 0.25)  # every value is on two borders of each axis pair
    assert smoothness_loss(mask).item() == pytest.approx((differences + border) / 2)


def test_alternative_images_are_blurred_or_noise_around_grey():
    images = torch.zeros(400, 1, 16, 16)
    images[:, :, 4:12, 4:12] = 1.0
    alternative = alternative_images(images, 0.5, torch.Generator().manual_seed(0))
    blurred = (alternative - alternative.mean((2, 3), keepdim=True)).abs().amax((1, 2, 3)) > 0.3
    assert 0.4 < blurred.float().mean() < 0.6  # about half blurred (structure kept), half noise
    noise = alternative[~blurred]
    assert 0.3 < noise.mean() < 0.7 and 0.04 < noise.std(dim=(1, 2, 3)).mean() < 0.07


def test_loss_terms_by_their_definitions():
    torch.manual_seed(0)
    generator = MaskGenerator(2, num_classes=3, channels=(4, 4, 8, 8))
    model = BlobModel(2, SIDE, CENTRES)
    x = blob_images(2, SIDE, CENTRES)
    settings = explainer_settings("mask_generator")
    terms = mask_generator_losses(generator, model, x, torch.tensor([1, 2]), settings, torch.Generator().manual_seed(0))
    expected = terms["destroyer"] + 8 * terms["area"] + 0.5 * terms["smoothness"] + 0.3 * terms["preserver"]
    torch.testing.assert_close(terms["total"], expected)
    assert terms["destroyer"] >= 0 and terms["preserver"] >= 0 and 0 < terms["area"] < 1.01


@pytest.fixture(scope="module")
def trained():
    """A small mask generator trained for a few seconds to explain BlobModel on blob images."""
    return trained_blob_explainer("mask_generator", SMALL, epochs=12)


def test_a_trained_generator_finds_the_evidence_of_the_target_class(trained):
    model, generator, _ = trained
    x = torch.cat([blob_images(2, SIDE, CENTRES, seed=100 + s) for s in range(2)])  # held-out images
    target = torch.tensor([1, 2, 1, 2])
    maps = explain(model, x, "mask_generator", target=target, explainer=generator)
    assert maps.shape == x.shape and maps.min() >= 0 and maps.max() <= 1
    for i in range(4):
        evidence = blob_mask(2, SIDE, CENTRES[int(target[i]) - 1], 3.0).numpy() > 0
        assert localization_metrics(maps[i, 0].numpy(), evidence)["roc_auc"] > 0.95
    other_class = explain(model, x[:1], "mask_generator", target=2, explainer=generator)
    assert not torch.allclose(other_class, maps[:1], atol=1e-3)  # the class selector changes the mask


def test_training_history_and_card(trained):
    _, generator, card = trained
    assert card.kind == "mask_generator" and card.input_size == (SIDE, SIDE) and card.num_classes == 3
    assert card.settings["channels"] == [8, 8, 16, 16] and card.settings["area_weight"] == 8.0
    assert len(card.history) == card.training["epochs_run"]
    assert {"train_destroyer", "val_preserver", "train_area", "val_smoothness", "val_total"} <= set(card.history[0])
    best = card.training["best_epoch"]
    assert (
        card.metrics["val_loss"] == min(row["val_total"] for row in card.history) == card.history[best - 1]["val_total"]
    )
    assert generator.card is card


def test_checkpoint_round_trip_and_the_classifier_check(trained, tmp_path):
    model, generator, card = trained
    path = save_explainer(generator, tmp_path / "blob.mask_generator.pt", card)
    loaded, read = load_explainer(path)
    assert read == card
    x = blob_images(2, SIDE, CENTRES, seed=7)
    torch.testing.assert_close(
        explain(model, x, "mask_generator", target=[1, 2], explainer=str(path)),
        explain(model, x, "mask_generator", target=[1, 2], explainer=generator),
    )
    other = BlobModel(2, SIDE, CENTRES[::-1])  # other weights (buffers): another classifier
    with pytest.raises(ExplainerMismatch, match="trained for another classifier"):
        explain(other, x, "mask_generator", target=[1, 2], explainer=loaded)
    (tmp_path / "blob.mask_generator.pt").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_explainer(path)


@pytest.mark.parametrize(
    ("explainer", "match"),
    [
        (None, "method 'mask_generator' needs explainer=: a trained mask_generator"),
        (torch.nn.Conv2d(1, 1, 1), "explainer must be a trained mask_generator module"),
        ("no/such/file.pt", "explainer checkpoint not found"),
    ],
)
def test_a_missing_or_foreign_explainer_is_refused(explainer, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        explain(tiny_conv5fc3(2), torch.rand(1, 1, 32, 32), "mask_generator", explainer=explainer)
