"""Fidelity (MIF/LIF perturbation curves): equal to the definition written as a plain loop, positive
for a map of the true evidence and about zero for a random one, independent of the chunk size, no
trace on the model or the input, and clear errors for bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import FailsOnCall, TopLeftEvidence, images_for, predicted_classes, tiny_cnn, tiny_resnet
from scipy import ndimage
from scipy.integrate import trapezoid
from test_no_trace import Snapshot, unsettled
from torch import nn

from monai_sal_app.evaluation import fidelity as fidelity_module
from monai_sal_app.evaluation.fidelity import BLUR_SIGMA, fidelity, noisy_linear_imputation
from monai_sal_app.saliency import explain

SIDE = {2: 12, 3: 8}  # small images: the reference loop makes one forward pass per copy


def quantised_maps(n: int, spatial: tuple[int, ...], seed: int) -> np.ndarray:
    """(n, 1, *spatial) signed maps on a grid of 0.5, so that the ranking has many ties."""
    return np.round(np.random.default_rng(seed).normal(size=(n, 1, *spatial)) * 2) / 2


def loop_reference(model, images, maps, fractions, baseline, score, order_by, target=None, labels=None, seed=0):
    """The definition written plainly, one image, order and fraction at a time: numpy ranking (ties
    by ``default_rng(seed).permutation(P)``), scipy blur, one forward pass per copy, scipy's
    trapezoid; for ``road``, the ROAD authors' imputation (pytorch-grad-cam's ``NoisyLinearImputer``,
    2D, without its noise) of every copy. Returns (mif, lif, fidelity, accuracy_mif, accuracy_lif)."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    model = copy.deepcopy(model).eval()
    x = images.numpy()
    spatial = x.shape[2:]
    positions = math.prod(spatial)
    tie_rank = np.empty(positions, dtype=np.int64)
    tie_rank[np.random.default_rng(seed).permutation(positions)] = np.arange(positions)

    def logits_of(image: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(image[None]).float())[0].double().numpy()

    curves = np.zeros((len(x), 2, len(fractions)))
    still_reference = np.zeros((len(x), 2, len(fractions)))
    for i, image in enumerate(x):
        key = np.abs(maps[i, 0]).ravel() if order_by == "abs" else maps[i, 0].ravel()
        orders = [np.lexsort((tie_rank, -key)), np.lexsort((tie_rank, key))]
        if baseline == "zero":
            fill = np.zeros_like(image)
        elif baseline == "mean":
            fill = np.broadcast_to(image.mean(axis=tuple(range(1, image.ndim)), keepdims=True), image.shape)
        elif baseline == "blur":
            fill = np.stack([ndimage.gaussian_filter(c, BLUR_SIGMA, mode="nearest", truncate=4.0) for c in image])
        unperturbed = logits_of(image)
        t = int(np.argmax(unperturbed)) if target is None else target[i]
        reference_class = int(np.argmax(unperturbed)) if labels is None else labels[i]
        for o, order in enumerate(orders):
            for j, fraction in enumerate(fractions):
                chosen = order[: int(np.rint(fraction * positions))]
                if baseline == "road":
                    keep = np.ones(positions, dtype=np.float32)
                    keep[chosen] = 0
                    imputer = NoisyLinearImputer(noise=0.0)
                    fill = imputer(torch.from_numpy(image), torch.from_numpy(keep.reshape(spatial))).numpy()
                perturbed = image.reshape(len(image), positions).copy()
                perturbed[:, chosen] = fill.reshape(len(image), positions)[:, chosen]
                logits = logits_of(perturbed.reshape(image.shape))
                still_reference[i, o, j] = np.argmax(logits) == reference_class
                others = np.delete(logits, t).max() if len(logits) > 1 else np.nan
                margin = unperturbed[t] - np.delete(unperturbed, t).max()
                if score == "margin":
                    curves[i, o, j] = np.clip((logits[t] - others) / margin, 0, 1) if margin > 0 else np.nan
                elif score == "logit_ratio":
                    curves[i, o, j] = logits[t] / unperturbed[t]
                elif score == "probability":
                    curves[i, o, j] = np.exp(logits[t]) / np.exp(logits).sum()
                else:
                    curves[i, o, j] = still_reference[i, o, j]
    per_image = trapezoid(curves[:, 1], fractions, axis=1) - trapezoid(curves[:, 0], fractions, axis=1)
    return curves[:, 0], curves[:, 1], per_image, still_reference[:, 0].mean(0), still_reference[:, 1].mean(0)


def assert_matches(result, reference, tolerance: float = 1e-6) -> None:
    mif, lif, per_image, accuracy_mif, accuracy_lif = reference
    np.testing.assert_allclose(result.mif, mif, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(result.lif, lif, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(result.fidelity, per_image, rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(result.accuracy_mif, accuracy_mif)
    np.testing.assert_array_equal(result.accuracy_lif, accuracy_lif)


@pytest.mark.parametrize("baseline", ["zero", "mean", "blur"])
@pytest.mark.parametrize("score", ["margin", "logit_ratio", "probability", "accuracy"])
def test_equals_a_plain_loop_over_images_and_fractions(dims, score, baseline):
    """Two input channels (so the per-channel mean matters), maps with ties, both orderings."""
    model = tiny_cnn(dims, in_channels=2)
    x = images_for(dims, n=3, channels=2, side=SIDE[dims])
    maps = quantised_maps(3, x.shape[2:], seed=dims)
    fractions = np.arange(0, 1.0, 0.05)
    for order_by in ("abs", "signed"):
        result = fidelity(model, x, maps=maps, baseline=baseline, score=score, order_by=order_by, batch_size=7)
        assert_matches(result, loop_reference(model, x, maps, fractions, baseline, score, order_by))
        assert result.mean == pytest.approx(result.fidelity.mean())
        if score == "logit_ratio":
            np.testing.assert_array_equal(result.mif[:, 0], 1.0)  # fraction 0 is the unperturbed image itself


@pytest.mark.parametrize("score", ["margin", "probability"])
def test_road_equals_the_authors_imputation_in_a_plain_loop(monkeypatch, score):
    """ROAD (Rong et al. 2022) without its noise: every copy imputed by the authors' own code."""
    monkeypatch.setattr(fidelity_module, "ROAD_NOISE", 0.0)
    model = tiny_cnn(2, in_channels=2)
    x = images_for(2, n=3, channels=2, side=SIDE[2])
    maps = quantised_maps(3, x.shape[2:], seed=7)
    fractions = np.arange(0, 1.0, 0.05)
    for order_by in ("abs", "signed"):
        result = fidelity(model, x, maps=maps, baseline="road", score=score, order_by=order_by, batch_size=11)
        assert_matches(result, loop_reference(model, x, maps, fractions, "road", score, order_by), tolerance=1e-5)


def test_the_imputation_solves_the_authors_system_and_keeps_linear_ramps():
    """2D: the ROAD authors' sparse direct solve (pytorch-grad-cam), for scattered and solid holes;
    3D: a linear ramp is harmonic for any symmetric neighbour weights, so a hole inside it is filled
    with the ramp itself; kept positions are never changed."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((3, 2, 24, 20))).float()
    holes = torch.from_numpy(rng.random((3, 24, 20)) < np.array([0.1, 0.6, 0.97])[:, None, None])
    holes[0, 4:20, 3:17] = True  # a solid hole
    ours = noisy_linear_imputation(images, holes)
    for k in range(3):
        theirs = NoisyLinearImputer(noise=0.0)(images[k], (~holes[k]).float())
        torch.testing.assert_close(ours[k], theirs, rtol=0, atol=1e-4)
    grid = torch.stack(torch.meshgrid(*[torch.arange(10.0)] * 3, indexing="ij"))
    ramp = (0.3 * grid[0] - 0.2 * grid[1] + 0.1 * grid[2])[None, None]
    hole = torch.zeros((1, 10, 10, 10), dtype=torch.bool)
    hole[0, 2:8, 3:7, 2:9] = True
    torch.testing.assert_close(noisy_linear_imputation(ramp, hole), ramp, rtol=0, atol=1e-4)


def test_margin_ignores_a_shift_of_every_logit_and_skips_images_not_predicted_as_the_target():
    model, x = tiny_cnn(2), images_for(2, n=4, side=SIDE[2])
    maps = quantised_maps(4, x.shape[2:], seed=1)
    shifted = nn.Sequential(model, Shift(7.0))
    first, again = (fidelity(m, x, maps=maps) for m in (model, shifted))
    assert first.score == "margin"
    np.testing.assert_allclose(again.mif, first.mif, atol=1e-6)
    assert np.nanmax(first.mif) <= 1 and np.nanmin(first.mif) >= 0
    predicted = predicted_classes(model, x)
    other = (predicted + 1) % 3
    result = fidelity(model, x, maps=maps, target=other)
    assert result.n_scored == 0 and np.isnan(result.fidelity).all()
    assert np.isnan(result.mean) and result.replaced_as_target in (0.0, 0.25, 0.5, 0.75, 1.0)


class Shift(nn.Module):
    """Adds one constant to every logit."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, logits):
        return logits + self.value


def test_equals_a_plain_loop_with_given_target_labels_fractions_and_seed():
    model = tiny_cnn(2)
    x = images_for(2, n=4, side=SIDE[2])
    maps = quantised_maps(4, x.shape[2:], seed=5)
    target, labels, fractions = [2, 0, 1, 1], [0, 1, 2, 0], [0.1, 0.25, 0.5, 0.7]
    for score in ("probability", "accuracy"):
        result = fidelity(
            model, x, maps=maps, target=target, labels=labels, fractions=fractions, score=score, seed=3, batch_size=5
        )
        assert_matches(
            result,
            loop_reference(model, x, maps, fractions, "zero", score, "abs", target=target, labels=labels, seed=3),
        )
    # The seed only breaks ties: another seed changes the curves of maps full of ties.
    other_seed = fidelity(model, x, maps=maps, target=target, fractions=fractions, score="probability", seed=4)
    assert not np.allclose(other_seed.mif, result.mif)


def test_true_evidence_scores_clearly_positive_and_a_random_map_about_zero():
    """TopLeftEvidence's class-1 logit is 4 x the mean of the top-left 8x8 block (64 of 1024 pixels),
    the rest of the image is ignored. Its gradient marks exactly that block."""
    model = TopLeftEvidence()
    x = images_for(2, n=30, seed=2)
    evidence = fidelity(model, x, method="gradient")
    assert evidence.method == "gradient"
    assert evidence.ci_low > 0.85  # MIF reaches 0 at 10 %, LIF stays 1 until 94 % (of at most 0.95)
    np.testing.assert_array_equal(evidence.accuracy_lif, 1.0)
    assert evidence.accuracy_mif[2:].max() == 0.0  # from 10 % on, class 1 is never predicted any more
    difference = trapezoid(evidence.accuracy_lif - evidence.accuracy_mif, evidence.fractions)
    assert evidence.accuracy_fidelity == pytest.approx(difference) and evidence.accuracy_fidelity > 0.85
    assert evidence.replaced_as_target == 0.0  # an all-zero image holds no evidence for class 1

    random_maps = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    random = fidelity(model, x, maps=random_maps)
    assert random.method == "given"
    # About zero: over eight seeds the mean lies within +-0.034, each interval about +-0.03 wide.
    assert abs(random.mean) < 0.05 and random.ci_high - random.ci_low < 0.1

    anti_evidence = fidelity(model, x, maps=-explain(model, x, "gradient"), order_by="signed")
    assert anti_evidence.ci_high < -0.85  # the evidence ranked last: fidelity turns negative

    constant = fidelity(model, x, maps=torch.ones(x.shape))
    np.testing.assert_array_equal(constant.mif, constant.lif)  # ties broken alike in both orders
    assert constant.mean == 0.0


class RowCounter(nn.Module):
    """Wraps a model and records the number of rows of every forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("baseline", ["blur", "road"])
def test_chunk_size_does_not_change_the_result(dims, baseline):
    x = images_for(dims, n=3, side=SIDE[dims])
    maps = quantised_maps(3, x.shape[2:], seed=0)
    perturbed_rows = 3 * 2 * 19  # fractions 0.05 .. 0.95 in both orders; fraction 0 is the unperturbed pass
    results = {}
    for batch_size in (1, 3, None):
        model = RowCounter(tiny_cnn(dims))
        results[batch_size] = fidelity(model, x, maps=maps, baseline=baseline, batch_size=batch_size)
        if batch_size is None:  # tiny inputs: auto_batch_size puts all perturbed copies into one pass
            assert model.rows[-1] == perturbed_rows
        else:  # the unperturbed and the fully replaced images, then the copies
            assert sum(model.rows) == 6 + perturbed_rows and max(model.rows) <= batch_size
    zero = RowCounter(tiny_cnn(dims))
    fidelity(zero, x, maps=maps, batch_size=3)
    assert zero.rows[:2] == [3, 1]  # one all-zero image stands for every fully replaced one
    # Equal up to float32 rounding: a convolution's sums may run in another order for another batch size.
    for batch_size in (1, 3):
        for name in ("mif", "lif", "fidelity"):
            np.testing.assert_allclose(
                getattr(results[batch_size], name), getattr(results[None], name), rtol=1e-6, atol=1e-7
            )
        np.testing.assert_array_equal(results[batch_size].accuracy_mif, results[None].accuracy_mif)
        np.testing.assert_array_equal(results[batch_size].accuracy_lif, results[None].accuracy_lif)


def test_result_shapes_and_json(dims):
    x = images_for(dims, n=1, side=SIDE[dims])
    result = fidelity(tiny_cnn(dims), x, fractions=[0, 0.3, 0.6], score="probability", baseline="mean")
    assert result.mif.shape == result.lif.shape == (1, 3) and result.fidelity.shape == (1,)
    assert result.accuracy_mif.shape == result.accuracy_lif.shape == (3,)
    assert (result.score, result.baseline, result.order_by) == ("probability", "mean", "abs")
    assert result.seconds_per_image > 0
    as_dict = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert as_dict["ci_low"] is None and as_dict["ci_high"] is None  # one image: no interval
    assert as_dict["fractions"] == [0, 0.3, 0.6] and len(as_dict["mif"][0]) == 3


def test_no_trace_on_the_model_or_the_input():
    """An unsettled model (mixed modes, a frozen parameter, a gradient) and an input that requires
    grad and holds a .grad, called under no_grad with a 3D network; and a 2D network with the maps
    computed inside."""
    model = unsettled(tiny_resnet(3))
    x = images_for(3, n=2)
    x.requires_grad_(True)
    x.grad = torch.full_like(x, 0.25)
    with torch.no_grad():
        snapshot = Snapshot(model, x)
        fidelity(model, x, target=[1, 0], score="probability", baseline="blur", batch_size=4)
        snapshot.assert_no_trace()

    model, x = unsettled(tiny_cnn(2)), images_for(2, n=2, side=SIDE[2])
    snapshot = Snapshot(model, x)
    fidelity(model, x, method="smoothgrad", params={"n_samples": 2}, baseline="mean")
    snapshot.assert_no_trace()


def test_no_trace_after_a_failure_in_the_last_pass():
    x = images_for(2, n=2, side=SIDE[2])
    maps = quantised_maps(2, x.shape[2:], seed=0)
    counting = FailsOnCall(fail_at=None)
    fidelity(counting, x, maps=maps, score="probability", batch_size=8)
    model = unsettled(FailsOnCall(fail_at=counting.calls))
    snapshot = Snapshot(model, x)
    with pytest.raises(RuntimeError, match="boom"):
        fidelity(model, x, maps=maps, score="probability", batch_size=8)
    assert model.calls == counting.calls > 2  # several perturbed passes succeeded before the last failed
    snapshot.assert_no_trace()


X2 = images_for(2, n=2, side=12)
BAD_INPUT = {
    "3d images for a 2d model": (dict(images=images_for(3, n=2, side=8)), "takes 2D images"),
    "maps without the channel axis": (dict(maps=torch.rand(2, 12, 12)), r"maps must have shape \(2, 1, 12, 12\)"),
    "maps on another grid": (dict(maps=torch.rand(2, 1, 8, 8)), "maps must have shape"),
    "maps with NaN": (dict(maps=torch.full((2, 1, 12, 12), math.nan)), "NaN"),
    "fraction 1": (dict(fractions=[0, 0.5, 1.0]), r"\[0, 1\)"),
    "negative fraction": (dict(fractions=[-0.1, 0.5]), r"\[0, 1\)"),
    "decreasing fractions": (dict(fractions=[0.5, 0.2]), "strictly increasing"),
    "one fraction": (dict(fractions=[0.5]), "at least two"),
    "unknown baseline": (dict(baseline="noise"), "unknown baseline 'noise'; choose one of zero, mean, blur, road"),
    "unknown score": (dict(score="logit"), "unknown score 'logit'"),
    "unknown order": (dict(order_by="positive"), "unknown order_by 'positive'"),
    "unknown method": (dict(method="nope"), "unknown saliency method 'nope'"),
    "params with maps": (dict(maps=torch.rand(2, 1, 12, 12), params={"n_samples": 2}), "maps were given"),
    "labels of another length": (dict(labels=[0]), "labels has 1 entries for a batch of 2"),
    "labels out of range": (dict(labels=[0, 3]), "out of range for a model with 3 classes"),
    "float labels": (dict(labels=[0.0, 1.0]), "integer class indices"),
    "target out of range": (dict(target=3), "out of range for a model with 3 classes"),
    "batch size 0": (dict(batch_size=0), "batch_size must be an integer >= 1"),
}


@pytest.mark.parametrize("kwargs, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_raises_a_clear_error(kwargs, message):
    call = {"images": X2, **kwargs}
    with pytest.raises(ValueError, match=message):
        fidelity(tiny_cnn(2), **call)


def test_logit_ratio_refuses_a_non_positive_unperturbed_logit():
    """TopLeftEvidence's class-0 logit is 0: the ratio is meaningless, and the error says what to use."""
    model, x = TopLeftEvidence(), images_for(2, n=3)
    with pytest.raises(ValueError, match=r"3 image\(s\).*score='probability'"):
        fidelity(model, x, target=0, score="logit_ratio")
    assert fidelity(model, x, target=0, score="probability").mif.shape == (3, 20)
