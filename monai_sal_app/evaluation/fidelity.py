"""Fidelity: do the positions a saliency map ranks highest carry the model's decision?

Each image's spatial positions (pixels in 2D, voxels in 3D; P of them) are ranked by its map, and
copies of the image are made with the first k = round(f * P) positions replaced by a baseline, all
channels at once, for every fraction f in ``fractions`` (default 0, 0.05, ..., 0.95), in two orders:

* most important first (MIF; "MoRF" in Samek et al.): the highest map value first;
* least important first (LIF; "LeRF"): the lowest map value first.

Every copy is scored (dimensionless): ``margin`` (default) the decision margin, the target logit
minus the best other logit, divided by the unperturbed image's margin and clipped to [0, 1] (1: the
decision is as firm as on the image, 0: it is gone; unchanged when every logit shifts by one
constant); ``logit_ratio`` the target logit divided by the unperturbed image's target logit;
``probability`` the target's softmax probability; ``accuracy`` 1 when the predicted class (argmax
of the logits) is still the reference class, else 0. The fidelity of an image is AUC(LIF) -
AUC(MIF), the areas by the trapezoid rule over the fractions (units: score x fraction of the
positions; with the default fractions and a score in [0, 1] it lies in [-0.95, 0.95]). A map that
follows what the model uses destroys the score early in MIF and late in LIF, so its fidelity is
positive; a random map scores about 0 and a constant map exactly 0. Also returned: the accuracy
curves, the fraction of images whose predicted class is still the reference class (``labels`` when
given, else the unperturbed prediction) at each fraction, and their difference of areas (the
accuracy version of the score, as the CT study reports it); and the share of images whose *fully*
replaced image is still classified as their target: where that is most of them, the replacement
itself is evidence for the class and the curves say little about the map.

Choices (ours, also in docs/METHODS.md#fidelity):

* **Ranking.** By |map| (``order_by="abs"``) or the signed map (``"signed"``: the highest value,
  the strongest evidence for the target, first; for methods whose sign says for or against the
  class). Ties follow one
  random permutation of the P positions, ``numpy.random.default_rng(seed).permutation(P)`` (the
  earlier in it, the earlier perturbed), shared by all images and by both orders: tied positions
  are perturbed in a scattered rather than a raster order, and a constant map perturbs the same
  positions in MIF and LIF.
* **k.** ``numpy.rint(f * P)``: the nearest integer, halves to even. Fraction 0 is the unperturbed
  image: its score comes from the unperturbed pass (a ratio of exactly 1), not from extra copies.
* **Baselines** (what replaces a position). ``zero`` (default): 0; ``mean``: the image's own mean
  per channel; ``blur``: the image Gaussian-blurred with sigma :data:`BLUR_SIGMA` pixels along
  every spatial axis (kernel truncated at 4 sigma, borders replicated); ``road``: ROAD's noisy
  linear imputation (:func:`noisy_linear_imputation`), each replaced position the weighted mean of
  its neighbours, solved jointly for all replaced positions, plus a little noise, so that the
  shape of the replaced set carries as little information as possible (Rong et al. 2022). The
  fully replaced image is 0, the channel means, the blurred image, or (``road``, where nothing is
  left to impute from) the channel means plus the noise.
* **The margin rule.** ``margin`` scores only images whose unperturbed margin is positive (the
  target is the predicted class); the others get NaN and are left out of the mean.
* **The ratio rule.** ``logit_ratio`` needs every unperturbed target logit above
  :data:`MIN_REFERENCE_LOGIT`; otherwise the ratio changes sign or blows up, and ``fidelity``
  raises ``ValueError`` naming the images (before any map or perturbation is computed) and
  pointing to ``score="probability"``.

All perturbed copies of all images go through the network in chunks of ``batch_size`` rows, built
chunk by chunk (never all copies of a volume at once), under ``model_guard`` and ``torch.no_grad``:
the model and the input are left as they were.

References: W. Samek, A. Binder, G. Montavon, S. Lapuschkin, K.-R. Müller, "Evaluating the
Visualization of What a Deep Neural Network Has Learned", IEEE TNNLS, 2017 (MoRF/LeRF
perturbation); Y. Rong, T. Leemann, V. Borisov, G. Kasneci, E. Kasneci, "A Consistent and
Efficient Evaluation Strategy for Attribution Methods", ICML, 2022 (ROAD); L. Brocki, W. Marchadour, J. Maison, B. Badic, P. Papadimitroulas, M. Hatt,
F. Vermet, N. C. Chung, "Evaluation of importance estimators in deep learning classifiers for
Computed Tomography", arXiv:2209.15398, 2022 (fidelity on CT).
Definition: docs/METHODS.md#fidelity.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from monai_sal_app.arguments import check_integer
from monai_sal_app.files import json_safe
from monai_sal_app.metrics.stats import mean_ci
from monai_sal_app.models.filters import gaussian_blur
from monai_sal_app.saliency.core import (
    auto_batch_size,
    chunks,
    explain,
    model_device,
    model_guard,
    resolve_target,
    target_scores,
    validate_images,
)

__all__ = [
    "BASELINES",
    "BLUR_SIGMA",
    "MIN_REFERENCE_LOGIT",
    "ORDERS",
    "ROAD_NOISE",
    "SCORES",
    "FidelityResult",
    "fidelity",
    "importance_ranks",
    "noisy_linear_imputation",
]

BASELINES = ("zero", "mean", "blur", "road")
SCORES = ("margin", "logit_ratio", "probability", "accuracy")
ORDERS = ("abs", "signed")
BLUR_SIGMA = 4.0  # pixels (voxels) along every spatial axis, for baseline="blur"
MIN_REFERENCE_LOGIT = 1e-6  # score="logit_ratio" refuses an unperturbed target logit at or below it
ROAD_NOISE = 0.01  # baseline="road": noise standard deviation, in units of the image's own standard deviation


@dataclass
class FidelityResult:
    """Perturbation curves and fidelity of one set of maps on N images at F fractions.

    ``mif`` and ``lif`` hold the score per image and fraction (N, F); ``fidelity`` (N,) is
    AUC(LIF) - AUC(MIF) per image, and ``mean``, ``ci_low``, ``ci_high`` its mean with a Student-t
    95% interval over images (``metrics.stats.mean_ci``; NaN bounds for one image).
    ``accuracy_mif`` and ``accuracy_lif`` (F,) are the fractions of images whose predicted class is
    still the reference class, and ``accuracy_fidelity`` AUC(accuracy_lif) - AUC(accuracy_mif).
    ``replaced_as_target``: the share of images whose fully replaced image the model classifies as
    their target (one more pass per image, one in all for ``zero``). ``n_scored``: images with a score (``margin`` leaves out those whose target is not
    the predicted class). ``seconds_per_image`` is the wall time of the unperturbed, fully replaced
    and perturbed passes (with the imputation of ``road``) divided by N, without computing the maps.
    """

    method: str
    fractions: np.ndarray
    mif: np.ndarray
    lif: np.ndarray
    fidelity: np.ndarray
    mean: float
    ci_low: float
    ci_high: float
    accuracy_mif: np.ndarray
    accuracy_lif: np.ndarray
    accuracy_fidelity: float
    replaced_as_target: float
    n_scored: int
    score: str
    baseline: str
    order_by: str
    seconds_per_image: float

    @property
    def auc_mif(self) -> np.ndarray:
        """(N,) area under each image's MIF curve, trapezoid rule over the fractions (score x fraction)."""
        return _trapezoid(self.mif, self.fractions)

    @property
    def auc_lif(self) -> np.ndarray:
        """(N,) area under each image's LIF curve; ``fidelity`` is ``auc_lif - auc_mif``."""
        return _trapezoid(self.lif, self.fractions)

    def to_dict(self) -> dict:
        """Every field, arrays as (nested) lists of floats and NaN as ``None``: ready for ``json.dumps``."""
        return {f.name: json_safe(getattr(self, f.name)) for f in fields(self)}


def fidelity(
    model: nn.Module,
    images: torch.Tensor,
    maps=None,
    method: str = "gradient",
    target=None,
    params: dict | None = None,
    labels=None,
    fractions=None,
    baseline: str = "zero",
    score: str = "margin",
    order_by: str = "abs",
    batch_size: int | None = None,
    seed: int = 0,
) -> FidelityResult:
    """MIF and LIF perturbation curves of ``images`` ranked by their maps, and the fidelity.

    Args:
        model: a classifier returning logits (N, num_classes); 2D or 3D.
        images: float tensor (N, C, H, W) or (N, C, D, H, W). Not modified.
        maps: (N, 1, *spatial) tensor or array, one map per image on the images' grid; None computes
            them with ``explain(model, images, method, target=target, **params)``.
        method: the saliency method used when ``maps`` is None (recorded as "given" otherwise).
        target: the class explained and scored: None (predicted class), an int, or N ints.
        params: the method's parameters when ``maps`` is None.
        labels: (N,) class indices, the reference class of the accuracy curves and of
            ``score="accuracy"``; None uses the unperturbed prediction.
        fractions: increasing fractions of the positions to perturb, at least two, in [0, 1);
            default ``np.arange(0, 1.0, 0.05)``.
        baseline: "zero", "mean", "blur" or "road" (module docstring).
        score: "margin", "logit_ratio", "probability" or "accuracy" (module docstring).
        order_by: "abs" (rank by |map|) or "signed".
        batch_size: rows (image copies) per forward pass; None picks it with ``auto_batch_size``
            (forward-only passes, 2 x the fractions above 0 per image).
        seed: seeds the permutation that breaks ties in the ranking and the noise of ``road``.

    Returns:
        A :class:`FidelityResult`.
    """
    _check_choice("baseline", baseline, BASELINES)
    _check_choice("score", score, SCORES)
    _check_choice("order_by", order_by, ORDERS)
    fractions = _checked_fractions(fractions)
    if batch_size is not None:
        batch_size = check_integer(batch_size, "batch_size")
    if maps is not None and params:
        raise ValueError("params are for computing the maps with `method`, but maps were given")
    validate_images(model, images)
    x = images.detach().to(device=model_device(model), dtype=torch.float32)
    n, positions = x.shape[0], math.prod(x.shape[2:])
    given_maps = None if maps is None else _checked_maps(maps, x)
    counts = np.rint(fractions * positions).astype(np.int64)
    perturbed = counts > 0

    with model_guard(model):
        if batch_size is None:
            batch_size = auto_batch_size(model, x, 2 * max(1, int(perturbed.sum())) + 1, forward_only=True)
        start = time.perf_counter()
        reference_logits = _logits_in_chunks(model, x, batch_size)
        num_classes = reference_logits.shape[1]
        targets = reference_logits.argmax(1) if target is None else resolve_target(model, x, target)
        reference_target_logits = target_scores(reference_logits, targets)  # refuses a target >= num_classes
        reference_class = (
            reference_logits.argmax(1).cpu().numpy() if labels is None else _checked_labels(labels, n, num_classes)
        )
        if score == "logit_ratio":
            _check_positive_logits(reference_target_logits)
        if score == "margin" and num_classes < 2:
            raise ValueError("score='margin' needs a model with at least 2 classes (the best other logit)")
        replaced = _logits_in_chunks(model, _fully_replaced(x, baseline, seed), batch_size).argmax(1)
        replaced = replaced.expand(n)  # one all-zero image stands for every image with baseline "zero"
        seconds = time.perf_counter() - start

        if given_maps is None:
            given_maps = explain(model, x, method, target=targets, **(params or {}))
        keys = given_maps.reshape(n, positions)
        keys = keys.abs() if order_by == "abs" else keys
        tie_order = torch.as_tensor(np.random.default_rng(seed).permutation(positions), device=x.device)
        # logits (N, 2, F, K), axis 1: 0 = MIF, 1 = LIF; k = 0 is the unperturbed image.
        logits = np.empty((n, 2, len(fractions), num_classes))
        logits[:, :, ~perturbed] = reference_logits.double().cpu().numpy()[:, None, None]
        start = time.perf_counter()
        if perturbed.any():
            replace = _replacement(x, baseline, seed)
            logits[:, :, perturbed] = _perturbed_logits(
                model, x, keys, tie_order, counts[perturbed], replace, batch_size
            )
        seconds += time.perf_counter() - start

    targets = targets.cpu().numpy()
    reference = reference_logits.double().cpu().numpy()
    curves = _scores(logits, targets, reference_class, reference, score)
    still_reference = logits.argmax(-1) == reference_class[:, None, None]
    per_image = _trapezoid(curves[:, 1], fractions) - _trapezoid(curves[:, 0], fractions)
    mean, ci_low, ci_high = mean_ci(per_image)
    accuracy_mif, accuracy_lif = still_reference[:, 0].mean(0), still_reference[:, 1].mean(0)
    accuracy_fidelity = float(_trapezoid((accuracy_lif - accuracy_mif)[None], fractions)[0])
    return FidelityResult(
        method="given" if maps is not None else method,
        fractions=fractions,
        mif=curves[:, 0],
        lif=curves[:, 1],
        fidelity=per_image,
        mean=mean,
        ci_low=ci_low,
        ci_high=ci_high,
        accuracy_mif=accuracy_mif,
        accuracy_lif=accuracy_lif,
        accuracy_fidelity=accuracy_fidelity,
        replaced_as_target=float((replaced.cpu().numpy() == targets).mean()),
        n_scored=int(np.isfinite(per_image).sum()),
        score=score,
        baseline=baseline,
        order_by=order_by,
        seconds_per_image=seconds / n,
    )


def importance_ranks(keys: torch.Tensor, tie_order: torch.Tensor) -> torch.Tensor:
    """Perturbation rank of every position, (2, M, P) long: [0] most important first (highest key
    first), [1] least important first (lowest key first); rank r is perturbed as the (r + 1)-th.

    ``keys`` (M, P): one ranking key per position (|map| or the map). ``tie_order`` (P,): a
    permutation of the positions; among equal keys, the earlier a position is in it, the earlier
    it is perturbed, in both orders.
    """
    permuted = keys[:, tie_order]
    steps = torch.arange(keys.shape[1], device=keys.device).expand_as(keys)
    ranks = []
    for descending in (True, False):
        order = tie_order[torch.sort(permuted, dim=1, descending=descending, stable=True).indices]
        ranks.append(torch.empty_like(order).scatter_(1, order, steps))
    return torch.stack(ranks)


def _perturbed_logits(
    model: nn.Module,
    x: torch.Tensor,
    keys: torch.Tensor,
    tie_order: torch.Tensor,
    counts: np.ndarray,
    replace,
    batch_size: int,
) -> np.ndarray:
    """Logits (N, 2, len(counts), K) of the copies of each image whose ``counts[j]`` first positions
    in MIF ([:, 0]) or LIF ([:, 1]) order are replaced by ``replace(rows, image, replaced)`` (the
    copies (R, C, *spatial) of images ``image`` (R,) at work rows ``rows`` (R,) with the positions
    ``replaced`` (R, *spatial) replaced).

    Row r of the work is image r // (2 J), order (r % (2 J)) // J and count r % J (J = len(counts));
    each chunk of rows is built, sent through the network and dropped before the next. An image's
    ranking is computed once and kept while the chunks still need it (its rows are consecutive).
    """
    n, per_order = x.shape[0], len(counts)
    per_image = 2 * per_order
    spatial = x.shape[2:]
    counts_t = torch.as_tensor(counts, device=x.device)
    outputs = []
    ranked: dict[int, torch.Tensor] = {}  # image -> its (2, P) ranks, for the images of the current chunk
    with torch.no_grad():
        for sl in chunks(n * per_image, batch_size):
            rows = torch.arange(sl.start, sl.stop, device=x.device)
            image = rows // per_image
            order = (rows % per_image) // per_order
            first, last = int(image[0]), int(image[-1])
            ranked = {i: r for i, r in ranked.items() if i >= first}
            missing = [i for i in range(first, last + 1) if i not in ranked]
            if missing:
                new = importance_ranks(keys[missing[0] : missing[-1] + 1], tie_order)
                ranked.update({i: new[:, k] for k, i in enumerate(missing)})
            ranks = torch.stack([ranked[i] for i in range(first, last + 1)], dim=1)
            replaced = ranks[order, image - first] < counts_t[rows % per_order, None]
            copies = replace(rows, image, replaced.view(len(rows), *spatial))
            outputs.append(_checked_logits(model(copies), len(rows)))
    return torch.cat(outputs).double().cpu().numpy().reshape(n, 2, per_order, -1)


def _logits_in_chunks(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits (N, K) of the unperturbed images, ``batch_size`` images per pass, without gradients."""
    with torch.no_grad():
        return torch.cat([_checked_logits(model(x[sl]), sl.stop - sl.start) for sl in chunks(len(x), batch_size)])


def _checked_logits(logits, rows: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape ({rows}, num_classes) for {rows} images, got {shape}")
    return logits


def _replacement(x: torch.Tensor, baseline: str, seed: int):
    """``replace(rows, image, replaced)`` for :func:`_perturbed_logits`: the copies of ``x[image]``
    with the positions ``replaced`` (R, *spatial) set by ``baseline``."""
    if baseline == "road":
        scale = ROAD_NOISE * x.flatten(1).std(dim=1)

        def impute(rows: torch.Tensor, image: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
            noise = _row_noise(rows, x.shape[1:], seed, x) * scale[image].view(-1, *[1] * (x.ndim - 1))
            return noisy_linear_imputation(x[image], replaced) + noise * replaced.unsqueeze(1)

        return impute
    dims = x.ndim - 2
    if baseline == "zero":
        fill = x.new_zeros((x.shape[0], 1, *[1] * dims))
    elif baseline == "mean":
        fill = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    else:
        fill = gaussian_blur(x, (BLUR_SIGMA,) * dims)

    def fill_in(rows: torch.Tensor, image: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        return torch.where(replaced.unsqueeze(1), fill[image], x[image])

    return fill_in


def _row_noise(rows: torch.Tensor, shape: torch.Size, seed: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise (R, *shape), row r drawn from its own generator seeded with (seed, r), so
    that a copy's noise does not depend on the chunk it is computed in."""
    draws = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(r)), dtype=torch.float64)
        for r in rows.tolist()
    ]
    return torch.stack(draws).to(device=like.device, dtype=like.dtype)


def _fully_replaced(x: torch.Tensor, baseline: str, seed: int) -> torch.Tensor:
    """The images with every position replaced (N, C, *spatial): what ``baseline`` puts in their
    place (``road``: the channel means plus its noise, nothing being left to impute from); for
    ``zero`` one all-zero image (1, C, *spatial), the same for every image."""
    if baseline == "blur":
        return gaussian_blur(x, (BLUR_SIGMA,) * (x.ndim - 2))
    if baseline == "zero":
        return torch.zeros_like(x[:1])
    means = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
    if baseline == "mean":
        return means.clone()
    rows = -1 - torch.arange(x.shape[0])  # noise rows of their own, apart from the copies'
    scale = ROAD_NOISE * x.flatten(1).std(dim=1).view(-1, *[1] * (x.ndim - 1))
    return means + _row_noise(rows, x.shape[1:], seed, x) * scale


def _neighbour_kernel(dims: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, 3, ..., 3) weights of the 3^dims - 1 neighbours of a position, 1 / squared distance,
    0 at the centre: in 2D 1 for the four direct neighbours and 1/2 for the diagonal ones, ROAD's
    1/6 and 1/12 up to a common factor (which the imputation does not depend on)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * dims, indexing="ij"))
    squared = (grid**2).sum(0).to(like.dtype)
    weights = torch.where(squared > 0, 1.0 / squared.clamp(min=1), torch.zeros_like(squared))
    return weights.to(like.device).view(1, 1, *[3] * dims)


def noisy_linear_imputation(
    images: torch.Tensor, replaced: torch.Tensor, tolerance: float = 1e-6, max_iterations: int | None = None
) -> torch.Tensor:
    """ROAD's linear imputation (Rong et al. 2022), without its noise: each replaced position of
    ``images`` (R, C, *spatial) takes the weighted mean of its neighbours inside the image
    (:func:`_neighbour_kernel`), replaced ones included, jointly for all replaced positions
    ``replaced`` (R, *spatial) bool; the others are kept. Channels are imputed independently.

    The equations ``sum_q w_pq (v_p - v_q) = 0`` for every replaced p are a graph Laplacian with the
    kept positions as boundary values: symmetric positive definite whenever a position is kept, so
    they are solved by conjugate gradients, batched over copies and channels on the images' device,
    in float64, to a relative residual of ``tolerance`` (at most ``max_iterations``, default 20 x
    the largest side). A copy with nothing kept has no boundary to impute from: its replaced
    positions become 0. ROAD's reference code solves the same system with a sparse direct solver.
    """
    rows, channels, spatial = images.shape[0], images.shape[1], images.shape[2:]
    dims = len(spatial)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    work = images.float().reshape(rows * channels, 1, *spatial)
    unknown = replaced.to(work.dtype).repeat_interleave(channels, 0).unsqueeze(1)
    kernel = _neighbour_kernel(dims, work)
    weight_sum = conv(torch.ones((1, 1, *spatial), dtype=work.dtype, device=work.device), kernel, padding=1)

    def laplacian(v: torch.Tensor) -> torch.Tensor:
        return unknown * (weight_sum * v - conv(unknown * v, kernel, padding=1))

    b = unknown * conv((1 - unknown) * work, kernel, padding=1)
    v = torch.zeros_like(work)
    r = b.clone()
    p = r.clone()
    axes = tuple(range(1, work.ndim))
    rr = (r * r).sum(axes, keepdim=True)
    limit = (tolerance**2) * (b * b).sum(axes, keepdim=True)
    for _ in range(max_iterations or 20 * max(spatial)):
        active = rr > limit
        if not bool(active.any()):
            break
        ap = laplacian(p)
        pap = (p * ap).sum(axes, keepdim=True)
        alpha = torch.where(active & (pap > 0), rr / torch.where(pap > 0, pap, 1.0), 0.0)
        v = v + alpha * p
        r = r - alpha * ap
        rr_next = (r * r).sum(axes, keepdim=True)
        beta = torch.where(active, rr_next / torch.where(rr > 0, rr, 1.0), 0.0)
        p = r + beta * p
        rr = rr_next
    filled = (1 - unknown) * work + unknown * v
    return filled.reshape(images.shape).to(images.dtype)


def _margins(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Target logit minus the best other logit, for logits (N, ..., K) and targets (N,): (N, ...)."""
    picked = targets.reshape(-1, *[1] * (logits.ndim - 1))
    target_logit = np.take_along_axis(logits, picked, -1)[..., 0]
    others = logits.copy()
    np.put_along_axis(others, picked, -np.inf, -1)
    return target_logit - others.max(-1)


def _scores(
    logits: np.ndarray, targets: np.ndarray, reference_class: np.ndarray, reference: np.ndarray, score: str
) -> np.ndarray:
    """Score (N, 2, F) of every copy from its logits (N, 2, F, K) and the unperturbed logits
    ``reference`` (N, K) (float64 numpy); NaN rows for images a score cannot rate."""
    if score == "accuracy":
        return (logits.argmax(-1) == reference_class[:, None, None]).astype(np.float64)
    picked = targets[:, None, None, None]
    if score == "probability":
        exp = np.exp(logits - logits.max(-1, keepdims=True))
        return np.take_along_axis(exp, picked, -1)[..., 0] / exp.sum(-1)
    if score == "margin":
        unperturbed = _margins(reference, targets)
        positive = unperturbed > 0
        ratio = _margins(logits, targets) / np.where(positive, unperturbed, 1.0)[:, None, None]
        return np.where(positive[:, None, None], np.clip(ratio, 0.0, 1.0), np.nan)
    reference_target = np.take_along_axis(reference, targets[:, None], -1)[:, 0]
    return np.take_along_axis(logits, picked, -1)[..., 0] / reference_target[:, None, None]


def _trapezoid(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under each row of ``curves`` (N, F) over ``fractions`` (F,) by the trapezoid rule, (N,)."""
    return ((curves[:, 1:] + curves[:, :-1]) / 2 * np.diff(fractions)).sum(1)


def _check_choice(name: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")


def _checked_fractions(fractions) -> np.ndarray:
    if fractions is None:
        return np.arange(0, 1.0, 0.05)
    values = np.asarray(fractions, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"fractions must be a 1D sequence of at least two values, got {fractions!r}")
    if not (np.isfinite(values).all() and (values >= 0).all() and (values < 1).all()):
        raise ValueError(f"fractions must lie in [0, 1), got {values.tolist()}")
    if (np.diff(values) <= 0).any():
        raise ValueError(f"fractions must be strictly increasing, got {values.tolist()}")
    return values


def _checked_maps(maps, x: torch.Tensor) -> torch.Tensor:
    """``maps`` as a float tensor on the images' device, after checking shape (N, 1, *spatial) and values."""
    if not isinstance(maps, (torch.Tensor, np.ndarray)):
        raise TypeError(f"maps must be a torch.Tensor or a numpy array, got {type(maps).__name__}")
    tensor = torch.as_tensor(maps).detach()
    expected = (x.shape[0], 1, *x.shape[2:])
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"maps must have shape {expected} (N, 1, *spatial) for these images, got {tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"maps must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(x.device) if tensor.is_floating_point() else tensor.to(x.device, torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError("maps contain NaN or infinite values")
    return tensor


def _checked_labels(labels, n: int, num_classes: int) -> np.ndarray:
    values = torch.as_tensor(labels).detach().cpu()
    if values.is_floating_point() or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {values.dtype}")
    values = values.reshape(-1).long().numpy()
    if values.size != n:
        raise ValueError(f"labels has {values.size} entries for a batch of {n} images")
    if (values < 0).any() or (values >= num_classes).any():
        raise ValueError(f"labels {values.tolist()} out of range for a model with {num_classes} classes")
    return values


def _check_positive_logits(reference_target_logits: torch.Tensor) -> None:
    bad = (reference_target_logits <= MIN_REFERENCE_LOGIT).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"{i}: {reference_target_logits[i].item():.4g}" for i in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(
            f"score='logit_ratio' needs every unperturbed target logit above {MIN_REFERENCE_LOGIT:g}, but "
            f"{len(bad)} image(s) have one at or below it (image: logit) {shown}{more}; the ratio would change "
            "sign or blow up. Use score='probability' (or 'accuracy'), or explain a class whose logit is positive."
        )
