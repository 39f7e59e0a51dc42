"""The WILDCAT head: its two poolings on hand-made tensors, every backbone in 2D and 3D, the
``wildcat`` method, checkpoints and model cards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONES, TINY_WILDCAT_HEAD, images_for, tiny_cnn, tiny_conv5fc3, tiny_wildcat
from torch import nn

from monai_sal_app.models.card import CardError
from monai_sal_app.models.checkpoint import CheckpointError, load_classifier, save_classifier
from monai_sal_app.models.factory import ARCHITECTURES, build_classifier
from monai_sal_app.models.wildcat import ClassWisePool, WildcatClassifier, WildcatPool, positions_to_keep
from monai_sal_app.saliency import available_methods, explain

# ------------------------------------------------------------------------------ the poolings

# One class map of 10 positions with the values 0..9, shuffled: top 2 = {9, 8}, bottom 3 = {0, 1, 2}.
VALUES = torch.tensor([3.0, 9.0, 0.0, 5.0, 8.0, 1.0, 7.0, 2.0, 6.0, 4.0])


def one_map(spatial_dims: int) -> torch.Tensor:
    """VALUES as a (1, 1, 2, 5) map or a (1, 1, 1, 2, 5) volume."""
    return VALUES.reshape(1, 1, *([1] * (spatial_dims - 2)), 2, 5)


@pytest.mark.parametrize(
    ("kmax", "kmin", "alpha", "expected"),
    [
        (2, 0, 0.7, (9 + 8) / 2),  # no bottom term: the top mean, not halved
        (2, 3, 0.0, (9 + 8) / 2),  # alpha = 0: no bottom term either, not halved (the reference halves)
        (2, 3, 1.0, ((9 + 8) / 2 + (0 + 1 + 2) / 3) / 2),  # the reference code's /2
        (2, 3, 0.5, ((9 + 8) / 2 + 0.5 * (0 + 1 + 2) / 3) / 2),
        (2, None, 1.0, ((9 + 8) / 2 + (0 + 1) / 2) / 2),  # kmin None = kmax
        (0.2, None, 0.7, ((9 + 8) / 2 + 0.7 * (0 + 1) / 2) / 2),  # fractions: round(0.2 x 10) = 2
        (0.25, 0.04, 1.0, ((9 + 8) / 2 + 0 / 1) / 2),  # round(2.5) = 2 (to even); 0.4 -> at least 1
        (1, 1, -1.0, (9 + -1.0 * 0) / 2),  # counts of 1; alpha may be negative
        (50, 50, 1.0, (4.5 + 4.5) / 2),  # a count beyond the positions takes them all
    ],
)
def test_wildcat_pool_on_a_hand_made_map(dims, kmax, kmin, alpha, expected):
    pooled = WildcatPool(kmax, kmin, alpha)(one_map(dims))
    assert pooled.shape == (1, 1)
    assert pooled.item() == pytest.approx(expected)


def test_positions_to_keep_rounds_fractions_and_caps_counts():
    assert positions_to_keep(0.2, 10) == 2
    assert positions_to_keep(0.2, 1) == 1  # at least one position
    assert positions_to_keep(0.5, 7) == 4  # round(3.5) = 4
    assert positions_to_keep(3, 2) == 2
    assert positions_to_keep(0, 10) == 0


def test_wildcat_pool_gradient_reaches_only_the_selected_positions(dims):
    x = one_map(dims).clone().requires_grad_(True)
    WildcatPool(kmax=2, kmin=3, alpha=0.5)(x).sum().backward()
    grad = x.grad.flatten()
    selected_top, selected_bottom = {1, 4}, {2, 5, 7}  # where 9, 8 and 0, 1, 2 are
    for position in range(10):
        if position in selected_top:
            assert grad[position].item() == pytest.approx(0.5 / 2)  # d/dx of (mean top 2) / 2
        elif position in selected_bottom:
            assert grad[position].item() == pytest.approx(0.5 * (1 / 3) / 2)
        else:
            assert grad[position].item() == 0.0


def test_wildcat_pool_pools_each_image_and_class_on_its_own(dims):
    x = torch.randn(3, 4, *([5] * dims))
    pooled = WildcatPool(kmax=3, kmin=2, alpha=0.6)(x)
    flat = x.flatten(2)
    top = flat.sort(dim=-1, descending=True).values
    expected = (top[..., :3].mean(-1) + 0.6 * top[..., -2:].mean(-1)) / 2
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kmax": 0}, "kmax must be a fraction in"),
        ({"kmax": 1.5}, "kmax must be a fraction in"),
        ({"kmax": -0.2}, "kmax must be"),
        ({"kmax": True}, "kmax must be"),
        ({"kmax": 2, "kmin": -1}, "kmin must be"),
        ({"kmax": 2, "alpha": float("nan")}, "alpha must be a real number"),
    ],
)
def test_wildcat_pool_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WildcatPool(**kwargs)


def test_class_wise_pool_averages_each_class_contiguous_block(dims):
    x = torch.randn(2, 3 * 4, *([3] * dims))
    pooled = ClassWisePool(4)(x)
    assert pooled.shape == (2, 3, *([3] * dims))
    for c in range(3):
        torch.testing.assert_close(pooled[:, c], x[:, 4 * c : 4 * c + 4].mean(dim=1))
    with pytest.raises(ValueError, match=r"ClassWisePool\(5\) needs"):
        ClassWisePool(5)(x)
    with pytest.raises(ValueError, match="maps .* integer >= 1"):
        ClassWisePool(0)


# ------------------------------------------------------------------------- the head on backbones


def test_every_architecture_has_a_tiny_backbone_in_conftest():
    assert set(TINY_BACKBONES) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_wildcat_head_on_every_backbone(dims, arch):
    side = 32
    head = {"name": "wildcat", "kmax": 0.5, "kmin": 1, "alpha": 0.7, "maps": 3}
    torch.manual_seed(0)
    model = build_classifier(arch, dims, num_classes=2, head=head, **TINY_BACKBONES[arch]).eval()
    assert isinstance(model, WildcatClassifier)
    assert [name for name, _ in model.named_children()] == ["features", "classifier", "class_pool", "spatial_pool"]
    conv = model.classifier
    assert isinstance(conv, nn.Conv2d if dims == 2 else nn.Conv3d)
    assert conv.kernel_size == (1,) * dims and conv.bias is not None and conv.out_channels == 2 * 3
    x = images_for(dims, n=2, side=side)
    with torch.no_grad():
        features = model.features(x)
        class_maps = model.class_maps(x)
        logits = model(x)
    assert features.ndim == dims + 2 and features.min() >= 0  # after the backbone's last activation
    assert class_maps.shape == (2, 2, *features.shape[2:])
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, model.spatial_pool(class_maps))
    maps = explain(model, x, "wildcat", target=[0, 1])
    assert maps.shape == (2, 1, *x.shape[2:])  # on the input grid


def test_wildcat_maps_are_the_target_class_maps_upsampled(dims):
    model, x = tiny_wildcat(dims).eval(), images_for(dims, n=3, side=32)
    target = torch.tensor([1, 0, 1])
    maps = explain(model, x, "wildcat", target=target)
    with torch.no_grad():
        class_maps = model.class_maps(x)
    mode = "bilinear" if dims == 2 else "trilinear"
    for i in range(3):
        picked = class_maps[i : i + 1, int(target[i]) : int(target[i]) + 1]
        expected = F.interpolate(picked, size=x.shape[2:], mode=mode, align_corners=False)
        torch.testing.assert_close(maps[i : i + 1], expected)
    # the default target is the predicted class, and chunks give the same maps
    with torch.no_grad():
        predicted = model(x).argmax(1)
    torch.testing.assert_close(
        explain(model, x, "wildcat", batch_size=1), explain(model, x, "wildcat", target=predicted)
    )


def test_wildcat_contrast_subtracts_the_other_classes_mean_map(dims):
    model, x = tiny_wildcat(dims, num_classes=3).eval(), images_for(dims, n=2, side=32)
    target = torch.tensor([2, 0])
    with torch.no_grad():
        class_maps = model.class_maps(x)
    mode = "bilinear" if dims == 2 else "trilinear"
    contrast = explain(model, x, "wildcat", target=target, contrast=True)
    for i, (t, others) in enumerate(((2, [0, 1]), (0, [1, 2]))):
        evidence = class_maps[i : i + 1, t : t + 1] - class_maps[i : i + 1, others].mean(dim=1, keepdim=True)
        expected = F.interpolate(evidence, size=x.shape[2:], mode=mode, align_corners=False)
        torch.testing.assert_close(contrast[i : i + 1], expected)
    # with two classes, the two targets' contrast maps are each other's negatives
    two = tiny_wildcat(dims).eval()
    one, zero = (explain(two, x, "wildcat", target=t, contrast=True) for t in (1, 0))
    torch.testing.assert_close(one, -zero)
    assert not torch.allclose(one, explain(two, x, "wildcat", target=1))


@pytest.mark.parametrize("contrast", ["maybe", 1, None])
def test_wildcat_contrast_must_be_a_bool(contrast):
    with pytest.raises(TypeError, match=f"contrast must be a bool, got {contrast!r}"):
        explain(tiny_wildcat(2), images_for(2, n=1, side=32), "wildcat", contrast=contrast)


def test_wildcat_method_is_refused_for_a_model_without_the_head():
    with pytest.raises(
        ValueError, match=r"method 'wildcat' cannot explain this Sequential: it needs a model with a WILDCAT head"
    ):
        explain(tiny_cnn(2), images_for(2), "wildcat")
    assert "wildcat" not in available_methods(tiny_cnn(2))
    assert "wildcat" in available_methods(tiny_wildcat(2))
    assert set(available_methods(tiny_wildcat(2))) == set(available_methods())


def test_wildcat_leaves_no_trace_when_it_fails_inside():
    model = tiny_wildcat(2).train()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(module, inputs, output):
        raise RuntimeError("boom")

    handle = model.features.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            explain(model, images_for(2, n=2, side=32), "wildcat", target=0)
    finally:
        handle.remove()
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_gradcam_on_a_wildcat_model_uses_the_backbone_features(dims):
    from monai_sal_app.saliency.gradcam import _capture_layer

    model, x = tiny_wildcat(dims).eval(), images_for(dims, n=2, side=32)
    _, name, activation = _capture_layer(model, None, dims, x)
    assert name == "features"
    assert activation.shape[1] == 8  # the last conv block's channels, not the class maps


# --------------------------------------------------------------------------- checkpoints, cards


def test_wildcat_checkpoint_round_trip(tmp_path, dims):
    from conftest import tiny_card

    model = tiny_wildcat(dims).eval()
    card = tiny_card(dims, head=TINY_WILDCAT_HEAD)
    path = save_classifier(model, tmp_path / "wildcat.pt", card)
    loaded, read = load_classifier(path, device="cpu")
    assert isinstance(loaded, WildcatClassifier)
    assert read.head == {"name": "wildcat", "kmax": 0.25, "kmin": None, "alpha": 0.7, "maps": 2}
    assert loaded.spatial_pool.kmax == 0.25 and loaded.class_pool.maps == 2
    x = images_for(dims, n=2, side=32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_card_without_the_head_does_not_load_wildcat_weights(tmp_path):
    from conftest import tiny_card

    model = tiny_wildcat(2).eval()
    with pytest.raises(ValueError, match="does not describe this model's state_dict"):
        save_classifier(model, tmp_path / "m.pt", tiny_card(2))
    path = save_classifier(model, tmp_path / "m.pt", tiny_card(2, head=TINY_WILDCAT_HEAD))
    plain = tiny_conv5fc3(2)
    torch.save(plain.state_dict(), path)  # the weights of a plain classifier under a WILDCAT card
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_classifier(path, device="cpu")


@pytest.mark.parametrize(
    ("head", "match"),
    [
        ({"name": "cam"}, "unknown head 'cam'"),
        ({"name": "wildcat", "kmax": 2.5}, "kmax must be"),
        ({"name": "wildcat", "top": 3}, r"unknown WILDCAT option\(s\) \['top'\]"),
        ("wildcat", "must be a JSON object"),
    ],
)
def test_a_bad_head_in_a_card_is_refused_naming_the_field(head, match):
    from conftest import tiny_card

    with pytest.raises(CardError, match=match) as raised:
        tiny_card(2, head=head)
    assert raised.value.field == "head"


def test_head_defaults_are_filled_in_and_written_in_the_card():
    from conftest import tiny_card

    card = tiny_card(2, head={"name": "wildcat"})
    assert card.head == {"name": "wildcat", "kmax": 0.2, "kmin": None, "alpha": 0.7, "maps": 8}
    assert card.to_dict()["head"] == card.head
    assert tiny_card(2).to_dict()["head"] is None
