"""Model randomization: does a saliency map depend on what the model learned? (Adebayo et al. 2018.)

The trained model's maps are compared with the maps of the same model with some of its blocks
re-initialised, image by image:

- **cascading**: the blocks are re-initialised from the logits down, one more at each state and
  cumulatively (state k has blocks 0..k random);
- **independent**: one block at a time, every other block keeps its trained weights.

A method whose maps stay like the trained model's while its weights are destroyed explains the
image, not the model. The verdict rests on the **retention share**
(``metrics.similarity.RetentionReference``): per image, how much of the trained map's
image-specific part the randomized map keeps, with maps compared as the viewer shows them (|map|
by default) by Spearman correlation; 1 when nothing changed, about 0 when nothing image-specific
is left. It is averaged over the judged states (cascading: those with at least half of the blocks
random, the fully random one included; independent: every state), with a bootstrap 95% CI over
images, and read as "depends on what the model learned": yes (the CI lies below
:data:`RETENTION_CUT`), no (above it) or unclear (the CI spans it, a class with fewer than :data:`MIN_IMAGES_PER_CLASS` images, or more than :data:`MAX_BLANK_SHARE` of
the judged maps blank). Signed Spearman, SSIM and HOG similarities stay as curves beside it.

The user's model is deep-copied once and never changed; the targets are the trained model's
predicted classes (or the given ones), kept fixed for every state. Batch-norm running statistics
keep their trained values unless ``reset_batch_norm=True`` (Adebayo et al.'s code keeps them).

Definitions (blocks, re-initialisation, retention share, thresholds): docs/METHODS.md#model-randomization.
Reference: J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt, B. Kim, "Sanity Checks for
Saliency Maps", NeurIPS, 2018.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.metrics.similarity import (
    DISPLAYS,
    SIMILARITY_METRICS,
    RetentionReference,
    SSIMReference,
    map_hog_features,
    random_pair_baseline,
    ranks,
    similarity,
)
from monai_sal_app.metrics.stats import bootstrap_ci
from monai_sal_app.saliency.core import explain, get_method, model_device, model_guard, resolve_target, validate_images
from monai_sal_app.saliency.postprocess import checked_steps, postprocess

__all__ = [
    "DEFAULT_METRICS",
    "MAX_BLANK_SHARE",
    "MIN_IMAGES_PER_CLASS",
    "MODES",
    "RETENTION_CUT",
    "RandomizationResult",
    "judged_states",
    "model_randomization",
    "randomization_blocks",
    "randomized_models",
    "reinitialise_block",
    "retention_interval",
    "retention_verdict",
]

MODES = ("cascading", "independent")
DEFAULT_METRICS = ("spearman_abs", "spearman", "ssim", "hog_spearman")
# The verdict's rules: calibrated on cases with known answers (docs/METHODS.md#model-randomization).
RETENTION_CUT = 0.1  # "yes" when the retention share's CI lies entirely below this, "no" when entirely above
MIN_IMAGES_PER_CLASS = 6  # fewer images explained for a class: "unclear"
MAX_BLANK_SHARE = 0.10  # more of the judged maps blank (constant): "unclear"


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


def reinitialise_block(block: nn.Module, seed: int, name: str = "block", reset_batch_norm: bool = False) -> None:
    """Re-initialise ``block`` in place with its layers' own ``reset_parameters()``.

    Every submodule holding parameters of its own is reset (convolution and linear weights and
    biases to PyTorch's default draws, batch norm weights to 1 and biases to 0). Batch-norm running
    statistics keep their trained values, as in Adebayo et al.'s code, unless ``reset_batch_norm``
    (then mean 0, variance 1, as is a submodule holding only buffers that has
    ``reset_parameters``, such as a batch norm without affine parameters). The draws come from the
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
        if resettable and (
            own_parameters or (reset_batch_norm and next(module.buffers(recurse=False), None) is not None)
        ):
            to_reset.append(module)
    statistics = [] if reset_batch_norm else [m for m in to_reset if isinstance(m, nn.modules.batchnorm._NormBase)]
    kept = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in statistics]
    devices = sorted({p.device for p in block.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for module in to_reset:
            module.reset_parameters()
        for module, buffers in zip(statistics, kept):
            for key, value in buffers.items():
                getattr(module, key).copy_(value)


def _resolve_blocks(model: nn.Module, blocks: Sequence[str] | None) -> list[str]:
    return randomization_blocks(model) if blocks is None else _checked_blocks(model, blocks)


def _randomize_in_place(
    network: nn.Module, blocks: list[str], mode: str, seed: int, reset_batch_norm: bool
) -> Iterator[tuple[str, nn.Module]]:
    """The states of :func:`randomized_models`, made by changing ``network`` itself."""
    block_seeds = torch.randint(0, 2**62, (len(blocks),), generator=torch.Generator().manual_seed(seed)).tolist()
    for name, block_seed in zip(blocks, block_seeds):
        block = network.get_submodule(name)
        trained = None if mode == "cascading" else {k: v.clone() for k, v in block.state_dict().items()}
        reinitialise_block(block, block_seed, name, reset_batch_norm)
        yield name, network
        if trained is not None:
            block.load_state_dict(trained)


def randomized_models(
    model: nn.Module,
    blocks: Sequence[str] | None = None,
    mode: str = "cascading",
    seed: int = 0,
    reset_batch_norm: bool = False,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(block name, network)`` for each randomized state of ``model``, logits first.

    ``network`` is one deep copy of ``model``, changed in place from state to state, so use it
    before asking for the next state; ``model`` itself is never changed. In "cascading" mode state
    k has blocks 0..k re-initialised, in "independent" mode block k only, the others trained.
    Block k is re-initialised by :func:`reinitialise_block` with the k-th of ``len(blocks)`` seeds
    drawn from a generator seeded with ``seed``, so its random weights are the same in both modes;
    batch-norm running statistics stay as trained unless ``reset_batch_norm``.
    ``blocks``: module names, logits first; default :func:`randomization_blocks`. The arguments
    are checked at the call, the copy is made when the first state is asked for.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    blocks = _resolve_blocks(model, blocks)
    return _randomize_in_place(copy.deepcopy(model), blocks, mode, seed, reset_batch_norm)


def judged_states(n_states: int, mode: str) -> list[int]:
    """Indices of the states the verdict is judged on: in cascading mode those with at least half
    of the ``n_states`` blocks random (state k has k + 1), which always includes the last, fully
    random one; in independent mode every state (each randomizes one block)."""
    if mode == "independent":
        return list(range(n_states))
    return [k for k in range(n_states) if 2 * (k + 1) >= n_states]


def retention_interval(values, seed: int, n_resamples: int = 2000) -> dict:
    """``{"mean", "ci_low", "ci_high", "n"}`` of retention shares (NaN left out, as is a missing
    bound: None) with the bootstrap 95% CI (``metrics.stats.bootstrap_ci``)."""
    mean, low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    n = int(np.isfinite(np.asarray(values, dtype=np.float64)).sum())
    return {"mean": _finite(mean), "ci_low": _finite(low), "ci_high": _finite(high), "n": n}


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _class_counts(classes) -> dict[str, int]:
    values, counts = np.unique(np.asarray(classes).reshape(-1), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def retention_verdict(
    interval: dict, class_counts: dict[str, int], blank_share: float, low_means: str, high_means: str
) -> tuple[str, str]:
    """``(verdict, reason)`` of a retention share's ``interval`` ({"mean", "ci_low", "ci_high",
    "n"}): "yes" when its CI lies below :data:`RETENTION_CUT`, "no" when above it, "unclear"
    when it spans it, or when a class in ``class_counts`` has fewer
    than :data:`MIN_IMAGES_PER_CLASS` images, or when ``blank_share`` of the judged maps (in [0, 1])
    is above :data:`MAX_BLANK_SHARE`. ``low_means``/``high_means``: what a low / high share says,
    for the reason."""
    few = {c: n for c, n in class_counts.items() if n < MIN_IMAGES_PER_CLASS}
    if few:
        listed = ", ".join(f"class {c}: {n}" for c, n in few.items())
        return "unclear", f"too few images explained per class to judge ({listed}; {MIN_IMAGES_PER_CLASS} needed)"
    if blank_share > MAX_BLANK_SHARE:
        return "unclear", (
            f"{blank_share:.0%} of the judged maps are blank (more than {MAX_BLANK_SHARE:.0%}): a blank map "
            "shows nothing, so it is not counted as changed"
        )
    mean, low, high = interval["mean"], interval["ci_low"], interval["ci_high"]
    if low is None or high is None:
        return "unclear", f"the retention share rests on {interval['n']} image(s): no confidence interval"
    shown = f"retention share {mean:.2f} [95% CI {low:.2f}, {high:.2f}] over {interval['n']} images"
    if high < RETENTION_CUT:
        return "yes", f"{shown}, below {RETENTION_CUT}: {low_means}"
    if low > RETENTION_CUT:
        return "no", f"{shown}, above {RETENTION_CUT}: {high_means}"
    return "unclear", f"{shown}: its CI spans {RETENTION_CUT}"


@dataclass
class RandomizationResult:
    """What :func:`model_randomization` measured, for one method and one mode.

    ``similarity[m]`` (S, N): metric ``m`` between each state's map and the trained model's, per
    image; ``curve[m]`` (S,): its mean over images; ``baseline[m]``: ``random_pair_baseline`` of
    the trained model's maps, pairs of images explained for the same class (curves only).
    ``retention``: ``{"per_state" (S,) mean over images, "per_image" (N,) mean over the judged
    states, "mean", "ci_low", "ci_high" (bootstrap 95% CI over images), "n"}``, NaN as None;
    ``judged_states``: the state names the verdict is judged on; ``verdict``: "yes" / "no" /
    "unclear" ("depends on what the model learned"), ``reason`` in words. ``blank_maps``: constant
    maps (never scored) per state, "original" for the trained model, where there are any;
    ``blank_share``: their share of the judged states' maps. ``classes``: images per explained
    class. ``target``: the class explained per image (N,). ``seconds``: wall time of the call;
    ``seconds_per_map``: time spent in ``explain`` per map it returned.
    """

    method: str
    mode: str
    states: list[str]
    judged_states: list[str]
    display: str
    metrics: list[str]
    similarity: dict[str, np.ndarray]
    curve: dict[str, list[float]]
    baseline: dict[str, dict]
    retention: dict
    verdict: str
    reason: str
    blank_maps: dict[str, int]
    blank_share: float
    classes: dict[str, int]
    batch_norm_statistics: str
    seconds: float
    seconds_per_map: float
    target: list[int] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe dict of every field (arrays as nested lists, NaN as None; the baselines
        without their raw values)."""
        return {
            "method": self.method,
            "mode": self.mode,
            "states": list(self.states),
            "judged_states": list(self.judged_states),
            "display": self.display,
            "metrics": list(self.metrics),
            "similarity": {m: np.asarray(v, dtype=float).tolist() for m, v in self.similarity.items()},
            "curve": {m: [float(v) for v in c] for m, c in self.curve.items()},
            "baseline": {
                m: {**{k: _finite(b[k]) for k in ("mean", "ci_low", "ci_high")}, "n_pairs": int(b["n_pairs"])}
                for m, b in self.baseline.items()
            },
            "retention": dict(self.retention),
            "verdict": self.verdict,
            "reason": self.reason,
            "blank_maps": {k: int(v) for k, v in self.blank_maps.items()},
            "blank_share": float(self.blank_share),
            "classes": dict(self.classes),
            "batch_norm_statistics": self.batch_norm_statistics,
            "seconds": float(self.seconds),
            "seconds_per_map": float(self.seconds_per_map),
            "target": [int(t) for t in self.target],
            "params": dict(self.params),
        }


def _checked_metrics(metrics: Sequence[str], spatial: tuple[int, ...]) -> list[str]:
    """``metrics`` as a list after checking names, duplicates and that each metric can compare maps
    of ``spatial`` size (tried on a pair of blank maps, so the metric's own size rule applies: SSIM
    needs 7 px a side, HOG 16)."""
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
    blank = np.zeros((1, *spatial))
    for metric in metrics:
        try:
            similarity(blank, blank, metric)
        except ValueError as error:
            raise ValueError(f"metric {metric!r} cannot compare maps of {spatial}: {error}; leave it out") from None
    return metrics


# Spearman's rho is Pearson's r of the ranks. For these metrics the trained model's maps are ranked
# (their HOG features for ``hog_spearman``) once, and each state's maps once, instead of again for
# every state and for both maps of every pair of the random-pair baseline: the same ranks
# (``metrics.similarity.ranks``) go through the same correlation (``metrics.similarity.pearson``).
_RANKED_METRICS = {
    "spearman": lambda maps: maps.reshape(len(maps), -1),
    "spearman_abs": lambda maps: np.abs(maps).reshape(len(maps), -1),
    "hog_spearman": map_hog_features,
}


def _comparable(maps: np.ndarray, metric: str) -> tuple[np.ndarray, str]:
    """(what to compare, the metric that compares it): ``maps`` (N, *spatial) and ``metric``, or for
    a rank metric the row-wise ranks (N, 1, P) of what it ranks (the maps, |map| or the maps' HOG
    features) and "pearson"."""
    if metric not in _RANKED_METRICS:
        return maps, metric
    return ranks(_RANKED_METRICS[metric](maps))[:, None, :], "pearson"


_STATES_IN_FLIGHT = 2  # randomized states whose maps are being compared at once


def _comparison_threads(tasks: int) -> int:
    """Threads for ``tasks`` independent numpy comparisons: one per CPU core this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(tasks, cores))


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
    display: str = "abs",
    n_pairs: int = 50,
    seed: int = 0,
    blocks: Sequence[str] | None = None,
    original_maps=None,
    postprocess_steps: Sequence[str] = (),
    reset_batch_norm: bool = False,
    n_resamples: int = 2000,
) -> RandomizationResult:
    """Model randomization test of ``method`` on ``model`` over ``images`` (Adebayo et al. 2018).

    Args:
        model: a trained classifier returning logits (N, num_classes), 2D or 3D. Deep-copied once;
            the model itself is never changed (weights, mode, hooks, ``requires_grad``).
        images: float tensor (N, C, *spatial), N >= 2.
        method, params: the saliency method and its parameters, as for ``explain``.
        target: None (the trained model's predicted class per image), an int or N ints; the
            same classes are explained in every randomized state, and images are compared with
            the other images explained for the same class.
        mode: "cascading" (blocks randomized cumulatively from the logits down) or "independent"
            (one block at a time).
        metrics: names of ``SIMILARITY_METRICS`` for the per-state curves; each must accept maps
            of the images' size (SSIM 7 px a side, HOG 16 px), else ``ValueError`` before any map
            is computed. They are reported, not judged.
        display: how the maps are shown, and so compared for the verdict: "abs" (|map|, as
            monai-sal's overlays and the Slicer module show them) or "signed".
        n_pairs, seed: pairs of the curves' random-pair baseline; ``seed`` seeds the pairs, the
            re-initialisation (each block gets its own seed drawn from it, so a block's random
            weights are the same in both modes) and the bootstrap.
        blocks: module names to randomize, logits first; default :func:`randomization_blocks`.
            At least two.
        original_maps: the trained model's maps (N, 1, *spatial) by this method, parameters and
            target, as ``explain`` returns them, when already computed; otherwise computed here.
        postprocess_steps: named steps of ``saliency.postprocess`` applied to every map (the given
            ``original_maps`` too) before it is compared, e.g. ``("abs", "clip")``; none by default.
        reset_batch_norm: reset batch-norm running statistics to mean 0, variance 1 with the
            weights; by default they keep their trained values (Adebayo et al.'s code).
        n_resamples: bootstrap resamples of the retention share's CI.

    Returns:
        A :class:`RandomizationResult` with one state per block (S = len(blocks)).
    """
    start = time.perf_counter()
    params = dict(params or {})
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if display not in DISPLAYS:
        raise ValueError(f"display must be one of {DISPLAYS}, got {display!r}")
    unknown = set(params) - set(get_method(method).defaults)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for method {method!r}")
    validate_images(model, images)
    n, spatial = images.shape[0], tuple(images.shape[2:])
    if n < 2:
        raise ValueError(f"model randomization needs at least 2 images (maps compared across images), got {n}")
    check_integer(n_pairs, "n_pairs", 2)
    metrics = _checked_metrics(metrics, spatial)
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
    classes = fixed_target.cpu().numpy()
    explain_seconds, explained = 0.0, 0

    def maps_of(network: nn.Module) -> np.ndarray:
        nonlocal explain_seconds, explained
        tic = time.perf_counter()
        maps = explain(network, x, method, target=fixed_target, **params)
        explain_seconds += time.perf_counter() - tic
        explained += n
        return processed(maps[:, 0].cpu().double().numpy())

    original = maps_of(work) if original_maps is None else processed(original_maps)
    retained = RetentionReference(original, classes, display)
    # The retention share ranks the maps as displayed: the curve of that Spearman metric is the
    # diagonal of its comparison, so those maps are ranked once, not twice.
    displayed = "spearman_abs" if display == "abs" else "spearman"
    blank = {"original": int(retained.blank.sum())}
    reference = {
        metric: (retained.keys[:, None, :], "pearson") if metric == displayed else _comparable(original, metric)
        for metric in metrics
    }
    values = {metric: np.zeros((len(blocks), n)) for metric in metrics}
    shares = np.full((len(blocks), n), np.nan)
    blank_per_state = np.zeros(len(blocks), dtype=np.int64)

    # SSIM's statistics of the trained model's maps are computed once too
    ssim_reference = SSIMReference(original) if "ssim" in metrics else None

    def compared_with_original(maps: np.ndarray, metric: str) -> np.ndarray:
        if metric == "ssim":
            return ssim_reference.compare(maps)
        compared, by = reference[metric]
        return similarity(compared, _comparable(maps, metric)[0], by)

    def collect(index: int, name: str, retention: Future, curves: dict[str, Future]) -> None:
        cross, blank_now = retention.result()
        shares[index] = retained.shares_from(cross, blank_now)
        for metric in metrics:
            if metric == displayed:
                values[metric][index] = np.clip(np.diagonal(cross), -1.0, 1.0)
            else:
                values[metric][index] = curves[metric].result()
        blank_per_state[index] = int(blank_now.sum())
        blank[name] = int(blank_now.sum())

    # A state's comparisons (numpy, which lets go of the GIL) run in threads while the next
    # state's maps are computed; at most _STATES_IN_FLIGHT states' maps are held at once.
    in_flight: deque = deque()
    with ThreadPoolExecutor(_comparison_threads(len(metrics))) as pool:
        for index, (name, network) in enumerate(_randomize_in_place(work, blocks, mode, seed, reset_batch_norm)):
            maps = maps_of(network)
            curves = {m: pool.submit(compared_with_original, maps, m) for m in metrics if m != displayed}
            in_flight.append((index, name, pool.submit(retained.similarity, maps), curves))
            if len(in_flight) >= _STATES_IN_FLIGHT:
                collect(*in_flight.popleft())
        while in_flight:
            collect(*in_flight.popleft())

    judged = judged_states(len(blocks), mode)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an image with no judged score: NaN, left out
        per_image = np.nanmean(shares[judged], axis=0)
        per_state = np.nanmean(shares, axis=1)
    interval = retention_interval(per_image, seed, n_resamples)
    blank_share = float(blank_per_state[judged].sum()) / (n * len(judged))
    counts = _class_counts(classes)
    verdict, reason = retention_verdict(
        interval,
        counts,
        blank_share,
        "the map keeps little of what it showed once the learned weights are gone",
        "the map keeps what it showed with random weights: it shows the image, not what the model learned",
    )
    baseline = {}
    if (np.unique(classes, return_counts=True)[1] >= 2).any():
        with ThreadPoolExecutor(_comparison_threads(len(metrics))) as pool:
            drawn = {
                metric: pool.submit(random_pair_baseline, compared, by, n_pairs=n_pairs, seed=seed, groups=classes)
                for metric, (compared, by) in reference.items()
            }
            baseline = {metric: {**future.result(), "metric": metric} for metric, future in drawn.items()}
    return RandomizationResult(
        method=method,
        mode=mode,
        states=list(blocks),
        judged_states=[blocks[k] for k in judged],
        display=display,
        metrics=metrics,
        similarity=values,
        curve={metric: [float(v) for v in values[metric].mean(axis=1)] for metric in metrics},
        baseline=baseline,
        retention={
            "per_state": [_finite(v) for v in per_state],
            "per_image": [_finite(v) for v in per_image],
            **interval,
        },
        verdict=verdict,
        reason=reason,
        blank_maps={k: v for k, v in blank.items() if v},
        blank_share=blank_share,
        classes=counts,
        batch_norm_statistics="reset" if reset_batch_norm else "kept as trained",
        seconds=time.perf_counter() - start,
        seconds_per_map=explain_seconds / explained,
        target=fixed_target.cpu().tolist(),
        params=params,
    )
