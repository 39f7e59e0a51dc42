"""models/: network factory (2D/3D) and its Grad-CAM layer, losses, augmentations, checkpoints, device."""

from __future__ import annotations

import datetime
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONES, TINY_CHANNELS, tiny_card, tiny_conv5fc3
from scipy import ndimage
from torch import nn
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

import monai_sal_app
from monai_sal_app.models import (
    ARCHITECTURES,
    AUGMENTATIONS,
    LOSSES,
    CheckpointError,
    Conv5FC3,
    CropPad,
    Erasing,
    Flip,
    ModelCard,
    Noise,
    Smoothing,
    build_augmentation,
    build_classifier,
    default_device,
    get_loss,
    load_classifier,
    parse_augmentation,
    read_card,
    save_classifier,
)
from monai_sal_app.models import checkpoint as checkpoint_module

# Small widths so that every network runs in well under a second on the CPU.
GRADCAM_LAYER = {
    "densenet121": "class_layers.relu",
    "densenet169": "class_layers.relu",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "resnet101": "layer4",
    "resnet152": "layer4",
    "conv5fc3": "features",
}
POOLING = (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd)


def input_size(arch: str, spatial_dims: int) -> tuple[int, ...]:
    # DenseNet halves the grid 5 times (conv0, pool0, 3 transitions): 16 px would end at 0 px.
    side = 32 if spatial_dims == 2 or arch.startswith("densenet") else 16
    return (side,) * spatial_dims


def random_images(shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- factory


def test_tuple_lists_the_required_architectures():
    assert {"densenet121", "resnet18", "conv5fc3"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ["densenet121", "resnet18", "conv5fc3"])
def test_default_widths_build_in_2d(arch):
    model = build_classifier(arch, 2).eval()
    with torch.no_grad():
        assert model(random_images((2, 1, 32, 32))).shape == (2, 2)


def last_feature_map_module(model: nn.Module, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(name, logits): the name follows the Grad-CAM rule, the last module to finish whose output
    is (N, K, *spatial) and that is not a pooling layer."""
    finished: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name:

            def hook(module, inputs, output, name=name):
                if isinstance(output, torch.Tensor) and output.ndim == x.ndim and not isinstance(module, POOLING):
                    finished.append(name)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return finished[-1], logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_gives_logits_and_its_gradcam_layer(arch, dims):
    torch.manual_seed(0)
    model = build_classifier(arch, dims, in_channels=2, num_classes=3, **TINY_BACKBONES[arch]).eval()
    x = random_images((2, 2, *input_size(arch, dims)))
    layer, logits = last_feature_map_module(model, x)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    assert layer == GRADCAM_LAYER[arch]


def test_conv5fc3_layout(dims):
    model = Conv5FC3(dims, in_channels=1, num_classes=4, channels=(4, 4, 8, 8, 16), dropout=0.25)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    max_pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
    kinds = [type(m) for m in model.features]
    assert kinds == [nn.Sequential, max_pool] * 4 + [nn.Sequential]
    blocks = model.features[::2]
    assert [b[0].out_channels for b in blocks] == [4, 4, 8, 8, 16]
    for block in blocks:
        assert isinstance(block[0], conv) and block[0].kernel_size == (3,) * dims and block[0].padding == (1,) * dims
        assert isinstance(block[1], (nn.BatchNorm2d, nn.BatchNorm3d)) and isinstance(block[2], nn.ReLU)
    assert model.pool.output_size in (2, (2,) * dims)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 2**dims, 1300), (1300, 50), (50, 4)]
    assert isinstance(model.classifier[0], nn.Flatten) and model.classifier[1].p == 0.25
    # Smallest supported input and an odd size both work.
    model.eval()
    for side in (16, 23):
        assert model(random_images((1, 1, *(side,) * dims))).shape == (1, 4)


def test_conv5fc3_rejects_inputs_below_16_px():
    model = Conv5FC3(2, channels=TINY_CHANNELS).eval()
    with pytest.raises(ValueError, match="16 px"):
        model(random_images((1, 1, 15, 32)))


@pytest.mark.parametrize("dims", [2, 3])
def test_conv5fc3_with_three_pools_keeps_the_last_two_blocks_on_an_eighth_of_the_input(dims):
    # The default CT model's backbone: Grad-CAM's grid (the features' output) is 8 per axis at 64.
    side = 64 if dims == 2 else 32
    for pools, grid in ((4, side // 16), (3, side // 8)):
        model = Conv5FC3(dims, channels=TINY_CHANNELS, pools=pools).eval()
        assert sum(isinstance(m, (nn.MaxPool2d, nn.MaxPool3d)) for m in model.features) == pools
        assert model.features(random_images((1, 1, *(side,) * dims))).shape[2:] == (grid,) * dims
        assert isinstance(model.features[-1], nn.Sequential)  # the last module is a conv block
        assert model(random_images((2, 1, *(side,) * dims))).shape == (2, 2)
    with pytest.raises(ValueError, match="8 px"):
        Conv5FC3(dims, channels=TINY_CHANNELS, pools=3).eval()(random_images((1, 1, *(7,) * dims)))
    for pools in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="pools must be an int from 1 to 4"):
            Conv5FC3(dims, pools=pools)


@pytest.mark.parametrize("dims", [2, 3])
def test_conv5fc3_with_a_strided_first_block_halves_a_large_input_at_once(dims):
    # The default CT model's backbone: 64^3 in, the first convolution at stride 2, two pools: 8^3.
    side = 64 if dims == 2 else 32
    model = Conv5FC3(dims, channels=TINY_CHANNELS, pools=2, first_stride=2).eval()
    first = model.features[0][0]
    assert first.stride == (2,) * dims and first.kernel_size == (3,) * dims
    assert all(block[0].stride == (1,) * dims for block in model.features[1:] if isinstance(block, nn.Sequential))
    assert model.features(random_images((1, 1, *(side,) * dims))).shape[2:] == (side // 8,) * dims
    assert model(random_images((2, 1, *(side,) * dims))).shape == (2, 2)
    with pytest.raises(ValueError, match="8 px"):
        model(random_images((1, 1, *(7,) * dims)))
    for stride in (0, 3, True):
        with pytest.raises(ValueError, match="first_stride must be 1 or 2"):
            Conv5FC3(dims, first_stride=stride)


def test_factory_rejects_bad_arguments():
    with pytest.raises(ValueError, match="densenet121.*resnet18.*conv5fc3"):
        build_classifier("vgg16", 2)
    with pytest.raises(ValueError, match="2 or 3"):
        build_classifier("resnet18", 1)
    with pytest.raises(ValueError, match="pretrained"):
        build_classifier("resnet18", 2, pretrained=True)
    with pytest.raises(ValueError, match="5 positive"):
        build_classifier("conv5fc3", 2, channels=(4, 8))


# ----------------------------------------------------------------------------- losses


def hand_loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    onehot = torch.zeros_like(logits).scatter_(1, labels[:, None], 1.0)
    softmax = logits.exp() / logits.exp().sum(dim=1, keepdim=True)

    def smooth(d):
        d = d.abs()
        return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()

    return {
        "ce": -(softmax.log() * onehot).sum(dim=1).mean(),
        "l1": (logits - onehot).abs().mean(),
        "l1norm": (softmax - onehot).abs().mean(),
        "smoothl1": smooth(logits - onehot),
        "smoothl1norm": smooth(softmax - onehot),
        "msenorm": ((softmax - onehot) ** 2).mean(),
    }[name]


@pytest.mark.parametrize("name", LOSSES)
def test_loss_matches_its_formula_and_gradient(name):
    generator = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(6, 3, generator=generator, dtype=torch.float64)).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    value = get_loss(name)(logits, labels)
    expected = hand_loss(name, logits, labels)
    assert value.ndim == 0
    torch.testing.assert_close(value, expected)
    (grad,) = torch.autograd.grad(value, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)
    assert grad.abs().sum() > 0


def test_losses_are_zero_or_minimal_at_the_target():
    labels = torch.tensor([1, 0])
    onehot = F.one_hot(labels, 2).float()
    assert get_loss("l1")(onehot, labels) == 0
    assert get_loss("smoothl1")(onehot, labels) == 0
    confident = 50 * (2 * onehot - 1)
    for name in ("ce", "l1norm", "smoothl1norm", "msenorm"):
        assert get_loss(name)(confident, labels) < 1e-6


def test_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="ce, l1, l1norm"):
        get_loss("focal")
    with pytest.raises(ValueError, match=r"\(N,\)"):
        get_loss("ce")(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        get_loss("l1")(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="long"):
        get_loss("msenorm")(torch.zeros(4, 2), torch.zeros(4))


# ----------------------------------------------------------------------------- augmentations


def batch_for(spatial_dims: int, n: int = 6, channels: int = 2) -> torch.Tensor:
    """Positive intensities (0.5-1.5) so that erased voxels (0) are recognisable."""
    size = (32, 32) if spatial_dims == 2 else (16, 20, 24)
    return 0.5 + random_images((n, channels, *size), seed=7)


@pytest.mark.parametrize("transform", [Noise(), Erasing(p=1.0), Smoothing()], ids=["noise", "erasing", "smoothing"])
def test_augmentation_changes_every_image_keeps_shape_and_input(transform, dims):
    x = batch_for(dims)
    original = x.clone()
    out = transform(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(x, original, rtol=0, atol=0)
    for i in range(x.shape[0]):
        assert not torch.equal(out[i], x[i])


def test_flip_mirrors_each_axis_independently_or_not_at_all(dims):
    x = batch_for(dims, n=16)
    out = Flip()(x, torch.Generator().manual_seed(3))
    seen = set()
    for i in range(x.shape[0]):
        matches = [
            axes
            for axes in itertools.product([False, True], repeat=dims)
            if torch.equal(out[i], x[i].flip([1 + a for a, flip in enumerate(axes) if flip]) if any(axes) else x[i])
        ]
        assert len(matches) == 1, i  # exactly one combination of axis flips reproduces the image
        seen.add(matches[0])
    assert len(seen) > 2  # different images get different flips
    assert torch.equal(Flip(p=0.0)(x, torch.Generator()), x)
    assert torch.equal(Flip(p=1.0)(x, torch.Generator()), x.flip(list(range(2, 2 + dims))))


@pytest.mark.parametrize(
    ("spec", "kind", "attribute", "value"),
    [("croppad:3", CropPad, "max_shift", 3), ("noise:0.05", Noise, "max_std", 0.05), ("flip:0.25", Flip, "p", 0.25)],
)
def test_augmentation_spec_sets_its_parameter(spec, kind, attribute, value):
    transform = parse_augmentation(spec)
    assert isinstance(transform, kind) and getattr(transform, attribute) == value
    x = batch_for(2)
    torch.testing.assert_close(build_augmentation([spec], seed=4)(x), transform(x, torch.Generator().manual_seed(4)))


def test_noise_scale_is_at_most_max_std(dims):
    x = batch_for(dims, n=8)
    residual = Noise(max_std=0.1)(x, torch.Generator().manual_seed(1)) - x
    std = residual.flatten(1).std(dim=1)
    assert (std > 0).all() and (std < 0.11).all()
    assert residual.flatten(1).mean(dim=1).abs().max() < 0.01
    assert std.max() - std.min() > 0.01  # s is drawn per image


def test_erasing_zeros_one_box_in_all_channels(dims):
    x = batch_for(dims, n=8)
    out = Erasing(p=1.0)(x, torch.Generator().manual_seed(2))
    volume = x[0, 0].numel()
    for i in range(x.shape[0]):
        erased = out[i] == 0
        assert torch.equal(erased[0], erased[1])  # same box in every channel
        assert torch.equal(out[i][~erased], x[i][~erased])
        coords = torch.nonzero(erased[0])
        low, high = coords.min(dim=0).values, coords.max(dim=0).values
        box = tuple(slice(int(a), int(b) + 1) for a, b in zip(low, high))
        assert erased[0][box].all() and erased[0].sum() == erased[0][box].numel()  # a full box
        assert 0.015 <= erased[0].sum() / volume <= 0.36  # 0.02-0.33 up to rounding of the sides


def test_erasing_probability():
    x = batch_for(2, n=200, channels=1)
    never = Erasing(p=0.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(never, x)
    half = Erasing(p=0.5)(x, torch.Generator().manual_seed(0))
    erased_fraction = (half == 0).flatten(1).any(dim=1).float().mean()
    assert 0.35 < erased_fraction < 0.65


def test_croppad_is_a_zero_filled_translation_within_max_shift(dims):
    x = batch_for(dims, n=8)
    original = x.clone()
    out = CropPad(max_shift=10)(x, torch.Generator().manual_seed(4))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, original) and not torch.equal(out, x)
    spatial = x.shape[2:]
    for i in range(x.shape[0]):
        nonzero = torch.nonzero(out[i, 0] != 0)
        low = nonzero.min(dim=0).values
        high = nonzero.max(dim=0).values
        # Content starts at +shift (shift >= 0) or ends at size - 1 + shift (shift < 0).
        shift = [int(a) if a > 0 else int(b) - (n - 1) for a, b, n in zip(low, high, spatial)]
        assert all(abs(s) <= 10 for s in shift)
        expected = torch.zeros_like(x[i])
        source = tuple(slice(max(-s, 0), n - max(s, 0)) for s, n in zip(shift, spatial))
        target = tuple(slice(max(s, 0), n - max(-s, 0)) for s, n in zip(shift, spatial))
        expected[(slice(None), *target)] = x[i][(slice(None), *source)]
        assert torch.equal(out[i], expected)


def test_croppad_shift_larger_than_image_gives_zeros():
    x = batch_for(2, n=20, channels=1)[..., :4, :4]
    out = CropPad(max_shift=10)(x, torch.Generator().manual_seed(0))
    fully_out = (out == 0).flatten(1).all(dim=1)
    assert fully_out.any() and not fully_out.all()


def test_smoothing_kernel_is_a_normalised_separable_gaussian(dims):
    size = (15,) * dims
    impulse = torch.zeros(3, 1, *size, dtype=torch.float64)
    impulse[(slice(None), 0, *(7,) * dims)] = 1.0
    response = Smoothing(max_sigma=1.0)(impulse, torch.Generator().manual_seed(5))
    for i in range(3):
        r = response[i, 0]
        torch.testing.assert_close(r.sum(), torch.tensor(1.0, dtype=torch.float64))
        for axis in range(dims):
            torch.testing.assert_close(r, r.flip(axis))  # symmetric
        marginal = r.sum(dim=tuple(range(1, dims)))  # 1D kernel along axis 0
        outer = marginal
        for _ in range(dims - 1):
            outer = outer[..., None] * marginal
        torch.testing.assert_close(r, outer)  # separable, same kernel on every axis
        assert r.max() == r[(7,) * dims] and r.max() < 1.0
        kernel = marginal[7 - 3 : 7 + 4]  # radius 3 = ceil(3 * max_sigma)
        ratio = kernel[4] / kernel[3]  # exp(-1 / (2 sigma^2))
        assert ratio <= math.exp(-0.5) + 1e-12  # sigma <= 1
        torch.testing.assert_close(kernel[5] / kernel[3], ratio**4)  # Gaussian: k(2) / k(0) = (k(1) / k(0))^4
    # Same seed and batch size -> same sigmas: a random image is blurred by the same kernels,
    # applied along every axis with replicated edges.
    images = random_images((3, 1, *size), seed=6).double()
    blurred = Smoothing(max_sigma=1.0)(images, torch.Generator().manual_seed(5))
    for i in range(3):
        kernel = response[i, 0].sum(dim=tuple(range(1, dims))).numpy()
        expected = images[i, 0].numpy()
        for axis in range(dims):
            expected = ndimage.correlate1d(expected, kernel, axis=axis, mode="nearest")
        torch.testing.assert_close(blurred[i, 0], torch.from_numpy(expected))
    # A constant image stays constant (normalised kernel, replicated edges).
    constant = torch.full((2, 1, *size), 3.0)
    torch.testing.assert_close(Smoothing()(constant, torch.Generator().manual_seed(0)), constant)


@pytest.mark.parametrize("names", [[name] for name in AUGMENTATIONS] + [list(AUGMENTATIONS)], ids=lambda n: "+".join(n))
def test_build_augmentation_is_reproducible_from_seed(names, dims):
    x = batch_for(dims)
    original = x.clone()
    first, second, other = (
        build_augmentation(names, seed=3),
        build_augmentation(names, seed=3),
        build_augmentation(names, seed=4),
    )
    a1, a2 = first(x), first(x)
    b1, b2 = second(x), second(x)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same seed, same sequence
    assert not torch.equal(a1, a2)  # the generator advances between batches
    assert not torch.equal(other(x), a1)
    assert torch.equal(x, original)
    assert a1.shape == x.shape and a1.dtype == x.dtype


def test_build_augmentation_keeps_float64():
    x = batch_for(3).double()
    assert build_augmentation(list(AUGMENTATIONS))(x).dtype == torch.float64


def test_build_augmentation_rejects_bad_input():
    assert torch.equal(build_augmentation([])(batch_for(2)), batch_for(2))
    with pytest.raises(ValueError, match="noise, erasing, croppad, smoothing, flip"):
        build_augmentation(["noise", "rotate"])
    with pytest.raises(ValueError, match="'croppad:x'.*max_shift"):
        build_augmentation(["croppad:x"])
    with pytest.raises(ValueError, match="'flip:2'.*p must be in"):
        build_augmentation(["flip:2"])
    with pytest.raises(TypeError, match="list"):
        build_augmentation("noise")
    with pytest.raises(TypeError, match="float tensor"):
        build_augmentation(["noise"])(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="float tensor"):
        build_augmentation(["noise"])(torch.zeros(8, 8))


# ----------------------------------------------------------------------------- device


def test_default_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device().type == "cuda"


# ----------------------------------------------------------------------------- checkpoints


# Optional card fields, filled in so that a checkpoint round trip has them to keep.
OPTIONAL_FIELDS = {
    "loss": "ce",
    "augmentations": ["noise"],
    "data": {"dataset": "synthetic"},
    "metrics": {"val_auc": 0.9},
}


def trained_looking(card: ModelCard) -> nn.Module:
    """A network built from ``card`` with non-default weights and BatchNorm statistics."""
    torch.manual_seed(1)
    arch, dims, channels, classes = card.architecture, card.spatial_dims, card.in_channels, card.num_classes
    model = build_classifier(arch, dims, channels, classes, **card.arch_kwargs)
    model.train()
    with torch.no_grad():
        model(random_images((4, card.in_channels, *card.input_size)))  # moves the running stats
    return model.eval()


@pytest.mark.parametrize(
    "card",
    [
        tiny_card(decision_threshold=0.3, **OPTIONAL_FIELDS),
        tiny_card(3, architecture="resnet18", arch_kwargs={"block_inplanes": [4, 4, 8, 8]}, **OPTIONAL_FIELDS),
    ],
    ids=["conv5fc3-2d", "resnet18-3d"],
)
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, card):
    model = trained_looking(card)
    path = save_classifier(model, tmp_path / "model.pt", card)
    assert path == tmp_path / "model.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]

    loaded, loaded_card = load_classifier(path, device="cpu")
    assert not loaded.training
    assert next(loaded.parameters()).device == torch.device("cpu")
    x = random_images((3, 1, *card.input_size), seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded_card == card == read_card(path)
    assert loaded_card.monai_sal_version == monai_sal_app.__version__
    assert datetime.datetime.fromisoformat(loaded_card.created).tzinfo is not None
    assert json.loads((tmp_path / "model.json").read_text()) == card.to_dict()
    # Plain tensors only: loadable with weights_only=True.
    state = torch.load(path, weights_only=True)
    assert set(state) == set(model.state_dict())


def test_card_fills_defaults_for_optional_fields():
    card = ModelCard.from_dict(
        {
            "architecture": "conv5fc3",
            "spatial_dims": 2,
            "in_channels": 1,
            "num_classes": 3,
            "labels": ["a", "b", "c"],
            "input_size": [32, 32],
        }
    )
    assert card.augmentations == () and card.metrics == {} and card.decision_threshold is None
    assert card.arch_kwargs == {} and card.preprocessing.startswith("per-image min-max")


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_classifier(tmp_path / "nothing.pt")
    save_classifier(trained_looking(tiny_card()), tmp_path / "model.pt", tiny_card())
    (tmp_path / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_classifier(tmp_path / "model.pt")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_raise_checkpoint_error(tmp_path, damage):
    path = save_classifier(trained_looking(tiny_card()), tmp_path / "model.pt", tiny_card())
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.pt"):
        load_classifier(path, device="cpu")


def test_pickled_objects_are_refused(tmp_path):
    path = save_classifier(trained_looking(tiny_card()), tmp_path / "model.pt", tiny_card())
    torch.save({"weights": nn.Linear(2, 2)}, path)  # a whole module: needs pickled code to load
    with pytest.raises(CheckpointError, match="model.pt"):
        load_classifier(path, device="cpu")


def test_corrupt_card_raises_checkpoint_error(tmp_path):
    path = save_classifier(trained_looking(tiny_card()), tmp_path / "model.pt", tiny_card())
    (tmp_path / "model.json").write_text('{"architecture": "conv5fc3", ')
    with pytest.raises(CheckpointError, match="model.json"):
        load_classifier(path, device="cpu")
    (tmp_path / "model.json").write_text('{"architecture": "conv5fc3"}')
    with pytest.raises(CheckpointError, match="spatial_dims"):
        load_classifier(path, device="cpu")


@pytest.mark.parametrize(
    "change",
    [
        {"num_classes": 3, "labels": ["a", "b", "c"]},
        {"arch_kwargs": {"channels": [4, 4, 8, 8, 16]}},
        {"in_channels": 2},
        {"architecture": "resnet18", "arch_kwargs": {}},
        {"architecture": "vgg"},
    ],
    ids=["classes", "widths", "channels", "arch", "unknown-arch"],
)
def test_weights_not_matching_the_card_raise_checkpoint_error(tmp_path, change):
    path = save_classifier(trained_looking(tiny_card()), tmp_path / "model.pt", tiny_card())
    card = json.loads((tmp_path / "model.json").read_text())
    card.update(change)
    (tmp_path / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="model"):
        load_classifier(path, device="cpu")


def test_save_refuses_a_card_that_does_not_describe_the_model(tmp_path):
    model = trained_looking(tiny_card())
    with pytest.raises(ValueError, match="does not describe"):
        save_classifier(model, tmp_path / "model.pt", tiny_card(num_classes=3, labels=["a", "b", "c"]))
    with pytest.raises(TypeError, match="ModelCard"):
        save_classifier(model, tmp_path / "model.pt", {"architecture": "conv5fc3"})
    with pytest.raises(TypeError):
        save_classifier(model, tmp_path / "model.pt", tiny_card(data={"split": {1, 2}}))  # a set is not JSON
    with pytest.raises(ValueError, match=".json"):
        save_classifier(model, tmp_path / "model.json", tiny_card())
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    card = tiny_card()
    path = save_classifier(trained_looking(card), tmp_path / "model.pt", card)
    before = path.read_bytes()

    def half_write_then_fail(obj, f):
        f.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_write_then_fail)
    other = tiny_conv5fc3(seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_classifier(other, path, card)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]  # no temporary files left
    monkeypatch.undo()
    load_classifier(path, device="cpu")
