"""models/train.py: training with early stopping on val AUC, best-epoch restore, determinism, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MeanIntensity, tiny_conv5fc3
from torch import nn

from monai_sal_app.models import evaluate_classifier, train_classifier

DROPOUT = 0.2  # the tiny conv5-fc3's dropout in these runs
HISTORY_FIELDS = {"epoch", "train_loss", "val_auc", "val_balanced_accuracy", "seconds"}


def squares(n: int, seed: int, spatial_dims: int = 2, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images (N, 1, *spatial); label 1 images carry a bright 8-px square (cube) at a random place."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn((n, 1, *(side,) * spatial_dims), generator=generator)
    labels = torch.arange(n) % 2
    for i in torch.nonzero(labels).flatten().tolist():
        corner = torch.randint(0, side - 8, (spatial_dims,), generator=generator).tolist()
        images[(i, 0, *(slice(c, c + 8) for c in corner))] += 1.0
    return images, labels


def test_learns_a_separable_problem_quickly():
    train_x, train_y = squares(96, seed=0)
    val_x, val_y = squares(40, seed=1)
    model, history = train_classifier(
        tiny_conv5fc3(dropout=DROPOUT), train_x, train_y, val_x, val_y,
        epochs=6, batch_size=16, patience=6, progress=False, log=None,
    )  # fmt: skip
    assert not model.training
    assert max(h["val_auc"] for h in history) > 0.9
    assert evaluate_classifier(model, val_x, val_y)["auc"] > 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for epoch, record in enumerate(history, start=1):
        assert set(record) == HISTORY_FIELDS
        assert record["epoch"] == epoch and record["seconds"] > 0
        assert 0.0 <= record["val_balanced_accuracy"] <= 1.0 and math.isfinite(record["train_loss"])


def run_short(seed: int, model_seed: int = 0) -> tuple[nn.Module, list[dict]]:
    train_x, train_y = squares(40, seed=2)
    val_x, val_y = squares(20, seed=3)
    return train_classifier(
        tiny_conv5fc3(seed=model_seed, dropout=DROPOUT), train_x, train_y, val_x, val_y,
        loss="smoothl1norm", augmentations=["noise", "erasing", "croppad", "smoothing"],
        epochs=3, batch_size=8, seed=seed, device="cpu", progress=False, log=None,
    )  # fmt: skip


def test_same_seed_gives_the_same_run_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    model_a, history_a = run_short(seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    model_b, history_b = run_short(seed=5)
    _, history_c = run_short(seed=6)
    for a, b in zip(history_a, history_b, strict=True):
        for key in ("train_loss", "val_auc", "val_balanced_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert [h["train_loss"] for h in history_c] != pytest.approx([h["train_loss"] for h in history_a])


def test_early_stopping_stops_after_patience_epochs_without_gain():
    train_x, train_y = squares(16, seed=0)
    val_x, val_y = squares(16, seed=1)
    messages: list[str] = []
    torch.manual_seed(0)
    _, history = train_classifier(
        MeanIntensity(), train_x, train_y, val_x, val_y,
        epochs=20, lr=0.0, weight_decay=0.0, patience=3, progress=False, log=messages.append,
    )  # fmt: skip
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert len({h["val_auc"] for h in history}) == 1  # lr=0: nothing changes, so nothing improves
    assert any("early stopping at epoch 4" in m for m in messages)
    assert any("restored epoch 1" in m for m in messages)


def test_best_epoch_weights_are_restored():
    # Validation labels are the opposite of the training labels: the better the network learns,
    # the lower its val AUC, so the best epoch is an early one, not the last.
    train_x, train_y = squares(64, seed=0)
    val_x, val_y = squares(32, seed=1)
    model, history = train_classifier(
        tiny_conv5fc3(dropout=DROPOUT), train_x, train_y, val_x, 1 - val_y,
        epochs=5, batch_size=16, patience=10, progress=False, log=None,
    )  # fmt: skip
    aucs = [h["val_auc"] for h in history]
    assert len(history) == 5 and aucs[-1] < max(aucs)
    assert evaluate_classifier(model, val_x, 1 - val_y)["auc"] == pytest.approx(max(aucs), abs=1e-9)


def test_single_class_validation_reports_nan_and_still_trains():
    train_x, train_y = squares(16, seed=0)
    val_x, _ = squares(8, seed=1)
    val_y = torch.zeros(8, dtype=torch.long)
    model, history = train_classifier(
        tiny_conv5fc3(dropout=DROPOUT), train_x, train_y, val_x, val_y,
        epochs=4, batch_size=8, patience=2, progress=False, log=None,
    )  # fmt: skip
    assert all(math.isnan(h["val_auc"]) for h in history)
    assert len(history) == 3  # no AUC ever counts as a gain: stops after `patience` epochs
    assert not model.training


def test_trains_3d_with_augmentations_and_progress_bar(capsys):
    train_x, train_y = squares(8, seed=0, spatial_dims=3, side=16)
    val_x, val_y = squares(4, seed=1, spatial_dims=3, side=16)
    _model, history = train_classifier(
        tiny_conv5fc3(spatial_dims=3, dropout=DROPOUT), train_x, train_y, val_x, val_y,
        augmentations=["croppad", "erasing", "smoothing", "noise"], loss="msenorm",
        epochs=1, batch_size=3, progress=True, log=print,
    )  # fmt: skip
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    captured = capsys.readouterr()
    assert "restored epoch 1" in captured.out
    assert "val_auc" in captured.err  # tqdm postfix


def test_evaluate_classifier_matches_hand_computed_metrics():
    model = MeanIntensity()
    with torch.no_grad():
        model.linear.weight.fill_(1.0)
        model.linear.bias.fill_(-0.5)
    means = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.6, 0.4])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    x = means[:, None, None, None].expand(6, 1, 4, 4).contiguous()
    model.train()
    metrics = evaluate_classifier(model, x, labels, batch_size=4)
    assert model.training  # mode restored
    # Class-1 probability is increasing in the mean: AUC is the share of (positive, negative) pairs in order.
    pairs = [(p, n) for p in means[labels == 1] for n in means[labels == 0]]
    assert metrics["auc"] == pytest.approx(sum(float(p > n) for p, n in pairs) / len(pairs))
    predicted = (means > 0.5).long()  # logit 1 = mean - 0.5 > 0
    recall = [float((predicted[labels == c] == c).float().mean()) for c in (0, 1)]
    assert metrics["balanced_accuracy"] == pytest.approx(sum(recall) / 2)
    assert metrics["accuracy"] == pytest.approx(float((predicted == labels).float().mean()))


def test_evaluate_classifier_multiclass_auc():
    model = tiny_conv5fc3(num_classes=3)
    x, _ = squares(9, seed=0)
    metrics = evaluate_classifier(model, x, torch.arange(9) % 3)
    assert 0.0 <= metrics["auc"] <= 1.0
    assert math.isnan(evaluate_classifier(model, x, torch.arange(9) % 2)["auc"])  # class 2 absent


def test_train_rejects_bad_input():
    x, y = squares(8, seed=0)
    model = tiny_conv5fc3(dropout=DROPOUT)
    with pytest.raises(ValueError, match="8 images for 7 labels"):
        train_classifier(model, x, y[:7], x, y, progress=False)
    with pytest.raises(TypeError, match="train_x"):
        train_classifier(model, x.long(), y, x, y, progress=False)
    with pytest.raises(TypeError, match="val_y"):
        train_classifier(model, x, y, x, y.float(), progress=False)
    with pytest.raises(ValueError, match="differ in shape"):
        train_classifier(model, x, y, x[..., :16], y, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(model, x, y, x, y, epochs=0, progress=False)
    with pytest.raises(ValueError, match="unknown loss"):
        train_classifier(model, x, y, x, y, loss="hinge", progress=False)
    with pytest.raises(ValueError, match="unknown augmentation"):
        train_classifier(model, x, y, x, y, augmentations=["rotate"], progress=False)
