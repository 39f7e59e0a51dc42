"""XRAI (vs Google PAIR's reference implementation) and meaningful perturbation (vs known evidence)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.sparse as sp
import torch
from conftest import BlobModel, blob_images, tiny_cnn
from saliency.core import XRAI, XRAIParameters
from saliency.core import xrai as pair_xrai
from saliency.core.base import INPUT_OUTPUT_GRADIENTS
from saliency.core.integrated_gradients import IntegratedGradients
from skimage.morphology import ball
from torch import nn

from monai_sal_app.models.filters import gaussian_blur
from monai_sal_app.saliency import available_methods, explain
from monai_sal_app.saliency.meaningful_perturbation import perturb
from monai_sal_app.saliency.xrai import (
    _integrated_gradients_min_max,
    segment_membership_2d,
    segment_membership_3d,
    select_regions,
    xrai_regions,
)


def textured_images(spatial_dims: int, n: int, side: int, channels: int = 1, seed: int = 1) -> torch.Tensor:
    """Smoothed noise plus a bright disk/ball per image: structure for the segmentations."""
    rng = np.random.default_rng(seed)
    grid = np.indices((side,) * spatial_dims) / side
    out = []
    for _ in range(n):
        centre = rng.uniform(0.3, 0.7, size=(spatial_dims,) + (1,) * spatial_dims)
        blob = (((grid - centre) ** 2).sum(0) < 0.03).astype(np.float32)
        noise = ndi.gaussian_filter(rng.random((channels,) + (side,) * spatial_dims), (0,) + (1.5,) * spatial_dims)
        out.append(noise + blob)
    return torch.tensor(np.stack(out), dtype=torch.float32)


def pair_call_model_function(model: nn.Module, target: int):
    """PAIR's call_model_function (channels-last batches) for a torch model and one target."""

    def call(x_batch, call_model_args=None, expected_keys=None):
        x = torch.tensor(np.asarray(x_batch), dtype=torch.float32).movedim(-1, 1).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
        return {INPUT_OUTPUT_GRADIENTS: grad.movedim(1, -1).numpy()}

    return call


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------- XRAI


def test_registered_with_json_serialisable_defaults():
    methods = available_methods()
    for name in ("xrai", "meaningful_perturbation"):
        assert methods[name]["summary"]
        json.dumps(methods[name]["defaults"])
    xrai_defaults = methods["xrai"]["defaults"]
    assert xrai_defaults["steps"] == 100 and list(xrai_defaults["scales"]) == [50, 100, 150, 250, 500, 1200]
    assert (xrai_defaults["sigma"], xrai_defaults["min_size"], xrai_defaults["dilation_px"]) == (0.8, 150, 5)
    mp = methods["meaningful_perturbation"]["defaults"]
    assert (mp["steps"], mp["lr"], mp["l1_coeff"], mp["tv_coeff"], mp["tv_beta"]) == (300, 0.1, 1e-4, 1e-2, 3.0)
    assert (mp["blur_sigma"], mp["jitter"]) == (10.0, 4)


def test_integrated_gradients_match_pair_min_max_baselines():
    model = frozen(tiny_cnn(2, in_channels=2))
    x = textured_images(2, 2, 24, channels=2)
    target = torch.tensor([1, 2])
    ours = _integrated_gradients_min_max(model, x, target, steps=12, batch_size=10)
    ig = IntegratedGradients()
    for i in range(2):
        image = x[i].movedim(0, -1).numpy()
        call = pair_call_model_function(model, int(target[i]))
        theirs = np.mean(
            [
                ig.GetMask(image, call, x_baseline=np.full_like(image, v), x_steps=12, batch_size=5)
                for v in (image.min(), image.max())
            ],
            axis=0,
        )
        np.testing.assert_allclose(ours[i].movedim(0, -1).numpy(), theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape,channels", [((40, 40), 1), ((36, 52), 3)])
def test_segments_match_pair_felzenszwalb(shape, channels):
    image = np.random.default_rng(2).random((channels, *shape))
    image = ndi.gaussian_filter(image, (0, 2, 2))
    ours = segment_membership_2d(image).toarray().astype(bool)
    theirs = np.array([m.ravel() for m in pair_xrai._get_segments_felzenszwalb(np.moveaxis(image, 0, -1))])
    # PAIR keeps the empty masks of labels lost by the nearest-neighbour resize; they never count.
    np.testing.assert_array_equal(ours, theirs[theirs.any(1)])


@pytest.mark.parametrize("area_threshold,min_pixel_diff", [(1.0, 50), (0.3, 50), (1.0, 1)])
def test_region_selection_matches_pair_xrai(area_threshold, min_pixel_diff):
    rng = np.random.default_rng(3)
    image = ndi.gaussian_filter(rng.random((48, 48)), 1.0)
    attribution = ndi.gaussian_filter(rng.normal(size=(48, 48)), 2.0)
    segments = pair_xrai._get_segments_felzenszwalb(image[..., None])
    membership = np.array([s.ravel() for s in segments], dtype=float)
    theirs_map, theirs_ranks = XRAI._xrai(
        attribution, segments, area_perc_th=area_threshold, min_pixel_diff=min_pixel_diff
    )
    xrai_map, step, gains = select_regions(
        attribution.ravel(), sp.csr_matrix(membership), area_threshold, min_pixel_diff
    )
    np.testing.assert_allclose(xrai_map.reshape(48, 48), theirs_map, rtol=1e-10, atol=1e-12)
    # Same steps: each pixel covered at the same step (PAIR's ranks sort steps by gain).
    order = np.argsort(-gains, kind="stable")
    rank_of_step = np.empty_like(order)
    rank_of_step[order] = np.arange(1, len(gains) + 1)
    ours_ranks = np.where(step >= 0, rank_of_step[np.maximum(step, 0)], len(gains) + 1).reshape(48, 48)
    np.testing.assert_array_equal(ours_ranks, theirs_ranks)
    if area_threshold < 1.0:
        assert (step < 0).any()  # the early stop left a remainder, as in PAIR


def test_xrai_matches_pair_getmask_end_to_end():
    model = frozen(tiny_cnn(2, in_channels=2))
    x = textured_images(2, 1, 48, channels=2, seed=4)
    target = 2
    params = dict(steps=16, batch_size=32)
    ours = explain(model, x, "xrai", target=target, **params)[0, 0].numpy()
    regions = xrai_regions(model, x, target=target, **params)[0]
    pair = XRAI().GetMaskWithDetails(
        x[0].movedim(0, -1).numpy(),
        pair_call_model_function(model, target),
        batch_size=16,
        extra_parameters=XRAIParameters(steps=16, return_xrai_segments=True),
    )
    np.testing.assert_allclose(ours, pair.attribution_mask, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(regions.ranks, pair.segments)


@pytest.mark.parametrize("spatial_dims,side", [(2, 32), (3, 16)], ids=["2d", "3d"])
def test_xrai_shapes_mixed_targets_and_chunks(spatial_dims, side):
    model = tiny_cnn(spatial_dims)
    x = textured_images(spatial_dims, 3, side)
    target = torch.tensor([0, 2, 1])
    params = dict(steps=6, scales=(100, 500), n_segments=(8, 27), min_pixel_diff=10)
    maps = explain(model, x, "xrai", target=target, **params)
    assert maps.shape == (3, 1, *x.shape[2:]) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(
        explain(model, x, "xrai", target=target, batch_size=5, **params), maps, rtol=1e-5, atol=1e-7
    )
    for i in range(3):
        single = explain(model, x[i : i + 1], "xrai", target=int(target[i]), **params)
        torch.testing.assert_close(single, maps[i : i + 1], rtol=1e-5, atol=1e-7)


def test_xrai_3d_regions_keep_attribution():
    """On a 24^3 volume: every region holds the mean IG attribution of its voxels, so the map
    keeps the attribution's total; the regions partition the volume, best first."""
    model = frozen(tiny_cnn(3))
    x = textured_images(3, 1, 24, seed=5)
    regions = xrai_regions(model, x, target=1, steps=20)[0]
    maps = explain(model, x, "xrai", target=1, steps=20)[0, 0].numpy()
    attribution = _integrated_gradients_min_max(model, x, torch.tensor([1]), 20, None)[0].amax(0).numpy()
    painted = regions.gains[regions.ranks - 1]
    np.testing.assert_allclose(painted, maps, rtol=1e-5, atol=1e-7)
    for k in range(1, len(regions.gains) + 1):
        inside = regions.ranks == k
        assert inside.any()
        assert regions.gains[k - 1] == pytest.approx(attribution[inside].mean(), rel=1e-4, abs=1e-7)
    assert maps.sum() == pytest.approx(attribution.sum(), rel=1e-4, abs=1e-5)
    selected = regions.gains[: regions.n_selected]
    assert np.all(np.diff(selected) <= 0)
    assert regions.cumulative_area[-1] == pytest.approx(1.0)
    assert regions.n_selected > 5


def test_xrai_regions_top_mask_covers_the_requested_fraction():
    model = tiny_cnn(2)
    x = textured_images(2, 2, 32, seed=6)
    for regions in xrai_regions(model, x, target=[0, 1], steps=6, scales=(50, 250)):
        masks = regions.masks()
        assert masks.shape == (len(regions.gains), 32, 32)
        assert (masks.sum(0) == 1).all()
        for fraction in (0.05, 0.2, 0.5):
            top = regions.top_mask(fraction)
            k = int(regions.ranks[top].max())
            assert top.mean() >= fraction
            assert (regions.ranks <= k - 1).mean() < fraction  # one region fewer is not enough
        assert not regions.top_mask(0.0).any() and regions.top_mask(1.0).all()
        with pytest.raises(ValueError, match="fraction"):
            regions.top_mask(1.5)


def test_supervoxels_partition_the_volume_and_dilate_by_a_ball():
    volume = textured_images(3, 1, 20, seed=7)[0].numpy()
    scales = (8, 27, 64)
    plain = segment_membership_3d(volume, n_segments=scales, dilation_voxels=0).toarray().astype(bool)
    np.testing.assert_array_equal(plain.sum(0), len(scales))  # each scale partitions the volume
    dilated = segment_membership_3d(volume, n_segments=scales, dilation_voxels=2).toarray().astype(bool)
    for row, grown in zip(plain[::7], dilated[::7]):
        expected = ndi.binary_dilation(row.reshape(20, 20, 20), structure=ball(2).astype(bool))
        np.testing.assert_array_equal(grown.reshape(20, 20, 20), expected)


def test_xrai_bad_parameters_raise():
    model, x = tiny_cnn(2), textured_images(2, 1, 32)
    with pytest.raises(ValueError, match="area_threshold"):
        explain(model, x, "xrai", area_threshold=1.5, steps=2)
    with pytest.raises(ValueError, match="steps"):
        explain(model, x, "xrai", steps=0)
    with pytest.raises(ValueError, match="min_pixel_diff"):
        explain(model, x, "xrai", steps=2, scales=(250,), min_pixel_diff=0)
    with pytest.raises(ValueError, match="unknown parameter"):
        xrai_regions(model, x, steps=2, n_samples=3)


# ------------------------------------------------------------------------ meaningful perturbation


BLOBS = {2: [(20, 40), (44, 18)], 3: [(15, 30, 18), (33, 14, 30)]}
SIDE = {2: 64, 3: 48}


@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
def test_perturbation_finds_the_evidence_better_than_random_regions(spatial_dims):
    side, (a, b) = SIDE[spatial_dims], BLOBS[spatial_dims]
    model = BlobModel(spatial_dims, side, [a, b])
    x = blob_images(spatial_dims, side, [a, b])  # image 0 shows class 1, image 1 class 2
    target = torch.tensor([1, 2])
    maps = explain(model, x, "meaningful_perturbation", target=target, steps=80)
    assert maps.shape == x.shape and maps.min() >= 0 and maps.max() <= 1
    blurred = gaussian_blur(x, (10.0 * side / 224,) * spatial_dims)

    def probability(i, keep):
        with torch.no_grad():
            return model(perturb(x[i : i + 1], blurred[i : i + 1], keep)).softmax(1)[0, int(target[i])].item()

    g = torch.Generator().manual_seed(0)
    for i, (own, other) in enumerate([(a, b), (b, a)]):
        m = maps[i, 0]
        assert m[own].item() > 0.9 and m[other].item() < 0.1
        top = (m >= torch.quantile(m.flatten(), 0.9)).float()
        area = int(top.sum())
        cube = round(area ** (1 / spatial_dims))
        random_keep, random_delete = [], []
        for _ in range(6):
            corner = torch.randint(0, side - cube, (spatial_dims,), generator=g).tolist()
            box = torch.zeros_like(top)
            box[tuple(slice(c, c + cube) for c in corner)] = 1
            random_keep.append(probability(i, box))
            random_delete.append(probability(i, 1 - box))
        original = probability(i, torch.ones_like(top))
        kept, deleted = probability(i, top), probability(i, 1 - top)
        assert original > 0.9
        assert kept > 0.9 * original and kept > np.mean(random_keep) + 0.3
        assert deleted < 0.2 and deleted < np.mean(random_delete) - 0.3


def test_perturbation_shapes_mixed_targets_batches_and_seed():
    model = tiny_cnn(2)
    x = textured_images(2, 3, 64)
    target = torch.tensor([2, 0, 1])
    maps = explain(model, x, "meaningful_perturbation", target=target, steps=12, seed=3)
    assert maps.shape == (3, 1, 64, 64)
    torch.testing.assert_close(explain(model, x, "meaningful_perturbation", target=target, steps=12, seed=3), maps)
    assert not torch.equal(explain(model, x, "meaningful_perturbation", target=target, steps=12, seed=4), maps)
    # Without jitter the images are independent: chunks and one-by-one give the same maps.
    still = explain(model, x, "meaningful_perturbation", target=target, steps=12, jitter=0)
    chunked = explain(model, x, "meaningful_perturbation", target=target, steps=12, jitter=0, batch_size=2)
    torch.testing.assert_close(chunked, still, rtol=1e-4, atol=1e-5)
    single = explain(model, x[1:2], "meaningful_perturbation", target=0, steps=12, jitter=0)
    torch.testing.assert_close(single, still[1:2], rtol=1e-4, atol=1e-5)


def test_perturbation_jitter_copies_share_one_pass_per_step():
    model = tiny_cnn(2)
    x = textured_images(2, 2, 64)
    target = torch.tensor([2, 0])
    rows = []
    handle = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        # batch_size given: the automatic one measures the model's activations with a one-row pass
        explain(model, x, "meaningful_perturbation", target=target, steps=5, jitter_copies=3, batch_size=2)
    finally:
        handle.remove()
    assert rows == [6] * 5  # 2 images x 3 jittered copies in each of the 5 sequential passes
    # without jitter the copies are identical, so their mean score is the single copy's
    one = explain(model, x, "meaningful_perturbation", target=target, steps=8, jitter=0)
    three = explain(model, x, "meaningful_perturbation", target=target, steps=8, jitter=0, jitter_copies=3)
    torch.testing.assert_close(three, one, rtol=1e-4, atol=1e-5)
    # with jitter they are different draws, so the result changes
    jittered = explain(model, x, "meaningful_perturbation", target=target, steps=8, jitter_copies=3)
    assert not torch.allclose(jittered, explain(model, x, "meaningful_perturbation", target=target, steps=8))


def test_perturbation_3d_shapes():
    model = tiny_cnn(3)
    x = textured_images(3, 2, 24)
    maps = explain(model, x, "meaningful_perturbation", target=[1, 2], steps=5)
    assert maps.shape == (2, 1, 24, 24, 24) and maps.min() >= 0 and maps.max() <= 1


def test_gaussian_blur_matches_scipy():
    x = torch.rand(2, 2, 12, 20, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sigmas = (0.7, 2.0, 1.3)
    expected = ndi.gaussian_filter(x.numpy(), (0, 0, *sigmas), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(gaussian_blur(x, sigmas).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_perturbation_bad_parameters_raise():
    model, x = tiny_cnn(2), textured_images(2, 1, 32)
    with pytest.raises(ValueError, match="steps"):
        explain(model, x, "meaningful_perturbation", steps=0)
    with pytest.raises(ValueError, match="lr"):
        explain(model, x, "meaningful_perturbation", steps=2, lr=-1.0)
    with pytest.raises(ValueError, match="jitter_copies"):
        explain(model, x, "meaningful_perturbation", steps=2, jitter_copies=0)
    with pytest.raises(ValueError, match="out of range"):
        explain(model, x, "meaningful_perturbation", steps=2, target=3)
