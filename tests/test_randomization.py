"""evaluation/randomization.py: the blocks of every architecture, cascading and independent states,
the user's model left alone, and the known result of Adebayo et al. (2018) on a trained ResNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONES, images_for, tiny_resnet, trained_small_resnet
from scipy import stats
from torch import nn

from monai_sal_app import explain
from monai_sal_app.data.shepp_logan import shepp_logan_phantom
from monai_sal_app.evaluation.randomization import (
    judged_states,
    model_randomization,
    randomization_blocks,
    randomized_models,
    reinitialise_block,
    retention_verdict,
)
from monai_sal_app.metrics.similarity import random_pair_baseline, similarity
from monai_sal_app.models.factory import ARCHITECTURES, build_classifier

DENSENET_BLOCKS = [
    "class_layers", "features.norm5", "features.denseblock4", "features.transition3", "features.denseblock3",
    "features.transition2", "features.denseblock2", "features.transition1", "features.denseblock1",
    "features.norm0", "features.conv0",
]  # fmt: skip
RESNET_BLOCKS = ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
EXPECTED_BLOCKS = {
    "densenet121": DENSENET_BLOCKS,
    "densenet169": DENSENET_BLOCKS,
    "resnet18": RESNET_BLOCKS,
    "resnet34": RESNET_BLOCKS,
    "resnet50": RESNET_BLOCKS,
    "resnet101": RESNET_BLOCKS,
    "resnet152": RESNET_BLOCKS,
    "conv5fc3": [
        "classifier.6", "classifier.4", "classifier.2", "features.8", "features.6", "features.4", "features.2",
        "features.0",
    ],
}  # fmt: skip
ONE_METRIC = ("spearman",)  # the cheapest run where the metrics do not matter


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blocks_of_every_architecture(arch):
    model = build_classifier(arch, 2, **TINY_BACKBONES[arch])
    blocks = randomization_blocks(model)
    assert blocks == EXPECTED_BLOCKS[arch]
    modules = dict(model.named_modules())
    assert set(blocks) <= set(modules)
    assert all(next(modules[name].parameters(), None) is not None for name in blocks)
    last_linear = [name for name, m in modules.items() if isinstance(m, nn.Linear)][-1]
    assert last_linear == blocks[0] or last_linear.startswith(blocks[0] + ".")  # logits first


# With a WILDCAT head: its 1x1 convolution to the class maps first, then the backbone's blocks.
WILDCAT_BLOCKS = {
    "densenet121": ["classifier", *DENSENET_BLOCKS[1:]],
    "resnet18": ["classifier", *[f"features.{name}" for name in RESNET_BLOCKS[1:]]],
    "conv5fc3": ["classifier", "features.8", "features.6", "features.4", "features.2", "features.0"],
}


@pytest.mark.parametrize("arch", WILDCAT_BLOCKS)
def test_blocks_of_a_wildcat_head(arch):
    model = build_classifier(arch, 2, head={"name": "wildcat"}, **TINY_BACKBONES[arch])
    assert randomization_blocks(model) == WILDCAT_BLOCKS[arch]


def perturbed(model: nn.Module) -> nn.Module:
    """``model`` with noise added to every float parameter and buffer (variances kept positive), so
    that a re-initialisation changes every one of them, batch norm weights and statistics included."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                noise = 0.1 + torch.rand(tensor.shape, generator=generator)
                tensor.add_(noise if name.endswith("running_var") else noise * torch.sign(torch.randn_like(tensor)))
    return model


STATISTICS = ("running_mean", "running_var")  # batch-norm buffers, kept as trained unless reset


def changed_blocks(
    model: nn.Module, network: nn.Module, blocks: list[str], statistics_reset: bool = False
) -> list[str]:
    """The blocks in which every float tensor (batch-norm running statistics only when
    ``statistics_reset``) differs from ``model``'s; fails if a block is only partly changed or a
    tensor outside the blocks changed (the running statistics included)."""
    before, after = model.state_dict(), network.state_dict()
    changed = {key for key, value in before.items() if value.is_floating_point() and not torch.equal(value, after[key])}
    counted = {key for key in before if statistics_reset or not key.endswith(STATISTICS)}
    result = []
    for block in blocks:
        keys = {key for key in counted if key.startswith(block + ".") and before[key].is_floating_point()}
        assert keys <= changed or not keys & changed, f"block {block} only partly re-initialised"
        if keys <= changed:
            result.append(block)
            changed -= keys
    assert not changed, f"tensors outside the blocks changed: {sorted(changed)}"
    return result


@pytest.mark.parametrize("reset", [False, True], ids=["statistics_kept", "statistics_reset"])
def test_cascading_states_are_cumulative_and_independent_ones_single(reset):
    model = perturbed(tiny_resnet(2))
    cascading = {}
    for k, (name, network) in enumerate(randomized_models(model, mode="cascading", seed=3, reset_batch_norm=reset)):
        assert name == RESNET_BLOCKS[k]
        assert changed_blocks(model, network, RESNET_BLOCKS, reset) == RESNET_BLOCKS[: k + 1]
        cascading[name] = {key: v.clone() for key, v in network.get_submodule(name).state_dict().items()}
    for k, (name, network) in enumerate(randomized_models(model, mode="independent", seed=3, reset_batch_norm=reset)):
        assert changed_blocks(model, network, RESNET_BLOCKS, reset) == [RESNET_BLOCKS[k]]
        for key, value in network.get_submodule(name).state_dict().items():
            torch.testing.assert_close(value, cascading[name][key], rtol=0, atol=0)  # same draws in both modes


def test_reinitialisation_keeps_batch_norm_statistics_unless_reset_and_redraws_convolutions():
    model = perturbed(tiny_resnet(2))
    _, network = next(iter(randomized_models(model, blocks=["bn1", "conv1"])))
    bn = network.bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(bn.running_mean, model.bn1.running_mean) and torch.equal(bn.running_var, model.bn1.running_var)
    _, network = next(iter(randomized_models(model, blocks=["bn1", "conv1"], reset_batch_norm=True)))
    bn = network.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert torch.equal(network.conv1.weight, model.conv1.weight)  # the second state, not yet reached
    _, network = next(iter(randomized_models(model, blocks=["conv1", "bn1"], seed=1)))
    _, again = next(iter(randomized_models(model, blocks=["conv1", "bn1"], seed=1)))
    _, other = next(iter(randomized_models(model, blocks=["conv1", "bn1"], seed=2)))
    assert torch.equal(network.conv1.weight, again.conv1.weight)
    assert not torch.equal(network.conv1.weight, other.conv1.weight)


def test_the_users_model_and_rng_are_left_alone():
    model = perturbed(tiny_resnet(2)).train()
    model.fc.weight.requires_grad_(False)
    handle = model.layer1.register_forward_hook(lambda module, inputs, output: None)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    hooks = [(m, dict(m._forward_hooks), dict(m._backward_hooks)) for m in model.modules()]
    rng = torch.get_rng_state()
    images = images_for(2, n=4)
    unchanged = images.clone()
    for mode in ("cascading", "independent"):
        model_randomization(model, images, "gradient", mode=mode, metrics=ONE_METRIC)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [(m, dict(m._forward_hooks), dict(m._backward_hooks)) for m in model.modules()] == hooks
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(images, unchanged)
    handle.remove()


def test_reproducible_from_seed_and_given_original_maps_used():
    model, images = tiny_resnet(2), images_for(2, n=4)
    first = model_randomization(model, images, "gradient", seed=4, metrics=ONE_METRIC)
    again = model_randomization(model, images, "gradient", seed=4, metrics=ONE_METRIC)
    other = model_randomization(model, images, "gradient", seed=5, metrics=ONE_METRIC)
    np.testing.assert_array_equal(first.similarity["spearman"], again.similarity["spearman"])
    assert not np.array_equal(first.similarity["spearman"], other.similarity["spearman"])
    maps = explain(model, images, "gradient", target=first.target)
    given = model_randomization(model, images, "gradient", seed=4, metrics=ONE_METRIC, original_maps=maps)
    np.testing.assert_array_equal(given.similarity["spearman"], first.similarity["spearman"])
    assert given.target == first.target


def test_the_curves_equal_scipy_on_the_states_maps():
    model, images = tiny_resnet(2), images_for(2, n=4)
    metrics = ["spearman_abs", "spearman", "hog_spearman", "ssim"]
    result = model_randomization(model, images, "gradient", seed=2, metrics=metrics, n_pairs=6)
    trained = explain(model, images, "gradient", target=result.target)[:, 0].double().numpy()
    for k, (_, network) in enumerate(randomized_models(model, seed=2)):
        state = explain(network, images, "gradient", target=result.target)[:, 0].double().numpy()
        for i in range(len(images)):
            by_abs = stats.spearmanr(np.abs(trained[i]).ravel(), np.abs(state[i]).ravel())[0]
            signed = stats.spearmanr(trained[i].ravel(), state[i].ravel())[0]
            assert result.similarity["spearman_abs"][k, i] == pytest.approx(by_abs, abs=1e-12)
            assert result.similarity["spearman"][k, i] == pytest.approx(signed, abs=1e-12)
        for metric in ("hog_spearman", "ssim"):  # ranked once per map, or compared pair by pair: the same
            np.testing.assert_allclose(result.similarity[metric][k], similarity(trained, state, metric), atol=1e-12)
    for metric in metrics:
        direct = random_pair_baseline(trained, metric, n_pairs=6, seed=2, groups=np.array(result.target))
        np.testing.assert_allclose(result.baseline[metric]["values"], direct["values"], atol=1e-12)


def test_postprocess_steps_apply_to_every_map_and_are_checked_first():
    model, images = tiny_resnet(2), images_for(2, n=4)
    of_abs = model_randomization(model, images, "gradient", seed=4, metrics=["spearman_abs"])
    maps = explain(model, images, "gradient", target=of_abs.target)
    abs_first = model_randomization(
        model, images, "gradient", seed=4, metrics=ONE_METRIC, original_maps=maps, postprocess_steps=("abs",)
    )
    np.testing.assert_allclose(abs_first.similarity["spearman"], of_abs.similarity["spearman_abs"], rtol=1e-12)
    assert abs_first.baseline["spearman"]["mean"] == pytest.approx(of_abs.baseline["spearman_abs"]["mean"], rel=1e-12)
    assert abs_first.retention == of_abs.retention  # the verdict compares |map| either way
    with pytest.raises(ValueError, match="unknown post-processing step 'smooth'"):
        model_randomization(model, images, "gradient", metrics=ONE_METRIC, postprocess_steps=("abs", "smooth"))
    with pytest.raises(TypeError, match="sequence of names"):
        model_randomization(model, images, "gradient", metrics=ONE_METRIC, postprocess_steps="abs")


def test_volumes_take_the_same_path():
    model, images = tiny_resnet(3), images_for(3, n=3)
    result = model_randomization(model, images, "gradcam", mode="independent", n_pairs=6)
    assert result.states == RESNET_BLOCKS and result.metrics == ["spearman_abs", "spearman", "ssim", "hog_spearman"]
    assert all(result.similarity[m].shape == (7, 3) and np.isfinite(result.similarity[m]).all() for m in result.metrics)
    assert result.seconds_per_map > 0 and result.seconds >= 8 * 3 * result.seconds_per_map


# ----------------------------------------------------------------------------- the known result

SUBTYPES = ("control", "typical", "atypical")  # class = index: 3 classes, evidence in either region


def shepp_logan_set(n: int, rng: np.random.Generator, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """n 2D Shepp-Logan phantoms (n, 1, size, size) cycling through :data:`SUBTYPES`, labelled by
    subtype. Head sizes vary by +-15 % (``head_jitter=0.15``, the generator's default is 3 %)."""
    images = [shepp_logan_phantom(SUBTYPES[i % 3], size, 2, rng, head_jitter=0.15)[0] for i in range(n)]
    return torch.from_numpy(np.stack(images))[:, None], torch.arange(n) % 3


@pytest.fixture(scope="module")
def trained_resnet():
    """A MONAI ResNet18 of widths 8-16-32-64 (stride-2 first convolution, no max pool: a 4x4 layer4
    for Grad-CAM on 64 px), trained for 8 epochs on 160 phantoms (a few seconds), and 32 test
    phantoms. Returns (model, test images)."""
    rng = np.random.default_rng(2)
    train, val = shepp_logan_set(160, rng), shepp_logan_set(40, rng)
    test_x, _ = shepp_logan_set(32, rng)
    return trained_small_resnet([8, 16, 32, 64], 3, train, val, epochs=8, seed=2), test_x


def test_known_result_gradient_depends_on_the_model_guided_backprop_does_not(trained_resnet):
    """Adebayo et al. 2018: under cascading randomization the gradient's map keeps nothing of the
    trained one, guided backprop's keeps much of it (blind to the top blocks, and keeping the image's
    own structure lower down). Grad-CAM's maps of this model go blank once layer3 is random (with
    the trained batch-norm statistics): a blank map shows nothing, so it is counted, never scored
    as changed, and the answer is "unclear"."""
    model, images = trained_resnet
    results = {
        method: model_randomization(model, images, method) for method in ("gradient", "gradcam", "guided_backprop")
    }
    for method, result in results.items():
        assert result.states == RESNET_BLOCKS
        assert result.judged_states == RESNET_BLOCKS[3:]  # at least 4 of the 7 blocks random
        assert result.similarity["spearman"].shape == (len(RESNET_BLOCKS), len(images))
        assert all(np.isfinite(result.curve[m]).all() for m in result.metrics), method
        json.dumps(result.to_dict(), allow_nan=False)
    assert results["gradient"].verdict == "yes", results["gradient"].reason
    assert results["guided_backprop"].verdict == "no", results["guided_backprop"].reason
    assert results["guided_backprop"].retention["per_state"][0] > 0.9  # blind to the logit layer
    gradcam = results["gradcam"]
    assert gradcam.verdict == "unclear" and "blank" in gradcam.reason and gradcam.blank_share > 0.1


def test_the_verdict_needs_enough_images_per_class_and_reads_the_ci():
    interval = {"mean": 0.02, "ci_low": 0.01, "ci_high": 0.03, "n": 12}
    assert retention_verdict(interval, {"0": 6, "1": 6}, 0.0, "low", "high") == (
        "yes",
        "retention share 0.02 [95% CI 0.01, 0.03] over 12 images, below 0.1: low",
    )
    assert retention_verdict({**interval, "ci_low": 0.2, "ci_high": 0.3}, {"0": 12}, 0.0, "low", "high")[0] == "no"
    assert retention_verdict({**interval, "ci_high": 0.2}, {"0": 12}, 0.0, "low", "high")[0] == "unclear"
    verdict, reason = retention_verdict(interval, {"0": 7, "1": 5}, 0.0, "low", "high")
    assert verdict == "unclear" and "class 1: 5" in reason
    verdict, reason = retention_verdict(interval, {"0": 12}, 0.11, "low", "high")
    assert verdict == "unclear" and "11% of the judged maps are blank" in reason
    assert judged_states(8, "cascading") == [3, 4, 5, 6, 7] and judged_states(7, "cascading") == [3, 4, 5, 6]
    assert judged_states(2, "cascading") == [0, 1] and judged_states(5, "independent") == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- constant maps, bad input


class ConstantGradient(nn.Module):
    """2D, 2 classes: logits = fc(0 * spatial mean of conv(x)): the input gradient is 0 everywhere,
    whatever the weights, so every gradient map is constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(0 * self.conv(x).mean((2, 3)))


def test_blank_maps_are_counted_never_scored_and_make_the_answer_unclear():
    images = images_for(2, n=8)
    result = model_randomization(ConstantGradient(), images, "gradient", n_pairs=10, target=[0] * 8)
    assert result.blank_maps == {"original": 8, "fc": 8, "conv": 8}
    for metric in result.metrics:
        np.testing.assert_array_equal(result.similarity[metric], 0.0)
        assert result.baseline[metric]["mean"] == 0.0
    assert result.retention["n"] == 0 and all(v is None for v in result.retention["per_image"])
    assert result.verdict == "unclear" and result.blank_share == 1.0
    json.dumps(result.to_dict(), allow_nan=False)


class NoReset(nn.Module):
    """A layer holding a parameter of its own and no reset_parameters()."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.scale * x


def test_bad_input_errors():
    model, images = tiny_resnet(2), images_for(2, n=4)
    one_block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    cases = [
        ({"images": images[:1]}, "at least 2 images"),
        ({"model": one_block}, "at least 2 blocks"),
        ({"blocks": ["fc"]}, "at least 2 blocks"),
        ({"blocks": ["fc", "nope"]}, "'nope' is not a submodule"),
        ({"blocks": ["layer1", "layer1.0"]}, "inside block 'layer1'"),
        ({"blocks": ["fc", "act"]}, "holds no parameters"),
        ({"mode": "sideways"}, "mode must be one of"),
        ({"metrics": ("spearman", "nope")}, "unknown similarity metric"),
        ({"display": "colour"}, "display must be one of"),
        ({"images": images_for(2, n=4, side=12)}, "metric 'hog_spearman' cannot compare maps of \\(12, 12\\)"),
        ({"n_pairs": 1}, "n_pairs must be an integer >= 2"),
        ({"method": "nope"}, "unknown saliency method"),
        ({"params": {"steps": 3}}, "unknown parameter"),
        ({"original_maps": torch.zeros(4, 1, 16, 16)}, "original_maps must be"),
    ]
    for change, match in cases:
        arguments = {"model": model, "images": images, "method": "gradient", **change}
        with pytest.raises(ValueError, match=match):
            model_randomization(**arguments)
    with pytest.raises(ValueError, match="no reset_parameters"):
        reinitialise_block(nn.Sequential(nn.Conv2d(1, 1, 1), NoReset()), seed=0, name="head")
    with pytest.raises(ValueError, match="mode must be one of"):
        randomized_models(model, mode="sideways")
