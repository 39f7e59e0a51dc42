"""Repeatability, reproducibility and label randomization of maps (evaluation/repeatability.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import images_for, predicted_classes, tiny_cnn
from sklearn.metrics import cohen_kappa_score

from monai_sal_app.evaluation.repeatability import (
    comparable_models,
    label_randomization,
    map_agreement,
    permuted_labels,
)
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


def test_an_identical_model_comes_back_and_the_curves_are_the_metrics(models_and_images):
    reference, images = models_and_images
    labels = [0, 1, 2, 0, 1, 2]
    same = map_agreement({"reference": reference, "copy": copy.deepcopy(reference)}, images, "gradient", labels=labels)
    assert same.verdict == "yes" and same.others == ["copy"], same.reason
    assert same.models["copy"]["assessable"] and same.models["copy"]["kappa"] == 1.0
    assert same.retention["ci_low"] == pytest.approx(1.0)
    np.testing.assert_allclose(same.similarity["ssim"], 1.0)

    other = reseeded(reference, seed=11)
    result = map_agreement([reference, other], images, "gradient", metrics=("spearman_abs", "ssim"))
    expected = similarity(
        explain(reference, images, "gradient").numpy(),
        explain(other, images, "gradient", target=predicted_classes(reference, images)).numpy(),
        "spearman_abs",
    )
    np.testing.assert_allclose(result.similarity["spearman_abs"][0], expected)
    assert result.to_dict()["baseline"]["ssim"]["n_pairs"] == 50


def test_models_that_do_not_classify_alike_are_not_assessable(models_and_images):
    _, images = models_and_images
    reference = tiny_cnn(2, num_classes=2).eval()
    probabilities = torch.softmax(reference(images), 1).detach().numpy()
    labels = (probabilities[:, 1] > np.median(probabilities[:, 1])).astype(int)  # the reference's ROC AUC is 1
    no_labels = map_agreement([reference, copy.deepcopy(reference)], images, "gradient")
    assert no_labels.verdict == "not assessable" and "no test ROC AUCs and no true labels" in no_labels.reason
    flipped = copy.deepcopy(reference)
    with torch.no_grad():
        flipped[-1].weight.neg_()
        flipped[-1].bias.neg_()
    result = map_agreement([reference, flipped], images, "gradient", labels=labels)
    assert result.verdict == "not assessable" and "do not classify equally well" in result.reason
    assert result.models["model_1"]["auc_reference"] == 1.0 and result.models["model_1"]["auc"] == 0.0
    by_cards = {"model_0": 0.91, "model_1": 0.84}  # the cards' test ROC AUCs win over the images' labels
    result = map_agreement([reference, copy.deepcopy(reference)], images, "gradient", labels=labels, aucs=by_cards)
    assert result.verdict == "not assessable" and "ROC AUC 0.91 vs 0.84" in result.reason
    close = {"model_0": 0.91, "model_1": 0.89}
    assert map_agreement([reference, copy.deepcopy(reference)], images, "gradient", aucs=close).verdict == "yes"
    swapped = probabilities[:, ::-1].copy()
    swapped[:2] = probabilities[:2]  # agree on two images, disagree on the others
    check = comparable_models(probabilities, swapped, None)
    assert not check["assessable"] and check["alike"].tolist() == [True, True, False, False, False, False]
    assert check["kappa"] == pytest.approx(cohen_kappa_score(probabilities.argmax(1), swapped.argmax(1)))


def test_every_model_explains_the_reference_models_class(models_and_images):
    reference, images = models_and_images
    flipped = copy.deepcopy(reference)
    with torch.no_grad():
        flipped[-1].weight.neg_()  # the last layer reversed: other predictions
        flipped[-1].bias.neg_()
    assert not torch.equal(predicted_classes(reference, images), predicted_classes(flipped, images))
    result = map_agreement({"reference": reference, "flipped": flipped}, images, "gradient", metrics=("pearson",))
    expected = similarity(
        explain(reference, images, "gradient").numpy(),
        explain(flipped, images, "gradient", target=predicted_classes(reference, images)).numpy(),
        "pearson",
    )
    np.testing.assert_allclose(result.similarity["pearson"][0], expected)


def test_label_randomization_is_judged_as_model_randomization(models_and_images):
    reference, _ = models_and_images
    images = images_for(2, n=12, side=32, seed=4)
    copies = {"reference": reference, "copy": copy.deepcopy(reference)}
    same = map_agreement(copies, images, "gradient", target=0, expect="different")
    assert same.verdict == "no" and "draws the same picture" in same.reason
    few = map_agreement(copies, images[:5], "gradient", target=0, expect="different")
    assert few.verdict == "unclear" and "too few images" in few.reason


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
    with pytest.raises(ValueError, match="display"):
        map_agreement([reference, reference], images, display="colour")
    with pytest.raises(ValueError, match="2 labels for 6 images"):
        map_agreement([reference, reference], images, labels=[0, 1])
    with pytest.raises(ValueError, match="two classes"):
        label_randomization(lambda labels: reference, reference, torch.zeros(5), images)
