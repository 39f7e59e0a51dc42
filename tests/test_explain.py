"""explain(): the one call, its registry, input checks, and the first two methods vs captum."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

from monai_sal_app.saliency import available_methods, explain
from monai_sal_app.saliency.gradcam import _capture_layer


def tiny_cnn(spatial_dims: int, in_channels: int = 1, num_classes: int = 3) -> nn.Module:
    """A small CNN with batch norm, dropout and in-place ReLUs: all things explain() must restore."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
    torch.manual_seed(0)
    return nn.Sequential(
        conv(in_channels, 6, 3, padding=1),
        norm(6),
        nn.ReLU(inplace=True),
        conv(6, 8, 3, padding=1, stride=2),
        norm(8),
        nn.ReLU(inplace=True),
        pool(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8, num_classes),
    )


def tiny_resnet(spatial_dims: int) -> nn.Module:
    torch.manual_seed(0)
    return ResNet("basic", [1, 1, 1, 1], [4, 4, 8, 8], spatial_dims=spatial_dims, n_input_channels=1, num_classes=2)


def tiny_densenet(spatial_dims: int) -> nn.Module:
    torch.manual_seed(0)
    return DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=2, init_features=4, growth_rate=4)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dims(request):
    return request.param


def images_for(spatial_dims: int, n: int = 4, channels: int = 1, side: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    side = side or (32 if spatial_dims == 2 else 16)
    return torch.rand((n, channels, *(side,) * spatial_dims), generator=g)


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
        torch.testing.assert_close(
            explain(model, x, method, batch_size=2), explain(model, x, method), rtol=1e-5, atol=1e-6
        )


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
    ours = explain(model, x, "gradcam", target=target)
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


def test_gradcam_is_not_inverted_on_a_model_with_known_evidence():
    """Feature channel 0 sees only the top-left quadrant and drives class 1; channel 1 sees only the
    bottom-right one and drives class 0. Grad-CAM for class 1 must light the top-left, not the rest."""

    class QuadrantFeatures(nn.Module):
        def forward(self, x):
            top_left, bottom_right = torch.zeros_like(x), torch.zeros_like(x)
            top_left[..., :16, :16] = 1
            bottom_right[..., 16:, 16:] = 1
            return torch.cat([x * top_left, x * bottom_right], 1)

    class QuadrantModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.probe = nn.Conv2d(1, 1, 1)  # gives explain() the model's spatial dims; unused
            self.features = QuadrantFeatures()

        def forward(self, x):
            a = self.features(x)
            return torch.stack([a[:, 1].mean((1, 2)), a[:, 0].mean((1, 2))], 1)

    x = torch.rand(2, 1, 32, 32) + 0.5
    cam = explain(QuadrantModel(), x, "gradcam", target=1)[:, 0]
    assert cam[:, :14, :14].min() > 0
    assert cam[:, 18:, 18:].abs().max() == 0
    assert cam[:, 18:, :14].abs().max() == 0


@pytest.mark.parametrize("method", ["gradient", "gradcam"])
def test_model_and_input_left_untouched(method):
    model = tiny_cnn(2)
    model.train()
    model[4].eval()  # a mixed-mode model: each module's own flag must come back
    model[0].weight.requires_grad_(False)
    x = images_for(2)
    x_before = x.clone()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    explain(model, x, method)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # batch-norm running stats unchanged (eval during explain)
        torch.testing.assert_close(v, state_before[k])
    torch.testing.assert_close(x, x_before)
    assert not x.requires_grad


def test_model_restored_after_a_failing_method():
    model = tiny_cnn(2).train()
    with pytest.raises(ValueError, match="not a module"):
        explain(model, images_for(2), "gradcam", layer="no.such.layer")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


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


# The cheapest work of every registered method (a new method must be added here).
CHEAP = {
    "gradient": {},
    "gradient_x_input": {},
    "gradcam": {},
    "guided_backprop": {},
    "guided_gradcam": {},
    "smoothgrad": {"n_samples": 2},
    "integrated_gradients": {"steps": 2},
    "smoothgrad_ig": {"n_samples": 1, "steps": 2},
    "occlusion": {"window": 16, "stride": 16},
    "xrai": {"steps": 2},
    "meaningful_perturbation": {"steps": 1},
}


def test_cheap_work_covers_every_method():
    assert set(CHEAP) == set(available_methods())


@pytest.mark.parametrize("method", sorted(CHEAP))
def test_a_given_target_is_checked_without_an_extra_forward_pass(method):
    model, x = tiny_cnn(2), images_for(2, n=2)
    rows = []
    handle = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        with pytest.raises(ValueError, match=r"out of range for a model with 3 classes"):
            explain(model, x, method, target=[0, 3], **CHEAP[method])
        with pytest.raises(ValueError, match=r"out of range"):
            explain(model, x, method, target=-1, **CHEAP[method])
        rows.clear()
        explain(model, x, "gradient", target=[0, 2])
    finally:
        handle.remove()
    assert rows == [2]  # the gradient pass itself, nothing to count the classes
