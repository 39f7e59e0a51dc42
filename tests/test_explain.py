"""explain(): the one call, its registry, input checks, and the first two methods vs captum."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from conftest import (
    SMALL_PARAMS,
    QuadrantModel,
    images_for,
    network_for,
    small_params,
    tiny_cnn,
    tiny_densenet,
    tiny_resnet,
)
from torch import nn

from monai_sal_app.saliency import available_methods, explain
from monai_sal_app.saliency.gradcam import _capture_layer

# Sides that leave a final feature map of more than one voxel (ResNet /16, DenseNet121 /32), so that
# Grad-CAM maps are not all zero and the captum comparison means something.
SIDE = {"cnn": None, "resnet": 32, "densenet": 64}


def test_registry_lists_methods_with_defaults():
    methods = available_methods()
    assert {"gradient", "gradcam"} <= set(methods)
    assert methods["gradcam"]["defaults"] == {"layer": None, "batch_size": None}
    assert methods["gradient"]["summary"]


@pytest.mark.parametrize("method", ["gradient", "gradcam"])
def test_shapes_and_per_image_targets(dims, method):
    model = tiny_cnn(dims)
    x = images_for(dims)
    target = torch.tensor([0, 1, 2, 1])
    maps = explain(model, x, method, target=target)
    assert maps.shape == (4, 1, *x.shape[2:])
    assert maps.dtype == torch.float32
    # A batch with mixed targets equals the images explained one by one.
    for i in range(4):
        single = explain(model, x[i : i + 1], method, target=int(target[i]))
        torch.testing.assert_close(maps[i : i + 1], single, rtol=1e-5, atol=1e-6)


def test_default_target_is_predicted_class(dims):
    model = tiny_cnn(dims).eval()
    x = images_for(dims)
    predicted = model(x).argmax(1)
    torch.testing.assert_close(explain(model, x, "gradient"), explain(model, x, "gradient", target=predicted))


def test_batch_size_chunks_give_same_maps(dims):
    model = tiny_cnn(dims)
    x = images_for(dims, n=5)
    for method in ("gradient", "gradcam"):
        chunked = explain(model, x, method, batch_size=2)
        torch.testing.assert_close(chunked, explain(model, x, method), rtol=1e-5, atol=1e-6)


def test_gradient_matches_captum_saliency(dims):
    model = tiny_cnn(dims, in_channels=2).eval()
    x = images_for(dims, channels=2)
    target = torch.tensor([2, 0, 1, 1])
    ours = explain(model, x, "gradient", target=target)
    theirs = Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=False).sum(1, keepdim=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_gradient_matches_finite_differences():
    model = tiny_cnn(2).eval()
    x = images_for(2, n=1)
    grad = explain(model, x, "gradient", target=1)[0, 0]
    model64, x64 = copy.deepcopy(model).double(), x.double()
    eps = 1e-6
    pixels = torch.randint(0, 32, (8, 2), generator=torch.Generator().manual_seed(3))
    for r, c in pixels.tolist():
        xp, xm = x64.clone(), x64.clone()
        xp[0, 0, r, c] += eps
        xm[0, 0, r, c] -= eps
        with torch.no_grad():
            fd = (model64(xp)[0, 1] - model64(xm)[0, 1]).item() / (2 * eps)
        assert fd == pytest.approx(grad[r, c].item(), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("arch", ["cnn", "resnet", "densenet"])
def test_gradcam_matches_captum_layer_gradcam(dims, arch):
    model = {"cnn": tiny_cnn, "resnet": tiny_resnet, "densenet": tiny_densenet}[arch](dims).eval()
    x = images_for(dims, side=SIDE[arch])
    target = torch.tensor([1, 0, 1, 0])
    first = explain(model, x, "gradcam", target=target)  # finds the layer, with in-place activations off
    ours = explain(model, x, "gradcam", target=target)  # from the known layer, with the model's in-place ones
    torch.testing.assert_close(ours, first, rtol=0, atol=0)
    layer_name = {"cnn": "5", "resnet": "layer4", "densenet": "class_layers.relu"}[arch]
    layer = dict(model.named_modules())[layer_name]
    if isinstance(layer, nn.ReLU):
        layer.inplace = False  # captum's forward hook needs the activation not to be overwritten
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    mode = "bilinear" if dims == 2 else "trilinear"
    theirs = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert (ours >= 0).all()
    assert (ours.flatten(1).sum(1) > 0).any()  # the comparison is not zeros against zeros


@pytest.mark.parametrize("arch,expected", [("cnn", "5"), ("resnet", "layer4"), ("densenet", "class_layers.relu")])
def test_gradcam_default_layer_is_last_feature_block(dims, arch, expected):
    model = {"cnn": tiny_cnn, "resnet": tiny_resnet, "densenet": tiny_densenet}[arch](dims).eval()
    _, name, activation = _capture_layer(model, None, dims, images_for(dims, n=1, side=SIDE[arch]))
    assert name == expected
    assert activation.ndim == dims + 2


class _OverwritesItsCamLayer(nn.Module):
    """Its Grad-CAM layer ``act`` is an in-place ReLU, and ``shift``, in place as well, then changes
    the same memory (the convolution's output, which ``act`` overwrote) before the head reads both."""

    cam_layer = "act"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.shift = nn.Hardtanh(-0.1, 0.1, inplace=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x)
        z = self.act(y)
        w = self.shift(y)
        return self.fc(torch.cat([z.mean((2, 3)), w.mean((2, 3))], dim=1))


def test_gradcam_of_a_layer_changed_in_place_after_it_runs_again_without_in_place():
    torch.manual_seed(0)
    model = _OverwritesItsCamLayer().eval()
    x = torch.randn(3, 1, 16, 16)
    ours = explain(model, x, "gradcam", target=1)
    assert model.act.inplace and model.shift.inplace  # left as found
    out_of_place = copy.deepcopy(model)
    out_of_place.act.inplace = out_of_place.shift.inplace = False
    theirs = LayerGradCam(out_of_place, out_of_place.act).attribute(x, target=1, relu_attributions=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert (ours.flatten(1).sum(1) > 0).all()


class _ClampsItsCamLayer(nn.Module):
    """Its Grad-CAM layer passes the convolution's output on as it is, and ``forward`` then clamps
    that memory in place: no module setting can stop it."""

    cam_layer = "features"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.features = nn.Identity()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x)
        z = self.features(y)
        w = y.clamp_(-0.1, 0.1)
        return self.fc(torch.cat([z.mean((2, 3)), w.mean((2, 3))], dim=1))


def test_gradcam_refuses_a_layer_its_network_changes_in_place():
    with pytest.raises(ValueError, match=r"layer 'features' is changed in place after Grad-CAM captures it"):
        explain(_ClampsItsCamLayer().eval(), torch.randn(2, 1, 16, 16), "gradcam", target=1)


def test_gradcam_is_not_inverted_on_a_model_with_known_evidence():
    """QuadrantModel: feature channel 0 sees only the top-left quadrant and drives class 1; channel 1
    sees only the bottom-right one and drives class 0. Grad-CAM for class 1 must light the top-left,
    not the rest."""
    x = torch.rand(2, 1, 32, 32) + 0.5
    cam = explain(QuadrantModel(), x, "gradcam", target=1)[:, 0]
    assert cam[:, :14, :14].min() > 0
    assert cam[:, 18:, 18:].abs().max() == 0
    assert cam[:, 18:, :14].abs().max() == 0


@pytest.mark.parametrize(
    "images,match",
    [
        (torch.rand(2, 1, 16, 16, 16), r"takes 2D images"),
        (torch.rand(1, 32, 32), r"takes 2D images"),
        (torch.rand(2, 3, 32, 32), r"takes 1 channel"),
        (torch.full((2, 1, 32, 32), float("nan")), r"NaN"),
        (torch.zeros(0, 1, 32, 32), r"empty batch"),
    ],
)
def test_bad_images_raise_clear_errors(images, match):
    with pytest.raises(ValueError, match=match):
        explain(tiny_cnn(2), images, "gradient")


def test_bad_arguments_raise_clear_errors():
    model, x = tiny_cnn(2), images_for(2)
    with pytest.raises(ValueError, match=r"unknown saliency method 'gradcamm'.*gradcam"):
        explain(model, x, "gradcamm")
    with pytest.raises(ValueError, match=r"unknown parameter"):
        explain(model, x, "gradient", steps=5)
    with pytest.raises(ValueError, match=r"out of range"):
        explain(model, x, "gradient", target=3)
    with pytest.raises(ValueError, match=r"4 images"):
        explain(model, x, "gradient", target=[0, 1])
    with pytest.raises(TypeError, match=r"float tensor"):
        explain(model, x.long(), "gradient")
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        explain(model, x.numpy(), "gradient")
    with pytest.raises(ValueError, match=r"not a module"):
        explain(model, x, "gradcam", layer="no.such.layer")


def test_small_params_are_parameters_of_registered_methods():
    """conftest's SMALL_PARAMS cannot go stale: each entry names a registered method and only
    parameters that method takes."""
    methods = available_methods()
    for method, params in SMALL_PARAMS.items():
        assert method in methods
        assert set(params) <= set(methods[method]["defaults"]), method


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_a_given_target_is_checked_without_an_extra_forward_pass(method):
    model, x = network_for(method, tiny_cnn(2)), images_for(2, n=2)
    rows = []
    handle = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        with pytest.raises(ValueError, match=r"out of range for a model with 3 classes"):
            explain(model, x, method, target=[0, 3], **small_params(method, model))
        with pytest.raises(ValueError, match=r"out of range"):
            explain(model, x, method, target=-1, **small_params(method, model))
        rows.clear()
        explain(model, x, "gradient", target=[0, 2])
    finally:
        handle.remove()
    assert rows == [2]  # the gradient pass itself, nothing to count the classes
