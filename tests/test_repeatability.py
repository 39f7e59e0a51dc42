"""Repeatability, reproducibility and label randomization of maps (evaluation/repeatability.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import images_for, tiny_cnn

from monai_sal_app.evaluation.repeatability import label_randomization, map_agreement, permuted_labels
from monai_sal_app.metrics.similarity import similarity
from monai_sal_app.saliency import explain


def reseeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every weight drawn again from ``seed`` (another "training run")."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in other.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return other.eval()


@pytest.fixture
def models_and_images():
    reference = tiny_cnn(2).eval()
    return reference, images_for(2, n=6, side=32, seed=3)


def test_an_identical_model_agrees_and_a_different_one_does_not(models_and_images):
    reference, images = models_and_images
    same = map_agreement({"reference": reference, "copy": copy.deepcopy(reference)}, images, "gradient")
    assert same.verdict == "passes" and same.others == ["copy"]
    np.testing.assert_allclose(same.similarity["ssim"], 1.0)
    assert same.statistic["ssim"] > same.baseline["ssim"]["ci_high"]

    other = reseeded(reference, seed=11)
    result = map_agreement([reference, other], images, "gradient", metrics=("spearman_abs", "ssim"))
    expected = similarity(
        explain(reference, images, "gradient").numpy(),
        explain(other, images, "gradient", target=explain_target(reference, images)).numpy(),
        "spearman_abs",
    )
    np.testing.assert_allclose(result.similarity["spearman_abs"][0], expected)
    assert result.verdict_metric == "spearman_abs" and result.verdict in ("passes", "fails")
    assert result.to_dict()["baseline"]["ssim"]["n_pairs"] == 50


def explain_target(model, images):
    with torch.no_grad():
        return model.eval()(images).argmax(1)


def test_every_model_explains_the_reference_models_class(models_and_images):
    reference, images = models_and_images
    flipped = copy.deepcopy(reference)
    with torch.no_grad():
        flipped[-1].weight.neg_()  # the last layer reversed: other predictions
        flipped[-1].bias.neg_()
    assert not torch.equal(explain_target(reference, images), explain_target(flipped, images))
    result = map_agreement({"reference": reference, "flipped": flipped}, images, "gradient", metrics=("pearson",))
    expected = similarity(
        explain(reference, images, "gradient").numpy(),
        explain(flipped, images, "gradient", target=explain_target(reference, images)).numpy(),
        "pearson",
    )
    np.testing.assert_allclose(result.similarity["pearson"][0], expected)


def test_expect_different_reverses_the_verdict(models_and_images):
    reference, images = models_and_images
    copies = {"reference": reference, "copy": copy.deepcopy(reference)}
    assert map_agreement(copies, images, "gradient", expect="different").verdict == "fails"


def test_label_randomization_retrains_on_a_seeded_permutation(models_and_images):
    reference, images = models_and_images
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    seen = []

    def train_model(permuted):
        seen.append(permuted.clone())
        return reseeded(reference, seed=int(permuted.sum()) + len(seen))

    result = label_randomization(train_model, reference, labels, images, "gradient", seed=4)
    assert result.expect == "different" and result.others == ["label_randomized"]
    assert sorted(seen[0].tolist()) == sorted(labels.tolist()) and not torch.equal(seen[0], labels)
    label_randomization(train_model, reference, labels, images, "gradient", seed=4)
    assert torch.equal(seen[0], seen[1])  # reproducible from the seed


def test_permuted_labels_are_a_seeded_permutation():
    labels = [0, 0, 0, 1, 1, 2, 2, 2]
    permuted = permuted_labels(labels, seed=4)
    assert sorted(permuted.tolist()) == labels and permuted.tolist() != labels
    assert torch.equal(permuted, permuted_labels(labels, seed=4))
    with pytest.raises(ValueError, match="at least two classes"):
        permuted_labels([1, 1, 1])


def test_postprocess_steps_apply_to_every_models_maps(models_and_images):
    reference, images = models_and_images
    models = {"reference": reference, "other": reseeded(reference, seed=11)}
    of_abs = map_agreement(models, images, "gradient", metrics=("spearman_abs",))
    abs_first = map_agreement(models, images, "gradient", metrics=("spearman",), postprocess_steps=("abs",))
    np.testing.assert_allclose(abs_first.similarity["spearman"], of_abs.similarity["spearman_abs"])
    with pytest.raises(ValueError, match="unknown post-processing step 'smooth'"):
        map_agreement(models, images, "gradient", postprocess_steps=("smooth",))


def test_models_are_not_changed(models_and_images):
    reference, images = models_and_images
    reference.train()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    map_agreement([reference, copy.deepcopy(reference)], images, "gradcam")
    assert reference.training and all(torch.equal(before[k], v) for k, v in reference.state_dict().items())


def test_bad_input_gives_clear_errors(models_and_images):
    reference, images = models_and_images
    with pytest.raises(ValueError, match="at least one other"):
        map_agreement([reference], images)
    with pytest.raises(ValueError, match="at least 2 images"):
        map_agreement([reference, reference], images[:1])
    with pytest.raises(ValueError, match="expect"):
        map_agreement([reference, reference], images, expect="same")
    with pytest.raises(ValueError, match="verdict_metric"):
        map_agreement([reference, reference], images, metrics=("ssim",), verdict_metric="pearson")
    with pytest.raises(ValueError, match="two classes"):
        label_randomization(lambda labels: reference, reference, torch.zeros(5), images)
