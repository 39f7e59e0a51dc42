"""The similarity-adversarial explainer: its network, loss terms and test-time averaging on hand-made
tensors, training against a classifier whose evidence is known, and the method."""

from __future__ import annotations

import pytest
import torch
from conftest import BLOB_CENTRES, BLOB_SIDE, BlobModel, blob_images, blob_mask, trained_blob_explainer

from monai_sal_app.explainers import explainer_settings, load_explainer, save_explainer
from monai_sal_app.explainers.similarity_adversarial import (
    SimilarityAdversarialGenerator,
    explanation_map,
    minmax_images,
    other_class,
    similarity_adversarial_losses,
    total_variation,
)
from monai_sal_app.metrics.localization import localization_metrics
from monai_sal_app.saliency import explain

SIDE, CENTRES = BLOB_SIDE, BLOB_CENTRES


def test_outputs_are_two_images_in_0_1_on_the_input_grid(dims):
    side = 32 if dims == 2 else 16
    torch.manual_seed(0)
    generator = SimilarityAdversarialGenerator(dims, channels=(4, 8, 8)).eval()
    similar, adversarial = generator(torch.rand(2, 1, *[side] * dims))
    assert similar.shape == adversarial.shape == (2, 1, *[side] * dims)
    assert similar.min() >= 0 and similar.max() <= 1 and adversarial.min() >= 0 and adversarial.max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        generator(torch.rand(1, 1, *[side + 2] * dims))


def test_other_class_and_total_variation_by_hand():
    logits = torch.tensor([[1.0, 4.0, 2.5], [3.0, -1.0, 0.0]])
    assert other_class(logits, torch.tensor([1, 0])).tolist() == [2, 2]
    maps = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]])
    # rows: |0.5 - 0|, |0.5 - 1| -> mean 0.5; columns: |1 - 0|, |0.5 - 0.5| -> mean 0.5
    assert total_variation(maps).item() == pytest.approx(1.0)


def test_loss_terms_by_their_definitions():
    torch.manual_seed(0)
    generator = SimilarityAdversarialGenerator(2, channels=(4, 8, 8))
    model = BlobModel(2, SIDE, CENTRES)
    x = blob_images(2, SIDE, CENTRES)
    settings = explainer_settings("similarity_adversarial", {"similarity_weight": 3.0})
    terms = similarity_adversarial_losses(generator, model, x, torch.tensor([1, 2]), settings, torch.Generator())
    similar, adversarial = generator(x)
    normalised = minmax_images(x)
    similarity = sum((i - normalised).abs().mean() + (i - normalised).pow(2).mean() for i in (similar, adversarial))
    torch.testing.assert_close(terms["similarity"], similarity)
    torch.testing.assert_close(terms["tv"], total_variation(similar - adversarial))
    expected = terms["adversarial"] + terms["same_class"] + 3.0 * terms["similarity"] + terms["tv"]
    torch.testing.assert_close(terms["total"], expected)
    flipped = (model(adversarial).argmax(dim=1) != torch.tensor([1, 2])).float().mean()
    assert terms["flip_rate"].item() == flipped.item() and not terms["flip_rate"].requires_grad


@pytest.mark.parametrize("axis", [-1, -2])
def test_test_time_averaging_commutes_with_flips_and_rotations(dims, axis):
    """The average over the dihedral group and its inverses is equivariant under the group."""
    side = 32 if dims == 2 else 16
    torch.manual_seed(0)
    generator = SimilarityAdversarialGenerator(dims, channels=(4, 8, 8)).eval()
    x = torch.rand(1, 1, *[side] * dims)
    with torch.no_grad():
        averaged = explanation_map(generator, x, tta=True)
        torch.testing.assert_close(explanation_map(generator, x.flip(axis), tta=True), averaged.flip(axis))
        rotated = torch.rot90(x, 1, (-2, -1))
        torch.testing.assert_close(explanation_map(generator, rotated, tta=True), torch.rot90(averaged, 1, (-2, -1)))
        assert not torch.allclose(explanation_map(generator, x), averaged)


@pytest.fixture(scope="module")
def trained():
    """A small similarity-adversarial generator trained for a few seconds against BlobModel."""
    return trained_blob_explainer("similarity_adversarial", {"channels": [8, 16, 32]}, epochs=15)


def test_a_trained_generator_flips_the_decision_and_shows_the_evidence(trained):
    model, generator, _ = trained
    x = torch.cat([blob_images(2, SIDE, CENTRES, seed=100 + s) for s in range(3)])  # held-out images
    with torch.no_grad():
        predicted = model(minmax_images(x)).argmax(1)
        similar, adversarial = generator(x)
        flip_rate = (model(adversarial).argmax(1) != predicted).float().mean().item()
        kept = (model(similar).argmax(1) == predicted).float().mean().item()
    assert flip_rate >= 0.9 and kept >= 0.9
    for tta in (False, True):
        maps = explain(model, x, "similarity_adversarial", explainer=generator, tta=tta)
        assert maps.shape == x.shape and maps.min() >= 0
        for i in range(len(x)):
            evidence = blob_mask(2, SIDE, CENTRES[int(predicted[i]) - 1], 3.0).numpy() > 0
            assert localization_metrics(maps[i, 0].numpy(), evidence)["roc_auc"] > 0.95


@pytest.mark.parametrize("tta", ["maybe", 1, None])
def test_tta_must_be_a_bool(trained, tta):
    model, generator, _ = trained
    with pytest.raises(TypeError, match=f"tta must be a bool, got {tta!r}"):
        explain(model, blob_images(2, SIDE, CENTRES, seed=5), "similarity_adversarial", explainer=generator, tta=tta)


def test_checkpoint_round_trip(trained, tmp_path):
    model, generator, card = trained
    path = save_explainer(generator, tmp_path / "blob.similarity_adversarial.pt", card)
    loaded, read = load_explainer(path)
    assert read == card and read.kind == "similarity_adversarial" and loaded.card == card
    x = blob_images(2, SIDE, CENTRES, seed=5)
    torch.testing.assert_close(
        explain(model, x, "similarity_adversarial", explainer=str(path)),
        explain(model, x, "similarity_adversarial", explainer=generator),
    )
