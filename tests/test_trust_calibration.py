"""The trust card's rules on cases whose answers are known (docs/METHODS.md#how-the-trust-card-judges).

Each case is small enough for the test suite and states the answer it must give; the thresholds
(``randomization.RETENTION_CUT`` and the CI rules) were chosen on them:

- a hand-built model whose evidence is a known region: its gradient tracks what it uses, and
  localizes the findings beyond where they usually are;
- an image-only "method" (an edge filter of the input, registered for these tests): it does not
  depend on what the model learned;
- a model with random weights: its gradient is not said to track what it uses;
- a deep residual network trained on blobs: the gradient depends on what it learned, guided
  backprop does not (Adebayo et al. 2018);
- the demo's conv5-fc3 model on Shepp-Logan phantoms: the gradient depends on what it learned.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HandWritten, blob_mask, tiny_conv5fc3, trained_small_resnet
from torch import nn

from monai_sal_app.evaluation import trust_card
from monai_sal_app.metrics.localization import mean_mask_baseline
from monai_sal_app.saliency import core

SIDE = 64


# ----------------------------------------------------------------------------- known evidence region


class EvidenceRegionModel(HandWritten):
    """2D, :data:`SIDE` px. Class 1's logit is 100 x the mean over a known region (a centred disk of
    radius 16) of the bright part of the image, ReLU(x - 0.5); class 0's logit is 0.5. Its only
    evidence: bright spots inside the region."""

    def __init__(self):
        super().__init__(2)
        self.register_buffer("region", blob_mask(2, SIDE, (SIDE / 2, SIDE / 2), 16.0))

    def forward(self, x):
        evidence = (F.relu(x[:, 0] - 0.5) * self.region).flatten(1).sum(1) / self.region.sum()
        return torch.stack([torch.full_like(evidence, 0.5), 100 * evidence], 1)


def spots(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """n images (n, 1, SIDE, SIDE) of noise in [0, 0.2) with a bright (1.0) disk of radius 3 at a
    random place within 10 px of the centre, and the disks' masks (n, SIDE, SIDE)."""
    centres = SIDE / 2 + rng.uniform(-7, 7, size=(n, 2))
    masks = torch.stack([blob_mask(2, SIDE, tuple(c), 3.0) for c in centres])
    noise = 0.2 * torch.from_numpy(rng.random((n, SIDE, SIDE))).float()
    return torch.maximum(noise, masks)[:, None], masks.numpy() > 0.5


def test_a_model_with_a_known_evidence_region_is_tracked_and_localized():
    rng = np.random.default_rng(0)
    _, train_masks = spots(64, rng)
    images, masks = spots(12, rng)
    model = EvidenceRegionModel()
    card = trust_card(
        model, images, masks=list(masks), mask_prior=mean_mask_baseline(train_masks), methods=["gradient"],
        checks=["fidelity", "localization"],
    )  # fmt: skip
    entry = card["methods"]["gradient"]
    assert entry["verdicts"] == {"fidelity": "yes", "localization": "yes"}, entry["checks"]
    assert entry["fidelity"]["order_by"] == "signed" and entry["fidelity"]["replaced_as_target"] == 0.0
    assert card["settings"]["localization_reference"] == "mean training mask"
    assert entry["localization"]["roc_auc_gain"]["ci_low"] > 0


def test_without_training_masks_localization_is_judged_against_chance():
    rng = np.random.default_rng(1)
    images, masks = spots(8, rng)
    card = trust_card(
        EvidenceRegionModel(), images, masks=list(masks[:, None]), methods=["gradient"], checks=["localization"]
    )
    check = card["methods"]["gradient"]["checks"]["localization"]
    assert check["answer"] == "yes" and check["question"] == "Localizes better than chance"
    assert card["settings"]["localization_reference"] == "chance"


# ----------------------------------------------------------------------------- an image-only method


@pytest.fixture
def edge_filter(monkeypatch):
    """A "method" that ignores the model: the Sobel gradient magnitude of the image, registered
    under ``edge_filter`` for one test (the registry entry is removed afterwards)."""

    def edges(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kernel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
        gx = F.conv2d(images[:, :1], kernel.view(1, 1, 3, 3), padding=1)
        gy = F.conv2d(images[:, :1], kernel.t().reshape(1, 1, 3, 3), padding=1)
        return torch.sqrt(gx**2 + gy**2)

    monkeypatch.setitem(core._REGISTRY, "edge_filter", core.MethodSpec("edge_filter", edges))
    return "edge_filter"


def test_an_image_only_method_does_not_depend_on_what_the_model_learned(edge_filter):
    images, _ = spots(8, np.random.default_rng(2))
    card = trust_card(tiny_conv5fc3(2), images, methods=[edge_filter], checks=["randomization"], targets=[0] * 8)
    randomization = card["methods"][edge_filter]["randomization"]
    assert randomization["verdict"] == "no", randomization["reason"]
    assert randomization["retention"]["ci_low"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- random weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_model_with_random_weights_is_not_said_to_be_tracked(seed):
    images, _ = spots(12, np.random.default_rng(3))
    card = trust_card(tiny_conv5fc3(2, seed=seed), images, methods=["gradient"], checks=["fidelity"])
    assert card["methods"]["gradient"]["verdicts"]["fidelity"] != "yes", card["methods"]["gradient"]["checks"]


# ----------------------------------------------------------------------------- a deep residual network on blobs


def blobs_left_or_right(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 1, SIDE, SIDE): faint noise, five dim distractor disks anywhere and one bright
    disk, in the left third (class 0) or the right third (class 1), alternately."""
    images, labels = [], []
    for i in range(n):
        image = 0.05 * torch.from_numpy(rng.random((SIDE, SIDE))).float()
        for _ in range(5):
            image = torch.maximum(image, 0.5 * blob_mask(2, SIDE, tuple(rng.uniform(6, 58, 2)), rng.uniform(2, 5)))
        y, x = rng.uniform(10, 54), rng.uniform(10, 26) if i % 2 == 0 else rng.uniform(38, 54)
        images.append(torch.maximum(image, blob_mask(2, SIDE, (y, x), rng.uniform(3, 6))))
        labels.append(i % 2)
    return torch.stack(images)[:, None], torch.tensor(labels)


@pytest.fixture(scope="module")
def resnet_on_blobs():
    """MONAI's ResNet18 (widths 16-32-64-128, stride-2 first convolution, no max pool) trained for
    10 epochs on 200 blob images; 24 test images."""
    rng = np.random.default_rng(0)
    train, val = blobs_left_or_right(200, rng), blobs_left_or_right(40, rng)
    test_x, _ = blobs_left_or_right(24, rng)
    return trained_small_resnet([16, 32, 64, 128], 2, train, val, epochs=10, seed=0), test_x


@pytest.mark.slow  # trains a ResNet18 for 10 epochs on 200 images
def test_a_deep_resnet_on_blobs_gradient_depends_on_the_model_guided_backprop_does_not(resnet_on_blobs):
    model, images = resnet_on_blobs
    card = trust_card(model, images, methods=["gradient", "guided_backprop"], checks=["randomization"])
    gradient, guided = (card["methods"][m]["randomization"] for m in ("gradient", "guided_backprop"))
    assert gradient["verdict"] == "yes", gradient["reason"]
    assert guided["verdict"] == "no", guided["reason"]
    assert guided["retention"]["per_state"][0] > 0.8  # blind to the logit layer, as Adebayo et al. saw
    assert card["settings"]["batch_norm_statistics"] == "kept as trained"


# ----------------------------------------------------------------------------- the demo's model


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The demo's conv5-fc3 trained as ``monai-sal demo`` trains it (``train_from_manifest`` on
    64 px Shepp-Logan phantoms, control vs patient), on fewer images and epochs; 16 test patients."""
    from monai_sal_app.data.manifest import read_manifest
    from monai_sal_app.data.shepp_logan import generate_shepp_logan
    from monai_sal_app.models.inputs import load_inputs
    from monai_sal_app.models.manifest_training import train_from_manifest

    folder = tmp_path_factory.mktemp("demo")
    train = generate_shepp_logan(folder / "train", "homogeneous", 2, 64, 80, 0, False)
    test = generate_shepp_logan(folder / "test", "test", 2, 64, 16, 1, False)
    model, card = train_from_manifest(
        train, folder / "model.pt", epochs=10, patience=10, labels=("control", "patient"), seed=0, device="cpu",
        progress=False, log=lambda message: None,
    )  # fmt: skip
    assert card.metrics["val_auc"] > 0.9
    patients = [item for item in read_manifest(test) if item.get("mask")][:16]
    images, _ = load_inputs(patients, progress=False)
    return model, images


def test_the_demo_model_gradient_depends_on_what_it_learned(demo_model):
    model, images = demo_model
    card = trust_card(model, images, methods=["gradient"], checks=["randomization"], targets=[1] * len(images))
    randomization = card["methods"]["gradient"]["randomization"]
    assert randomization["verdict"] == "yes", randomization["reason"]
