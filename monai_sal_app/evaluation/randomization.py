"""Model randomization: does a saliency map depend on the model's weights? (Adebayo et al. 2018.)

The trained model's maps are compared with the maps of the same model with some of its blocks
re-initialised, image by image, with the similarity metrics of :mod:`monai_sal_app.metrics.similarity`:

- **cascading**: the blocks are re-initialised from the logits down, one more at each state and
  cumulatively (state k has blocks 0..k random);
- **independent**: one block at a time, every other block keeps its trained weights.

A method whose maps stay like the trained model's while its weights are destroyed explains the
image, not the model. The similarity is read against the random-pair baseline of the trained
model's maps (the similarity of the maps of two different images): the method **fails** when the
mean similarity over the randomized states (the area under the curve divided by the number of
states) lies above the baseline's 95% CI plus a margin, and **passes** otherwise. The mean over all
states rather than the last state: guided backprop's maps only near the baseline once every block
is random, which a rule on the last state alone would not see.

The user's model is deep-copied once and never changed; the targets are the trained model's
predicted classes (or the given ones), kept fixed for every state.

Definitions (blocks, re-initialisation, verdict): docs/METHODS.md#model-randomization.
Reference: J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt, B. Kim, "Sanity Checks for
Saliency Maps", NeurIPS, 2018.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from monai_sal_app.metrics.similarity import (
    SIMILARITY_METRICS,
    constant_maps,
    random_pair_baseline,
    ranks,
    similarity,
)
from monai_sal_app.saliency.core import explain, get_method, model_device, model_guard, resolve_target, validate_images
from monai_sal_app.saliency.postprocess import checked_steps, postprocess

__all__ = [
    "DEFAULT_METRICS",
    "MODES",
    "RandomizationResult",
    "model_randomization",
    "randomization_blocks",
    "randomized_models",
    "reinitialise_block",
]

MODES = ("cascading", "independent")
DEFAULT_METRICS = ("spearman_abs", "spearman", "ssim", "hog_spearman")


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_assembled(container: nn.Module) -> bool:
    """True for a container assembled from different layers, two or more of them holding
    parameters (a feature extractor or a head); False for a stage of repeated blocks of one class
    (a ResNet ``layer1``) or a wrapper around a single parameter-holding layer."""
    children = list(container.children())
    return sum(_holds_parameters(c) for c in children) >= 2 and len({type(c) for c in children}) > 1


def randomization_blocks(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_modules()``) of the blocks to randomize, from the logits down.

    The blocks are the model's top-level children, except that a top-level ``nn.Sequential``
    assembled from different layers, two or more of them holding parameters (a feature extractor
    or a head such as DenseNet's ``features`` or conv5-fc3's ``features`` and ``classifier``), is
    replaced by its own children. A container of repeated blocks of one class (ResNet's
    ``layer1``...) and a container with a single parameter-holding layer (DenseNet's
    ``class_layers``) stay one block. Only blocks holding parameters are listed. The order of
    registration is taken as the order of the forward pass, and reversed.

    MONAI ResNet: ``["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]``; MONAI DenseNet:
    ``["class_layers", "features.norm5", "features.denseblock4", "features.transition3", ...,
    "features.norm0", "features.conv0"]``.
    """
    blocks = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and _is_assembled(child):
            blocks += [f"{name}.{sub}" for sub, layer in child.named_children() if _holds_parameters(layer)]
        elif _holds_parameters(child):
            blocks.append(name)
    return blocks[::-1]


def _checked_blocks(model: nn.Module, blocks: Sequence[str]) -> list[str]:
    """``blocks`` as a list, after checking that each names a distinct, parameter-holding, proper
    submodule of ``model`` and that none lies inside another."""
    if isinstance(blocks, str):
        raise TypeError(f"blocks must be a sequence of module names, got the string {blocks!r}")
    blocks = list(blocks)
    modules = dict(model.named_modules())
    for name in blocks:
        if not isinstance(name, str) or not name or name not in modules:
            raise ValueError(f"block {name!r} is not a submodule of {type(model).__name__}")
        if not _holds_parameters(modules[name]):
            raise ValueError(f"block {name!r} holds no parameters: randomizing it changes nothing")
    for name in blocks:
        inside = [other for other in blocks if other == name or name.startswith(other + ".")]
        if len(inside) > 1:
            raise ValueError(f"block {name!r} is listed twice or lies inside block {inside[0]!r}")
    return blocks


def reinitialise_block(block: nn.Module, seed: int, name: str = "block") -> None:
    """Re-initialise ``block`` in place with its layers' own ``reset_parameters()``.

    Every submodule holding parameters of its own is reset (convolution and linear weights and
    biases to PyTorch's default draws, batch norm weights to 1, biases to 0 and running statistics
    to mean 0, variance 1), as is a submodule holding only buffers that has ``reset_parameters``
    (the running statistics of a batch norm without affine parameters). The draws come from the
    global RNG seeded with ``seed`` inside ``torch.random.fork_rng``, so the caller's RNG state
    (CPU, and CUDA on the block's device) is left as it was. A submodule with parameters of its
    own but no ``reset_parameters`` raises ``ValueError`` (it cannot be randomized faithfully).
    """
    to_reset = []
    for sub_name, module in block.named_modules():
        own_parameters = next(module.parameters(recurse=False), None) is not None
        resettable = callable(getattr(module, "reset_parameters", None))
        if own_parameters and not resettable:
            where = f"{name}.{sub_name}" if sub_name else name
            raise ValueError(
                f"{where} ({type(module).__name__}) holds parameters but has no reset_parameters(): "
                "cannot re-initialise it; pass blocks= without it"
            )
        if resettable and (own_parameters or next(module.buffers(recurse=False), None) is not None):
            to_reset.append(module)
    devices = sorted({p.device for p in block.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for module in to_reset:
            module.reset_parameters()


def _resolve_blocks(model: nn.Module, blocks: Sequence[str] | None) -> list[str]:
    return randomization_blocks(model) if blocks is None else _checked_blocks(model, blocks)


def _randomize_in_place(network: nn.Module, blocks: list[str], mode: str, seed: int) -> Iterator[tuple[str, nn.Module]]:
    """The states of :func:`randomized_models`, made by changing ``network`` itself."""
    block_seeds = torch.randint(0, 2**62, (len(blocks),), generator=torch.Generator().manual_seed(seed)).tolist()
    for name, block_seed in zip(blocks, block_seeds):
        block = network.get_submodule(name)
        trained = None if mode == "cascading" else {k: v.clone() for k, v in block.state_dict().items()}
        reinitialise_block(block, block_seed, name)
        yield name, network
        if trained is not None:
            block.load_state_dict(trained)


def randomized_models(
    model: nn.Module, blocks: Sequence[str] | None = None, mode: str = "cascading", seed: int = 0
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(block name, network)`` for each randomized state of ``model``, logits first.

    ``network`` is one deep copy of ``model``, changed in place from state to state, so use it
    before asking for the next state; ``model`` itself is never changed. In "cascading" mode state
    k has blocks 0..k re-initialised, in "independent" mode block k only, the others trained.
    Block k is re-initialised by :func:`reinitialise_block` with the k-th of ``len(blocks)`` seeds
    drawn from a generator seeded with ``seed``, so its random weights are the same in both modes.
    ``blocks``: module names, logits first; default :func:`randomization_blocks`. The arguments
    are checked at the call, the copy is made when the first state is asked for.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    blocks = _resolve_blocks(model, blocks)
    return _randomize_in_place(copy.deepcopy(model), blocks, mode, seed)


@dataclass
class RandomizationResult:
    """What :func:`model_randomization` measured, for one method and one mode.

    ``similarity[m]`` (S, N): metric ``m`` between each state's map and the trained model's, per
    image; ``curve[m]`` (S,): its mean over images; ``baseline[m]``: ``random_pair_baseline`` of
    the trained model's maps; ``statistic[m]``: the mean of ``curve[m]`` over the S states;
    ``verdict``: "fails" when ``statistic[verdict_metric] > baseline[verdict_metric]["ci_high"] +
    margin``, else "passes". ``constant_maps``: number of constant maps (scored 0) by state name,
    "original" for the trained model, only where there are any (trained maps that are all constant
    give a baseline of 0 and "passes", a verdict that says nothing about the method). ``target``: the class explained
    per image (N,). ``seconds``: wall time of the call; ``seconds_per_map``: time spent in
    ``explain`` per map it returned.
    """

    method: str
    mode: str
    states: list[str]
    metrics: list[str]
    similarity: dict[str, np.ndarray]
    curve: dict[str, list[float]]
    baseline: dict[str, dict]
    statistic: dict[str, float]
    verdict_metric: str
    margin: float
    verdict: str
    constant_maps: dict[str, int]
    seconds: float
    seconds_per_map: float
    target: list[int] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe dict of every field (arrays as nested lists; the baselines without their raw values)."""
        return {
            "method": self.method,
            "mode": self.mode,
            "states": list(self.states),
            "metrics": list(self.metrics),
            "similarity": {m: np.asarray(v, dtype=float).tolist() for m, v in self.similarity.items()},
            "curve": {m: [float(v) for v in c] for m, c in self.curve.items()},
            "baseline": {
                m: {**{k: float(b[k]) for k in ("mean", "ci_low", "ci_high")}, "n_pairs": int(b["n_pairs"])}
                for m, b in self.baseline.items()
            },
            "statistic": {m: float(v) for m, v in self.statistic.items()},
            "verdict_metric": self.verdict_metric,
            "margin": float(self.margin),
            "verdict": self.verdict,
            "constant_maps": {k: int(v) for k, v in self.constant_maps.items()},
            "seconds": float(self.seconds),
            "seconds_per_map": float(self.seconds_per_map),
            "target": [int(t) for t in self.target],
            "params": dict(self.params),
        }


def _checked_metrics(metrics: Sequence[str], verdict_metric: str, spatial: tuple[int, ...]) -> list[str]:
    """``metrics`` as a list after checking names, duplicates, the verdict metric and that each
    metric can compare maps of ``spatial`` size (tried on a pair of blank maps, so the metric's own
    size rule applies: SSIM needs 7 px a side, HOG 16)."""
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics is empty")
    unknown = [m for m in metrics if m not in SIMILARITY_METRICS]
    if unknown:
        raise ValueError(f"unknown similarity metric(s) {unknown}; choose from {', '.join(SIMILARITY_METRICS)}")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics {metrics} lists a metric twice")
    if verdict_metric not in metrics:
        raise ValueError(f"verdict_metric {verdict_metric!r} is not one of the metrics {metrics}")
    blank = np.zeros((1, *spatial))
    for metric in metrics:
        try:
            similarity(blank, blank, metric)
        except ValueError as error:
            raise ValueError(f"metric {metric!r} cannot compare maps of {spatial}: {error}; leave it out") from None
    return metrics


# Spearman's rho is Pearson's r of the ranks. For these metrics the trained model's maps are ranked
# once, and each state's maps once, instead of ranking both sides again for every state and both
# maps of every pair of the random-pair baseline (50 pairs: 100 rankings, the costliest part of the
# check on 3D maps after the explanations). The values are bit-identical: the same ranks
# (``metrics.similarity.ranks``) go through the same correlation (``metrics.similarity.pearson``).
_RANKED_METRICS = {"spearman": lambda maps: maps, "spearman_abs": np.abs}


def _comparable(maps: np.ndarray, metric: str) -> tuple[np.ndarray, str]:
    """(what to compare, the metric that compares it): ``maps`` (N, *spatial) and ``metric``, or for
    a Spearman metric the row-wise ranks of the maps (of |map| for ``spearman_abs``) and "pearson"."""
    if metric not in _RANKED_METRICS:
        return maps, metric
    keys = _RANKED_METRICS[metric](maps).reshape(len(maps), -1)
    return ranks(keys).reshape(maps.shape), "pearson"


def _checked_maps(maps, n: int, spatial: tuple[int, ...]) -> np.ndarray:
    """Given original maps (N, 1, *spatial) or (N, *spatial), tensor or array, as float64 (N, *spatial)."""
    array = np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    if array.ndim == len(spatial) + 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.shape != (n, *spatial):
        raise ValueError(f"original_maps must be (N, 1, *spatial) = {(n, 1, *spatial)}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("original_maps contain NaN or infinite values")
    return array


def model_randomization(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "gradient",
    target=None,
    params: dict | None = None,
    mode: str = "cascading",
    metrics: Sequence[str] = DEFAULT_METRICS,
    verdict_metric: str = "spearman",
    margin: float = 0.0,
    n_pairs: int = 50,
    seed: int = 0,
    blocks: Sequence[str] | None = None,
    original_maps=None,
    postprocess_steps: Sequence[str] = (),
) -> RandomizationResult:
    """Model randomization test of ``method`` on ``model`` over ``images`` (Adebayo et al. 2018).

    Args:
        model: a trained classifier returning logits (N, num_classes), 2D or 3D. Deep-copied once;
            the model itself is never changed (weights, mode, hooks, ``requires_grad``).
        images: float tensor (N, C, *spatial), N >= 2 (the baseline needs pairs of images).
        method, params: the saliency method and its parameters, as for ``explain``.
        target: None (the trained model's predicted class per image), an int or N ints; the
            same classes are explained in every randomized state.
        mode: "cascading" (blocks randomized cumulatively from the logits down) or "independent"
            (one block at a time).
        metrics: names of ``SIMILARITY_METRICS``; each must accept maps of the images' size
            (SSIM 7 px a side, HOG 16 px), else ``ValueError`` before any map is computed.
        verdict_metric, margin: the verdict is "fails" when the mean over states of the mean
            similarity in ``verdict_metric`` exceeds the baseline's CI upper bound plus ``margin``.
            Signed Spearman by default: on images that share one layout (a head, a chest) the
            |map| of any edge-like method ranks the same anatomy first in every image, which lifts
            the random-pair baseline of ``spearman_abs`` close to a method that ignores the model
            (docs/METHODS.md#model-randomization).
        n_pairs, seed: pairs of the random-pair baseline; ``seed`` seeds both the pairs and the
            re-initialisation (each block gets its own seed drawn from it, so a block's random
            weights are the same in both modes).
        blocks: module names to randomize, logits first; default :func:`randomization_blocks`.
            At least two.
        original_maps: the trained model's maps (N, 1, *spatial) by this method, parameters and
            target, as ``explain`` returns them, when already computed; otherwise computed here.
        postprocess_steps: named steps of ``saliency.postprocess`` applied to every map (the given
            ``original_maps`` too) before it is compared, e.g. ``("abs", "clip")`` for |map|
            clipped at its 99th percentile; none by default.

    Returns:
        A :class:`RandomizationResult` with one state per block (S = len(blocks)).
    """
    start = time.perf_counter()
    params = dict(params or {})
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    unknown = set(params) - set(get_method(method).defaults)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for method {method!r}")
    validate_images(model, images)
    n, spatial = images.shape[0], tuple(images.shape[2:])
    if n < 2:
        raise ValueError(f"model randomization needs at least 2 images (the random-pair baseline), got {n}")
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 2:
        raise ValueError(f"n_pairs must be an integer >= 2, got {n_pairs!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    metrics = _checked_metrics(metrics, verdict_metric, spatial)
    blocks = _resolve_blocks(model, blocks)
    if len(blocks) < 2:
        raise ValueError(
            f"model randomization needs at least 2 blocks holding parameters, {type(model).__name__} has "
            f"{blocks}; pass blocks= to choose them"
        )
    postprocess_steps = checked_steps(postprocess_steps)
    if original_maps is not None:
        original_maps = _checked_maps(original_maps, n, spatial)

    def processed(maps: np.ndarray) -> np.ndarray:
        return postprocess(torch.from_numpy(maps)[:, None], postprocess_steps)[:, 0].numpy()

    work = copy.deepcopy(model)
    x = images.detach().to(device=model_device(work), dtype=torch.float32)
    with model_guard(work):
        fixed_target = resolve_target(work, x, target)
    explain_seconds, explained = 0.0, 0

    def maps_of(network: nn.Module) -> np.ndarray:
        nonlocal explain_seconds, explained
        tic = time.perf_counter()
        maps = explain(network, x, method, target=fixed_target, **params)
        explain_seconds += time.perf_counter() - tic
        explained += n
        return processed(maps[:, 0].cpu().double().numpy())

    original = maps_of(work) if original_maps is None else processed(original_maps)
    constant = {"original": int(constant_maps(original).sum())}
    reference = {metric: _comparable(original, metric) for metric in metrics}
    values = {metric: np.zeros((len(blocks), n)) for metric in metrics}
    for index, (name, network) in enumerate(_randomize_in_place(work, blocks, mode, seed)):
        maps = maps_of(network)
        for metric in metrics:
            compared, by = reference[metric]
            values[metric][index] = similarity(compared, _comparable(maps, metric)[0], by)
        constant[name] = int(constant_maps(maps).sum())

    baseline = {
        metric: {**random_pair_baseline(compared, by, n_pairs=n_pairs, seed=seed), "metric": metric}
        for metric, (compared, by) in reference.items()
    }
    curve = {metric: [float(v) for v in values[metric].mean(axis=1)] for metric in metrics}
    statistic = {metric: float(np.mean(curve[metric])) for metric in metrics}
    fails = statistic[verdict_metric] > baseline[verdict_metric]["ci_high"] + margin
    return RandomizationResult(
        method=method,
        mode=mode,
        states=list(blocks),
        metrics=metrics,
        similarity=values,
        curve=curve,
        baseline=baseline,
        statistic=statistic,
        verdict_metric=verdict_metric,
        margin=float(margin),
        verdict="fails" if fails else "passes",
        constant_maps={k: v for k, v in constant.items() if v},
        seconds=time.perf_counter() - start,
        seconds_per_map=explain_seconds / explained,
        target=fixed_target.cpu().tolist(),
        params=params,
    )
