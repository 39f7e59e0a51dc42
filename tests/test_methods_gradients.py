"""Gradient-family, guided and occlusion methods: agreement with captum and with hand-written
references, IG completeness, chunking, and post-processing (no trace on model, input or torch:
test_no_trace.py).

How each method is matched (all to float32 precision, 2D and 3D, batches with mixed targets):
* gradient_x_input, guided_backprop, guided_gradcam, occlusion: captum's InputXGradient,
  GuidedBackprop, GuidedGradCam (bi/trilinear interpolation) and Occlusion (on softmax) directly.
* integrated_gradients: captum IG with the same baseline, steps and alphas (riemann_trapezoid);
  captum's trapezoid weights sum to (steps-1)/steps instead of 1, so ours = captum * steps/(steps-1).
* smoothgrad (and squared), smoothgrad_ig: the *same noise* both ways. Our K noise patterns for a
  seed are exactly what captum's NoiseTunnel draws for one image after torch.manual_seed(seed), so
  each image is compared with NoiseTunnel run on it alone with stdevs = its own noise level.
  Separately, a plain reference loop over images and samples uses our noise patterns.
* guided_backprop on a net with functional ReLUs (which captum's module hooks miss): equals the
  plain gradient of the same net rewritten with a hand-written guided ReLU, and differs from the
  plain gradient.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import (
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from conftest import FunctionalReluNet, SmoothNet, TopLeftEvidence, images_for, tiny_densenet, tiny_resnet
from scipy.ndimage import gaussian_filter
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from monai_sal_app.saliency import core, explain
from monai_sal_app.saliency.core import auto_batch_size
from monai_sal_app.saliency.guided_backprop import guided_relus
from monai_sal_app.saliency.integrated_gradients import make_baseline
from monai_sal_app.saliency.occlusion import occlusion_geometry
from monai_sal_app.saliency.postprocess import clip_percentile, postprocess
from monai_sal_app.saliency.smoothgrad import noise_levels, noise_patterns

# Small but non-trivial settings for the multi-pass methods (tests not about these counts): more
# than conftest's SMALL_PARAMS, so that chunks and one-by-one runs have several passes to split.
FAST = {
    "gradient_x_input": {},
    "smoothgrad": {"n_samples": 3},
    "integrated_gradients": {"steps": 4},
    "smoothgrad_ig": {"n_samples": 2, "steps": 3},
    "guided_backprop": {},
    "guided_gradcam": {"layer": "layer3"},  # tiny_resnet's layer4 is 1 voxel in 3D (CAM 0)
    "occlusion": {"window": 8, "stride": 8},
}
METHODS = list(FAST)


class ReferenceGuidedReLU(torch.autograd.Function):
    """Guided backprop's ReLU written out: forward max(x, 0); backward grad * [x > 0] * [grad > 0]."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * (x > 0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * (grad > 0)


def mixed_targets(n: int) -> torch.Tensor:
    return torch.tensor([1, 0, 1, 0][:n])


def without_inplace(model: nn.Module) -> nn.Module:
    """A copy for captum, whose hooks need activations not to be overwritten in place."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return model


def interpolation(spatial_dims: int) -> str:
    return "bilinear" if spatial_dims == 2 else "trilinear"


# ---------------------------------------------------------------- gradient x input


def test_gradient_x_input_matches_captum(dims):
    model = FunctionalReluNet(dims, in_channels=2).eval()
    x = images_for(dims, n=4, channels=2)
    target = torch.tensor([2, 0, 1, 2])
    ours = explain(model, x, "gradient_x_input", target=target)
    theirs = InputXGradient(model).attribute(x.clone(), target=target).sum(1, keepdim=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- SmoothGrad


@pytest.mark.parametrize("squared", [False, True], ids=["smoothgrad", "smoothgrad_sq"])
def test_smoothgrad_matches_captum_noise_tunnel_with_the_same_noise(dims, squared):
    model = tiny_resnet(dims)
    x = images_for(dims, n=3) * torch.tensor([1.0, 3.0, 0.5]).view(3, *[1] * (dims + 1))  # different ranges
    target = mixed_targets(3)
    ours = explain(model, x, "smoothgrad", target=target, n_samples=4, sigma=0.2, squared=squared, seed=7)
    noise = noise_levels(x, 0.2).flatten()
    for i in range(3):
        torch.manual_seed(7)  # NoiseTunnel draws its noise from the global generator
        theirs = NoiseTunnel(Saliency(model)).attribute(
            x[i : i + 1],
            nt_type="smoothgrad_sq" if squared else "smoothgrad",
            nt_samples=4,
            stdevs=float(noise[i]),
            target=int(target[i]),
            abs=False,
        )
        torch.testing.assert_close(ours[i : i + 1], theirs.sum(1, keepdim=True), rtol=1e-4, atol=1e-8)


def test_smoothgrad_matches_a_reference_loop_over_our_noise(dims):
    model = FunctionalReluNet(dims, in_channels=2).eval()
    x = images_for(dims, n=3, channels=2)
    target = torch.tensor([0, 2, 1])
    plain = explain(model, x, "smoothgrad", target=target, n_samples=3, sigma=0.1, seed=3)
    squared = explain(model, x, "smoothgrad", target=target, n_samples=3, sigma=0.1, seed=3, squared=True)
    z = noise_patterns(x, 3, seed=3)
    for i in range(3):
        s = 0.1 * (x[i].max() - x[i].min())
        grads = []
        for k in range(3):
            xi = (x[i : i + 1] + s * z[k]).requires_grad_(True)
            (g,) = torch.autograd.grad(model(xi)[0, target[i]], xi)
            grads.append(g)
        g = torch.cat(grads)
        torch.testing.assert_close(plain[i], g.mean(0).sum(0, keepdim=True), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(squared[i], (g * g).mean(0).sum(0, keepdim=True), rtol=1e-5, atol=1e-9)


def test_smoothgrad_noise_is_seeded_and_not_the_global_generator():
    model, x = tiny_resnet(2), images_for(2, n=3)
    torch.manual_seed(123)
    first = explain(model, x, "smoothgrad", n_samples=3, seed=5)
    torch.manual_seed(999)
    again = explain(model, x, "smoothgrad", n_samples=3, seed=5)
    other = explain(model, x, "smoothgrad", n_samples=3, seed=6)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    # sigma=0: every noisy copy is the image itself.
    torch.testing.assert_close(explain(model, x, "smoothgrad", n_samples=2, sigma=0.0), explain(model, x, "gradient"))


# ---------------------------------------------------------------- Integrated Gradients


@pytest.mark.parametrize("baseline", ["zero", "constant", "min", "blur"])
def test_integrated_gradients_matches_captum_trapezoid(dims, baseline):
    model = tiny_resnet(dims)
    x = images_for(dims, n=3) - 0.3
    target = mixed_targets(3)
    steps = 6
    params = {"baseline": baseline, "baseline_value": 0.25, "blur_sigma": 2.0}
    ours = explain(model, x, "integrated_gradients", target=target, steps=steps, **params)
    base = make_baseline(x, **params)
    theirs = IntegratedGradients(model).attribute(
        x, baselines=base, target=target, n_steps=steps, method="riemann_trapezoid"
    )
    torch.testing.assert_close(ours, theirs.sum(1, keepdim=True) * steps / (steps - 1), rtol=1e-4, atol=1e-7)


def test_baselines_are_what_they_say(dims):
    x = images_for(dims, n=2, channels=2) * 2 - 0.5
    assert (make_baseline(x, "zero") == 0).all()
    assert (make_baseline(x, "constant", baseline_value=-1.5) == -1.5).all()
    lowest = make_baseline(x, "min")
    for i in range(2):
        assert (lowest[i] == x[i].min()).all()
    # per channel, along every spatial axis; also with a sigma much larger than the image
    for sigma in (1.5, 40.0):
        blurred = make_baseline(x, "blur", blur_sigma=sigma)
        reference = gaussian_filter(x.numpy(), sigma=[0, 0] + [sigma] * dims, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(blurred.numpy(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("baseline", ["zero", "min", "blur"])
def test_integrated_gradients_completeness(dims, baseline):
    """sum of the map == f(x) - f(baseline) within 1% at 200 steps (smooth model, float32)."""
    model = SmoothNet(dims).eval()
    x = images_for(dims, n=2, side=16 if dims == 2 else 8) * 3
    target = torch.tensor([0, 1])
    maps = explain(model, x, "integrated_gradients", target=target, steps=200, baseline=baseline, blur_sigma=2.0)
    base = make_baseline(x, baseline, blur_sigma=2.0)
    with torch.no_grad():
        expected = (model(x) - model(base)).gather(1, target.view(-1, 1)).squeeze(1)
    assert expected.abs().min() > 0.02  # the test is not about a near-zero difference
    total = maps.flatten(1).sum(1)
    assert torch.allclose(total, expected, rtol=0.01, atol=0), (total, expected)


def test_smoothgrad_ig_matches_captum_noise_tunnel_over_ig(dims):
    model = tiny_resnet(dims)
    x = images_for(dims, n=2)
    target = torch.tensor([1, 0])
    k, steps = 3, 4
    ours = explain(
        model, x, "smoothgrad_ig", target=target, n_samples=k, steps=steps, sigma=0.15, baseline="min", seed=11
    )
    noise, base = noise_levels(x, 0.15).flatten(), make_baseline(x, "min")
    for i in range(2):
        torch.manual_seed(11)
        theirs = NoiseTunnel(IntegratedGradients(model)).attribute(
            x[i : i + 1],
            nt_type="smoothgrad",
            nt_samples=k,
            stdevs=float(noise[i]),
            target=int(target[i]),
            baselines=base[i : i + 1],
            n_steps=steps,
            method="riemann_trapezoid",
        )
        torch.testing.assert_close(
            ours[i : i + 1], theirs.sum(1, keepdim=True) * steps / (steps - 1), rtol=1e-4, atol=1e-7
        )


# ---------------------------------------------------------------- guided backprop, guided Grad-CAM


# MONAI nets with nn.ReLU modules (DenseNet121 only in 2D: in 3D it needs 32^3 voxels, slow on CPU)
@pytest.mark.parametrize("arch,dims", [("resnet", 2), ("resnet", 3), ("densenet", 2)])
def test_guided_backprop_matches_captum_on_relu_modules(arch, dims):
    model = {"resnet": tiny_resnet, "densenet": tiny_densenet}[arch](dims)
    x = images_for(dims, n=3, side=64 if arch == "densenet" else None)
    target = mixed_targets(3)
    ours = explain(model, x, "guided_backprop", target=target)
    theirs = GuidedBackprop(without_inplace(model)).attribute(x.clone(), target=target).sum(1, keepdim=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    # monai.visualize's defect: on MONAI nets guided backprop must not equal the plain gradient
    assert not torch.allclose(ours, explain(model, x, "gradient", target=target), rtol=1e-3, atol=1e-6)


def test_guided_backprop_on_functional_relus_equals_a_hand_written_guided_net(dims):
    model = FunctionalReluNet(dims, in_channels=2).eval()
    reference = FunctionalReluNet(dims, in_channels=2, relu=ReferenceGuidedReLU.apply).eval()
    x = images_for(dims, n=4, channels=2) - 0.3
    target = torch.tensor([0, 1, 2, 1])
    ours = explain(model, x, "guided_backprop", target=target)
    torch.testing.assert_close(ours, explain(reference, x, "gradient", target=target), rtol=1e-5, atol=1e-8)
    assert not torch.allclose(ours, explain(model, x, "gradient", target=target), rtol=1e-3, atol=1e-6)
    # captum's module hooks find no ReLU module here: it returns the plain gradient
    captum_map = GuidedBackprop(model).attribute(x.clone(), target=target).sum(1, keepdim=True)
    torch.testing.assert_close(captum_map, explain(model, x, "gradient", target=target))


def test_guided_backprop_refuses_a_model_without_relu():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs ReLU"):
        explain(model, images_for(2, n=3), "guided_backprop")


@pytest.mark.parametrize(
    "arch,dims,layer_name",
    # the 3D ResNet's layer4 is 1 voxel at 16^3 and its CAM is 0 for these images: use layer3 there
    [("resnet", 2, "layer4"), ("resnet", 3, "layer3"), ("densenet", 2, "class_layers.relu")],
)
def test_guided_gradcam_matches_captum(arch, dims, layer_name):
    model = {"resnet": tiny_resnet, "densenet": tiny_densenet}[arch](dims)
    x = images_for(dims, n=3, side=64 if arch == "densenet" else None)
    target = mixed_targets(3)
    ours = explain(model, x, "guided_gradcam", target=target, layer=layer_name)
    nonzero = ours.flatten(1).abs().amax(1) > 0
    # this untrained DenseNet's Grad-CAM for class 1 is empty (its evidence is negative everywhere)
    assert nonzero.all() if arch == "resnet" else nonzero[target == 0].all()
    if dims == 2:  # the default layer is the last feature block
        assert torch.equal(ours, explain(model, x, "guided_gradcam", target=target))
    captum_model = without_inplace(model)
    layer = dict(captum_model.named_modules())[layer_name]
    theirs = GuidedGradCam(captum_model, layer).attribute(
        x.clone(), target=target, interpolate_mode=interpolation(dims)
    )
    torch.testing.assert_close(ours, theirs.sum(1, keepdim=True), rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- occlusion


@pytest.mark.parametrize(
    "window,stride", [(8, 8), (6, 4), ((6, 4, 5), (3, 4, 2))], ids=["tiled", "overlapping-cut-at-border", "per-axis"]
)
def test_occlusion_matches_captum_on_softmax(dims, window, stride):
    model = tiny_resnet(dims)
    x = images_for(dims, n=3, side=32 if dims == 2 else 12)
    target = mixed_targets(3)
    if not isinstance(window, int):  # one value per spatial axis, given as JSON-like lists
        window, stride = list(window[:dims]), list(stride[:dims])
    ours = explain(model, x, "occlusion", target=target, window=window, stride=stride, baseline_value=0.5, batch_size=7)
    w = (window,) * dims if isinstance(window, int) else tuple(window)
    t = (stride,) * dims if isinstance(stride, int) else tuple(stride)
    probabilities = nn.Sequential(model, nn.Softmax(dim=1))
    theirs = Occlusion(probabilities).attribute(
        x, sliding_window_shapes=(1, *w), strides=(1, *t), baselines=0.5, target=target, perturbations_per_eval=16
    )
    assert (ours.flatten(1).abs().amax(1) > 0).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def test_occlusion_default_windows_scale_with_the_image():
    assert occlusion_geometry((224, 224)) == ((16, 16), (8, 8))
    assert occlusion_geometry((112, 448)) == ((8, 32), (4, 16))
    assert occlusion_geometry((64, 64, 64)) == ((8, 8, 8), (8, 8, 8))
    assert occlusion_geometry((128, 128, 32)) == ((16, 16, 4), (16, 16, 4))
    assert occlusion_geometry((32, 32)) == ((2, 2), (1, 1))
    assert occlusion_geometry((32, 32), window=6) == ((6, 6), (3, 3))
    with pytest.raises(ValueError, match="uncovered"):
        occlusion_geometry((32, 32), window=4, stride=5)
    with pytest.raises(ValueError, match="does not fit"):
        occlusion_geometry((32, 32), window=40)
    with pytest.raises(ValueError, match="one per spatial axis"):
        occlusion_geometry((32, 32), window=(4, 4, 4))


def test_occlusion_finds_the_only_evidence():
    """TopLeftEvidence: class 1's probability rises with the mean of the top-left 8x8 block only:
    occluding it (to 0) lowers the probability, occluding anything else changes nothing."""
    maps = explain(TopLeftEvidence(), torch.rand(2, 1, 32, 32) + 0.5, "occlusion", target=1, window=8, stride=8)[:, 0]
    assert (maps[:, :8, :8] > 0).all()
    assert maps[:, 8:, :].abs().max() == 0 and maps[:, :, 8:].abs().max() == 0


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_shapes_chunking_and_mixed_target_batches(dims, method):
    model = tiny_resnet(dims)
    x = images_for(dims, n=3)
    target = mixed_targets(3)
    automatic = explain(model, x, method, target=target, **FAST[method])
    assert automatic.shape == (3, 1, *x.shape[2:]) and automatic.dtype == torch.float32
    assert torch.isfinite(automatic).all() and automatic.abs().max() > 0
    one_by_one = explain(model, x, method, target=target, batch_size=1, **FAST[method])
    torch.testing.assert_close(automatic, one_by_one, rtol=1e-4, atol=1e-7)
    # a batch with mixed targets equals each image explained alone (noise does not depend on the batch)
    for i in range(3):
        single = explain(model, x[i : i + 1], method, target=int(target[i]), **FAST[method])
        torch.testing.assert_close(automatic[i : i + 1], single, rtol=1e-4, atol=1e-7)


def test_guided_relus_context_is_gone_after_an_exception():
    with pytest.raises(KeyError), guided_relus():
        assert len(_get_current_function_mode_stack()) == 1
        raise KeyError("inside")
    assert _get_current_function_mode_stack() == []
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad((torch.relu(x) * torch.tensor([1.0, -3.0])).sum(), x)
    assert g.tolist() == [0.0, -3.0]  # plain ReLU backward again


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("smoothgrad", {"n_samples": 0}, "n_samples"),
        ("smoothgrad", {"sigma": -0.1}, "sigma"),
        ("integrated_gradients", {"steps": 1}, "steps"),
        ("integrated_gradients", {"baseline": "noise"}, "baseline must be one of"),
        ("integrated_gradients", {"baseline": "blur", "blur_sigma": 0}, "blur_sigma"),
        ("smoothgrad_ig", {"steps": 1}, "steps"),
        ("occlusion", {"window": 0}, "window"),
    ],
)
def test_bad_parameters_raise_clear_errors(method, params, match):
    with pytest.raises(ValueError, match=match):
        explain(tiny_resnet(2), images_for(2, n=1), method, **params)


# ---------------------------------------------------------------- automatic batch size


def test_auto_batch_size_follows_free_memory(monkeypatch):
    model, x = tiny_resnet(2), images_for(2, n=3)
    per_row = 2 * core._activation_bytes_per_row(model, x[:1]) + 4 * x[0].numel() * 4
    monkeypatch.setattr(core, "free_memory_bytes", lambda device: 10 * per_row)
    assert auto_batch_size(model, x, passes_per_image=50) == 5  # half of the free memory
    monkeypatch.setattr(core, "free_memory_bytes", lambda device: 1)
    assert auto_batch_size(model, x, passes_per_image=50) == 1
    monkeypatch.setattr(core, "free_memory_bytes", lambda device: 10**15)
    assert auto_batch_size(model, x, passes_per_image=50) == 150  # never more rows than needed


def test_auto_batch_size_caps_cpu_chunks_and_splits_rows_evenly(monkeypatch):
    model, x = tiny_resnet(2), images_for(2, n=3)
    per_row = 2 * core._activation_bytes_per_row(model, x[:1]) + 4 * x[0].numel() * 4
    monkeypatch.setattr(core, "free_memory_bytes", lambda device: 10**15)
    monkeypatch.setattr(core, "CPU_CHUNK_BYTES", 16 * per_row)
    # 150 rows at most 16 per pass -> 10 passes of 15 (not 9 x 16 + 6)
    assert auto_batch_size(model, x, passes_per_image=50) == 15
    assert auto_batch_size(model, x, passes_per_image=5) == 15
    assert auto_batch_size(model, x, passes_per_image=1) == 3
    assert core.max_rows_in_memory(model, x) > 10**6  # the memory rule alone knows no CPU cap
    # forward-only passes have their own, smaller cap: 150 rows at most 4 per pass -> 38 passes of 4
    monkeypatch.setattr(core, "CPU_FORWARD_CHUNK_BYTES", 4 * per_row)
    assert auto_batch_size(model, x, passes_per_image=50, forward_only=True) == 4
    assert auto_batch_size(model, x, passes_per_image=50) == 15


def test_occlusion_runs_the_unoccluded_images_in_its_chunks():
    """One forward pass per chunk of rows, the unoccluded image being one more row per image."""
    model, x = tiny_resnet(2), images_for(2, n=2, side=16)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        explain(model, x, "occlusion", target=0, window=8, stride=8, batch_size=3)
    finally:
        handle.remove()
    assert calls == [3, 3, 3, 1]  # 2 images x (4 windows + 1 unoccluded) = 10 rows


def test_activation_memory_is_measured_and_scales_with_the_image(dims):
    model = tiny_resnet(dims)
    small = core._activation_bytes_per_row(model, images_for(dims, n=1, side=16))
    large = core._activation_bytes_per_row(model, images_for(dims, n=1, side=32))
    assert small > 16**dims * 4  # more than the input itself
    assert large / small == pytest.approx(2**dims, rel=0.15)


# ---------------------------------------------------------------- post-processing


def test_postprocessing_steps():
    maps = torch.stack([torch.linspace(-2, 3, 100).view(1, 10, 10), torch.full((1, 10, 10), 4.0)])
    assert torch.equal(postprocess(maps, ["abs"]), maps.abs())
    scaled = postprocess(maps, ["minmax"])
    assert scaled[0].min() == 0 and scaled[0].max() == 1
    torch.testing.assert_close(scaled[0], (maps[0] + 2) / 5)
    assert (scaled[1] == 0).all()  # a constant map becomes zeros
    clipped = postprocess(maps, ["clip"])
    cap = np.percentile(maps[0].numpy(), 99)
    np.testing.assert_allclose(clipped[0].numpy(), np.minimum(maps[0].numpy(), cap), rtol=1e-6)
    torch.testing.assert_close(clipped[1], maps[1])
    chained = postprocess(maps, ("abs", "minmax"))
    magnitude = maps[0].abs()
    torch.testing.assert_close(chained[0], (magnitude - magnitude.min()) / (magnitude.max() - magnitude.min()))


def test_grayscale_sums_channels_clips_and_scales():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 8, 8, 8, generator=g)
    maps[1] = 0
    gray = postprocess(maps, ["grayscale"])
    assert gray.shape == (2, 1, 8, 8, 8)
    summed = maps[0].abs().sum(0).numpy()
    cap = np.percentile(summed, 99)
    expected = np.clip((summed - summed.min()) / (cap - summed.min()), 0, 1)
    np.testing.assert_allclose(gray[0, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert gray[0].max() == 1 and gray[0].min() == 0
    assert (gray[1] == 0).all()


def test_postprocessing_rejects_unknown_steps_and_bad_percentiles():
    with pytest.raises(ValueError, match="unknown post-processing step 'normalise'"):
        postprocess(torch.zeros(1, 1, 4, 4), ["normalise"])
    with pytest.raises(ValueError, match="percentile"):
        clip_percentile(torch.zeros(1, 1, 4, 4), 0)
