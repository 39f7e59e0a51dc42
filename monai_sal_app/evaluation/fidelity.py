"""Fidelity: do the positions a saliency map ranks highest carry the model's decision?

Each image's spatial positions (pixels in 2D, voxels in 3D; P of them) are ranked by its map, and
copies of the image are made with the first k = round(f * P) positions replaced by a baseline, all
channels at once, for every fraction f in ``fractions`` (default 0, 0.05, ..., 0.95), in two orders:

* most important first (MIF; "MoRF" in Samek et al.): the highest map value first;
* least important first (LIF; "LeRF"): the lowest map value first.

Every copy is scored (dimensionless): ``logit_ratio`` (default) the target logit divided by the
unperturbed image's target logit; ``probability`` the target's softmax probability; ``accuracy`` 1
when the predicted class (argmax of the logits) is still the reference class, else 0. The fidelity
of an image is AUC(LIF) - AUC(MIF), the areas by the trapezoid rule over the fractions (units:
score x fraction of the positions; with the default fractions and a score in [0, 1] it lies in
[-0.95, 0.95]). A map that follows what the model uses destroys the score early in MIF and late in
LIF, so its fidelity is positive; a random map scores about 0 and a constant map exactly 0. Also
returned: the accuracy curves, the fraction of images whose predicted class is still the
reference class (``labels`` when given, else the unperturbed prediction) at each fraction.

Choices (ours, also in docs/METHODS.md#fidelity):

* **Ranking.** By |map| (``order_by="abs"``) or the signed map (``"signed"``). Ties follow one
  random permutation of the P positions, ``numpy.random.default_rng(seed).permutation(P)`` (the
  earlier in it, the earlier perturbed), shared by all images and by both orders: tied positions
  are perturbed in a scattered rather than a raster order, and a constant map perturbs the same
  positions in MIF and LIF.
* **k.** ``numpy.rint(f * P)``: the nearest integer, halves to even. Fraction 0 is the unperturbed
  image: its score comes from the unperturbed pass (a ratio of exactly 1), not from extra copies.
* **Baselines.** ``zero`` (default): 0; ``mean``: the image's own mean per channel; ``blur``: the
  image Gaussian-blurred with sigma :data:`BLUR_SIGMA` pixels along every spatial axis (kernel
  truncated at 4 sigma, borders replicated), which flattens structures a few pixels wide and keeps
  the coarse intensity layout.
* **The ratio rule.** ``logit_ratio`` needs every unperturbed target logit above
  :data:`MIN_REFERENCE_LOGIT`; otherwise the ratio changes sign or blows up, and ``fidelity``
  raises ``ValueError`` naming the images (before any map or perturbation is computed) and
  pointing to ``score="probability"``.

All perturbed copies of all images go through the network in chunks of ``batch_size`` rows, built
chunk by chunk (never all copies of a volume at once), under ``model_guard`` and ``torch.no_grad``:
the model and the input are left as they were.

References: W. Samek, A. Binder, G. Montavon, S. Lapuschkin, K.-R. Müller, "Evaluating the
Visualization of What a Deep Neural Network Has Learned", IEEE TNNLS, 2017 (MoRF/LeRF
perturbation); L. Brocki, W. Marchadour, J. Maison, B. Badic, P. Papadimitroulas, M. Hatt,
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
from torch import nn

from monai_sal_app.metrics.stats import mean_ci
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
from monai_sal_app.saliency.meaningful_perturbation import gaussian_blur

__all__ = [
    "BASELINES",
    "BLUR_SIGMA",
    "MIN_REFERENCE_LOGIT",
    "ORDERS",
    "SCORES",
    "FidelityResult",
    "fidelity",
    "importance_ranks",
]

BASELINES = ("zero", "mean", "blur")
SCORES = ("logit_ratio", "probability", "accuracy")
ORDERS = ("abs", "signed")
BLUR_SIGMA = 4.0  # pixels (voxels) along every spatial axis, for baseline="blur"
MIN_REFERENCE_LOGIT = 1e-6  # score="logit_ratio" refuses an unperturbed target logit at or below it


@dataclass
class FidelityResult:
    """Perturbation curves and fidelity of one set of maps on N images at F fractions.

    ``mif`` and ``lif`` hold the score per image and fraction (N, F); ``fidelity`` (N,) is
    AUC(LIF) - AUC(MIF) per image, and ``mean``, ``ci_low``, ``ci_high`` its mean with a Student-t
    95% interval over images (``metrics.stats.mean_ci``; NaN bounds for one image).
    ``accuracy_mif`` and ``accuracy_lif`` (F,) are the fractions of images whose predicted class is
    still the reference class. ``seconds_per_image`` is the wall time of the unperturbed and
    perturbed passes divided by N, without computing the maps.
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
        return {f.name: _json_safe(getattr(self, f.name)) for f in fields(self)}


def _json_safe(value):
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


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
    score: str = "logit_ratio",
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
        baseline: "zero", "mean" or "blur" (module docstring).
        score: "logit_ratio", "probability" or "accuracy" (module docstring).
        order_by: "abs" (rank by |map|) or "signed".
        batch_size: rows (image copies) per forward pass; None picks it with ``auto_batch_size``
            (forward-only passes, 2 x the fractions above 0 per image).
        seed: seeds the permutation that breaks ties in the ranking.

    Returns:
        A :class:`FidelityResult`.
    """
    _check_choice("baseline", baseline, BASELINES)
    _check_choice("score", score, SCORES)
    _check_choice("order_by", order_by, ORDERS)
    fractions = _checked_fractions(fractions)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
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
            batch_size = auto_batch_size(model, x, 2 * max(1, int(perturbed.sum())), forward_only=True)
        start = time.perf_counter()
        reference_logits = _logits_in_chunks(model, x, batch_size)
        seconds = time.perf_counter() - start
        num_classes = reference_logits.shape[1]
        targets = reference_logits.argmax(1) if target is None else resolve_target(model, x, target)
        reference_target_logits = target_scores(reference_logits, targets)  # refuses a target >= num_classes
        reference_class = (
            reference_logits.argmax(1).cpu().numpy() if labels is None else _checked_labels(labels, n, num_classes)
        )
        if score == "logit_ratio":
            _check_positive_logits(reference_target_logits)

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
            baselines = _baseline_images(x, baseline)
            logits[:, :, perturbed] = _perturbed_logits(
                model, x, keys, tie_order, counts[perturbed], baselines, batch_size
            )
        seconds += time.perf_counter() - start

    targets = targets.cpu().numpy()
    curves = _scores(logits, targets, reference_class, reference_target_logits.double().cpu().numpy(), score)
    still_reference = logits.argmax(-1) == reference_class[:, None, None]
    per_image = _trapezoid(curves[:, 1], fractions) - _trapezoid(curves[:, 0], fractions)
    mean, ci_low, ci_high = mean_ci(per_image)
    return FidelityResult(
        method="given" if maps is not None else method,
        fractions=fractions,
        mif=curves[:, 0],
        lif=curves[:, 1],
        fidelity=per_image,
        mean=mean,
        ci_low=ci_low,
        ci_high=ci_high,
        accuracy_mif=still_reference[:, 0].mean(0),
        accuracy_lif=still_reference[:, 1].mean(0),
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
    baselines: torch.Tensor,
    batch_size: int,
) -> np.ndarray:
    """Logits (N, 2, len(counts), K) of the copies of each image whose ``counts[j]`` first positions
    in MIF ([:, 0]) or LIF ([:, 1]) order are replaced by ``baselines`` (N, C or 1, *spatial or 1s).

    Row r of the work is image r // (2 J), order (r % (2 J)) // J and count r % J (J = len(counts));
    each chunk of rows is built, sent through the network and dropped before the next.
    """
    n, per_order = x.shape[0], len(counts)
    per_image = 2 * per_order
    spatial = x.shape[2:]
    counts_t = torch.as_tensor(counts, device=x.device)
    outputs = []
    with torch.no_grad():
        for sl in chunks(n * per_image, batch_size):
            rows = torch.arange(sl.start, sl.stop, device=x.device)
            image = rows // per_image
            order = (rows % per_image) // per_order
            first = int(image[0])
            ranks = importance_ranks(keys[first : int(image[-1]) + 1], tie_order)
            replaced = ranks[order, image - first] < counts_t[rows % per_order, None]
            copies = torch.where(replaced.view(len(rows), 1, *spatial), baselines[image], x[image])
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


def _baseline_images(x: torch.Tensor, baseline: str) -> torch.Tensor:
    """What replaces a perturbed position, indexable by image: (N, 1, 1...) zeros, (N, C, 1...) channel
    means, or (N, C, *spatial) blurred images."""
    dims = x.ndim - 2
    if baseline == "zero":
        return x.new_zeros((x.shape[0], 1, *[1] * dims))
    if baseline == "mean":
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    return gaussian_blur(x, (BLUR_SIGMA,) * dims)


def _scores(
    logits: np.ndarray, targets: np.ndarray, reference_class: np.ndarray, reference_logits: np.ndarray, score: str
) -> np.ndarray:
    """Score (N, 2, F) of every copy from its logits (N, 2, F, K) (float64 numpy)."""
    if score == "accuracy":
        return (logits.argmax(-1) == reference_class[:, None, None]).astype(np.float64)
    picked = targets[:, None, None, None]
    if score == "probability":
        exp = np.exp(logits - logits.max(-1, keepdims=True))
        return np.take_along_axis(exp, picked, -1)[..., 0] / exp.sum(-1)
    return np.take_along_axis(logits, picked, -1)[..., 0] / reference_logits[:, None, None]


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
