"""Time the trust checks against Quantus and against their floor, in one run; 3D memory check.

    pip install -e ".[test,bench]"   # Quantus 0.6.0, the peer
    .venv/bin/python scripts/benchmark_trust.py --quick
    .venv/bin/python scripts/benchmark_trust.py --out docs/BENCHMARK_TRUST.md

Model: ``monai.networks.nets.DenseNet121(spatial_dims, in_channels=1, out_channels=2)`` in eval
mode with a fixed-seed random initialisation (speed does not depend on the weights; the values
compared between implementations are those of this model). Inputs: fixed-seed standard normal
images. Target: each image's predicted class, passed explicitly to every implementation.

Configurations: ``2d224`` (4 images of 224^2) and ``3d64`` (2 volumes of 64^3) for the timed
comparisons; ``3d96`` (2 volumes of 96^3) for the memory check. ``--quick`` shrinks them to 64^2,
32^3 and 32^3 (a run-through in a minute or two, not a measurement).

For each timed configuration and method (``--methods``, default gradient and gradcam), back to
back and round robin, best of ``--repeats``:

* **mprt**, cascading model randomization on the same sequence of states:
  ours ``model_randomization(model, images, method, target, mode="cascading",
  metrics=["spearman_abs"])`` (the curve, and the retention share its verdict rests on); the peer
  ``quantus.MPRT(layer_order="top_down", abs=True, normalise=True)`` (Spearman, its default) with
  ``explain_func`` = our ``explain`` and its layer generator replaced, for this call only, by our
  ``randomized_models`` (the same blocks, the same re-initialised weights); the floor: the
  explanation passes alone, one ``explain`` call over all images for the trained model and for
  each state (only the ``explain`` calls are timed). *max |diff|*: the largest difference between
  the two implementations' Spearman values over states and images.
* **mprt (Quantus layers)**, with ``--stock-order``: Quantus ``MPRT`` with its own generator (every
  module with ``reset_parameters``, 242 for DenseNet121, each state re-drawn from ``seed + 1``)
  against ours given the same module list as ``blocks`` (the same layers randomized in the same
  order, but our own random draws, so the values differ and are not compared). One run each;
  compare the seconds per state per image.
* **fidelity**: ours ``fidelity(model, images, maps, target, fractions=k/K, baseline="zero",
  score="probability", order_by="abs")`` (MIF and LIF curves), the peer two
  ``quantus.PixelFlipping(features_in_step=P/K, perturb_baseline=0.0)`` calls with ``softmax=True``
  on the same maps: one with ``abs=True`` on the maps (most important first, = MIF) and one with
  ``abs=False`` on ``max|map| - |map|`` (least important first, = LIF); the floor: the forward
  passes alone, the same number of rows (1 + 2 (K - 1) per image) in ours' chunk size (ours also
  classifies one all-zero image, the fully replaced one of every image).
  *max |diff|*: the largest difference of the curves at the K - 1 perturbed fractions both compute.

``3d96`` runs ``evaluation.trust.trust_card`` with every check (randomization, fidelity,
localization with a sphere mask per image, repeatability against a second DenseNet121) and every
default method and setting, in a fresh process, and reports its peak resident memory.

On a CPU shared with other jobs, OpenMP threads should not spin: the script sets
``OMP_WAIT_POLICY=PASSIVE`` unless it is set. Progress goes to stderr; the Markdown report to
stdout and, with ``--out``, to a file.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import argparse
import contextlib
import datetime
import math
import multiprocessing
import platform
import resource
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import psutil
import torch
from monai.networks.nets import DenseNet121
from torch import nn

from monai_sal_app.allocator import restart_with_batch_allocator
from monai_sal_app.evaluation.fidelity import fidelity
from monai_sal_app.evaluation.randomization import (
    model_randomization,
    randomization_blocks,
    randomized_models,
)
from monai_sal_app.saliency import explain
from monai_sal_app.saliency.core import auto_batch_size, model_guard

SEED = 0
# name -> (spatial dims, side, images); --quick -> QUICK_SIDES
CONFIGS = {"2d224": (2, 224, 4), "3d64": (3, 64, 2)}
TRUST_CONFIG = ("3d96", 3, 96, 2)
QUICK_SIDES = {"2d224": 64, "3d64": 32, "3d96": 32}
FIDELITY_STEPS = 16  # K: fractions k/K, k < K; P/K positions per Quantus step (P divisible by 16 here)
START = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, stamped with the elapsed time."""
    elapsed = time.perf_counter() - START
    print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {message}", file=sys.stderr, flush=True)


def quantus():
    """Quantus, imported on first use, with its chatty warnings off."""
    warnings.filterwarnings("ignore", module="quantus")
    import quantus as q

    return q


# ------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    name: str
    model: nn.Module
    images: torch.Tensor
    target: torch.Tensor

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def positions(self) -> int:
        return math.prod(self.images.shape[2:])

    def label(self) -> str:
        side = self.images.shape[-1]
        return f"{self.n} x {side}^{self.images.ndim - 2}"


def make_model(spatial_dims: int, seed: int = SEED) -> nn.Module:
    torch.manual_seed(seed)
    return DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=2).eval()


def make_images(spatial_dims: int, side: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn((n, 1, *([side] * spatial_dims)), generator=generator)


def make_setup(name: str, quick: bool) -> Setup:
    spatial_dims, side, n = CONFIGS[name]
    side = QUICK_SIDES[name] if quick else side
    model = make_model(spatial_dims)
    images = make_images(spatial_dims, side, n)
    with torch.no_grad():
        target = model(images).argmax(1)
    return Setup(name, model, images, target)


# -------------------------------------------------------------------------- Quantus adapters


def explain_func(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, method: str = "gradient", **params):
    """Our ``explain`` in Quantus' ``explain_func`` convention (numpy in, numpy (N, 1, *spatial) out)."""
    params.pop("device", None)
    images = torch.as_tensor(inputs, dtype=torch.float32)
    target = torch.as_tensor(np.asarray(targets)).long()
    return explain(model, images, method, target=target, **params).numpy()


@contextlib.contextmanager
def quantus_on_our_states(blocks: list[str], seed: int):
    """For the duration, Quantus' PyTorchModel yields our ``randomized_models`` states (cascading,
    ``blocks``, ``seed``) instead of randomizing every module with ``reset_parameters``."""
    from quantus.helpers.model.pytorch_model import PyTorchModel

    generator = PyTorchModel.get_random_layer_generator
    length = PyTorchModel.random_layer_generator_length

    def our_generator(self, order: str = "top_down", seed_: int = 42, **_):
        return randomized_models(self.model, blocks, "cascading", seed)

    PyTorchModel.get_random_layer_generator = our_generator
    PyTorchModel.random_layer_generator_length = property(lambda self: len(blocks))
    try:
        yield
    finally:
        PyTorchModel.get_random_layer_generator = generator
        PyTorchModel.random_layer_generator_length = length


def quantus_layers(model: nn.Module) -> list[str]:
    """The modules Quantus' MPRT randomizes, in its "top_down" order."""
    return [name for name, module in model.named_modules() if hasattr(module, "reset_parameters")][::-1]


def quantus_mprt(setup: Setup, method: str, seed: int) -> dict:
    return quantus().MPRT(
        layer_order="top_down", seed=seed, abs=True, normalise=True, disable_warnings=True, display_progressbar=False
    )(
        model=setup.model,
        x_batch=setup.images.numpy(),
        y_batch=setup.target.numpy(),
        channel_first=True,  # Quantus cannot infer it for 3D volumes
        explain_func=explain_func,
        explain_func_kwargs={"method": method},
        batch_size=setup.n,
    )


def quantus_pixel_flipping(setup: Setup, maps: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(MIF, LIF) curves (N, steps) of Quantus PixelFlipping on ``maps`` (N, 1, *spatial)."""
    q = quantus()
    common = {"features_in_step": setup.positions // steps, "normalise": True, "perturb_baseline": 0.0}
    call = {
        "model": setup.model,
        "x_batch": setup.images.numpy(),
        "y_batch": setup.target.numpy(),
        "channel_first": True,
    }
    mif = q.PixelFlipping(abs=True, disable_warnings=True, **common)(
        **call, a_batch=maps, softmax=True, batch_size=setup.n
    )
    magnitude = np.abs(maps.astype(np.float64))  # float64: max - |a| keeps float32 values apart
    lif = q.PixelFlipping(abs=False, disable_warnings=True, **common)(
        **call, a_batch=magnitude.max() - magnitude, softmax=True, batch_size=setup.n
    )
    return np.asarray(mif), np.asarray(lif)


# ------------------------------------------------------------------------------------ timing


@dataclass
class Row:
    config: str
    check: str
    method: str
    work: str
    ours: float | None = None
    peer_name: str = ""
    peer: float | None = None
    peer_note: str = ""
    floor: float | None = None
    diff: float | None = None
    per_unit: str = ""  # what ours / peer are divided by for the per-unit column
    units: int = 1
    ties: bool = False  # some |map| values repeat: tied positions are ordered differently by the two
    notes: list[str] = field(default_factory=list)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def peer_failure(error: Exception) -> str:
    """What the table says when the peer stops with ``error`` (its first sentence)."""
    what = "refused" if isinstance(error, AssertionError) else f"failed ({type(error).__name__})"
    first = str(error).split(". ")[0].split(", which")[0]
    return f"{what}: {first[:80]}"


def best(times: list[float]) -> float | None:
    return min(times) if times else None


def our_mprt(setup: Setup, method: str, blocks: list[str] | None = None):
    """Ours: cascading randomization scored by the Spearman correlation of |map| (Quantus MPRT's)."""
    return model_randomization(
        setup.model,
        setup.images,
        method,
        target=setup.target,
        mode="cascading",
        metrics=["spearman_abs"],
        seed=SEED,
        blocks=blocks,
    )


def round_robin(row: Row, ours, peer, floor, repeats: int, label: str):
    """Time ``ours``, ``peer`` and ``floor`` (which returns its own seconds) ``repeats`` times each,
    round robin with a different lead each time; the best times go into ``row``. A peer that fails
    (Quantus refuses some maps) is noted in ``row.peer_note`` and not run again. Returns (ours' last
    result, the peer's last result or None)."""
    ours_times, peer_times, floor_times = [], [], []
    result = peer_result = None
    for repeat in range(repeats):
        for which in np.roll(["ours", "peer", "floor"], repeat):
            if which == "ours":
                seconds, result = timed(ours)
                ours_times.append(seconds)
            elif which == "peer" and row.peer_note == "":
                try:
                    seconds, peer_result = timed(peer)
                    peer_times.append(seconds)
                except Exception as error:  # Quantus refuses some maps (assert_attributions) or fails
                    row.peer_note = peer_failure(error)
            elif which == "floor":
                floor_times.append(floor())
            log(f"  {label} repeat {repeat + 1} {which} done")
    row.ours, row.peer, row.floor = best(ours_times), best(peer_times), best(floor_times)
    return result, peer_result


def bench_mprt(setup: Setup, method: str, repeats: int) -> Row:
    blocks = randomization_blocks(setup.model)
    row = Row(setup.name, "mprt (same states)", method, f"{len(blocks)} states x {setup.label()}")
    row.peer_name = "Quantus MPRT"
    row.per_unit, row.units = "state x image", len(blocks) * setup.n
    explain(setup.model, setup.images, method, target=setup.target)  # warm-up

    def ours():
        return our_mprt(setup, method)

    def peer():
        with quantus_on_our_states(blocks, SEED):
            return quantus_mprt(setup, method, SEED)

    def floor() -> float:
        seconds, _ = timed(lambda: explain(setup.model, setup.images, method, target=setup.target))
        for _, network in randomized_models(setup.model, blocks, "cascading", SEED):
            spent, _ = timed(lambda net=network: explain(net, setup.images, method, target=setup.target))
            seconds += spent
        return seconds

    result, scores = round_robin(row, ours, peer, floor, repeats, f"{setup.name} mprt {method}")
    constant = dict(result.blank_maps)
    if constant:
        row.notes.append(f"blank (constant) maps, never scored, by state: {constant}")
    if scores is not None:
        ours_values = result.similarity["spearman_abs"]
        peer_values = np.array([scores[name] for name in blocks], dtype=np.float64)
        row.diff = float(np.abs(peer_values - ours_values).max())
        row.notes.append(
            "Quantus explains the trained model twice (its 'original' entry, maps vs recomputed maps: "
            f"{np.round(scores['original'], 6).tolist()})"
        )
    return row


def bench_mprt_stock(setup: Setup, method: str) -> Row:
    layers = quantus_layers(setup.model)
    row = Row(setup.name, "mprt (Quantus layers)", method, f"{len(layers)} states x {setup.label()}")
    row.peer_name = "Quantus MPRT (its generator)"
    row.per_unit, row.units = "state x image", len(layers) * setup.n

    def ours():
        return our_mprt(setup, method, blocks=layers)

    row.ours, _ = timed(ours)
    log(f"  {setup.name} mprt (Quantus layers) {method} ours done")
    try:
        row.peer, _ = timed(lambda: quantus_mprt(setup, method, SEED))
    except Exception as error:
        row.peer_note = peer_failure(error)
    log(f"  {setup.name} mprt (Quantus layers) {method} Quantus done")
    row.notes.append("one run each; random draws differ (values not compared)")
    return row


def bench_fidelity(setup: Setup, method: str, repeats: int, steps: int = FIDELITY_STEPS) -> Row:
    fractions = np.arange(steps) / steps
    per_image = 1 + 2 * (steps - 1)
    row = Row(setup.name, "fidelity", method, f"{steps - 1} fractions x 2 orders x {setup.label()}")
    row.peer_name = "Quantus PixelFlipping (MIF + LIF)"
    row.per_unit, row.units = "row", per_image * setup.n
    maps = explain(setup.model, setup.images, method, target=setup.target)
    maps_np = maps.numpy()
    with model_guard(setup.model):
        chunk = auto_batch_size(setup.model, setup.images, 2 * (steps - 1), forward_only=True)
    rows = setup.images.repeat_interleave(per_image, dim=0)  # what the floor sends through the network

    def ours():
        return fidelity(
            setup.model,
            setup.images,
            maps=maps,
            target=setup.target,
            fractions=fractions,
            baseline="zero",
            score="probability",
            order_by="abs",
            seed=SEED,
        )

    def peer():
        return quantus_pixel_flipping(setup, maps_np, steps)

    def floor() -> float:
        with model_guard(setup.model), torch.no_grad():
            start = time.perf_counter()
            for begin in range(0, len(rows), chunk):
                setup.model(rows[begin : begin + chunk])
            return time.perf_counter() - start

    result, curves = round_robin(row, ours, peer, floor, repeats, f"{setup.name} fidelity {method}")
    row.notes.append(
        f"ours: chunks of {chunk} rows, and one all-zero image (is the replacement itself evidence?); "
        f"Quantus: {steps} passes of {setup.n} rows per order"
    )
    if curves is not None:
        mif, lif = curves
        row.diff = float(
            max(
                np.abs(result.mif[:, 1:] - mif[:, : steps - 1]).max(),
                np.abs(result.lif[:, 1:] - lif[:, : steps - 1]).max(),
            )
        )
        flat = np.abs(maps_np.reshape(setup.n, -1))
        distinct = min(len(np.unique(r)) for r in flat) / setup.positions
        row.ties = distinct < 1
        if distinct < 0.999:
            row.notes.append(f"|map| has ties: as few as {distinct:.2%} distinct values per map")
    return row


# ---------------------------------------------------------------------------- 3D memory check


def _trust_child(side: int, n: int, queue) -> None:
    """Run in a fresh process: every trust check, default methods and settings, on n volumes."""
    from monai_sal_app.evaluation.trust import CHECKS, trust_card

    process = psutil.Process()
    model = make_model(3)
    other = make_model(3, seed=SEED + 1)
    images = make_images(3, side, n)
    grid = np.indices((side,) * 3) - (side - 1) / 2
    sphere = (np.sqrt((grid**2).sum(0)) <= side / 6).astype(np.uint8)
    rss_start = process.memory_info().rss
    start = time.perf_counter()
    card = trust_card(model, images, masks=[sphere] * n, checks=CHECKS, compare_with={"densenet121_seed1": other})
    seconds = time.perf_counter() - start
    summary = {
        method: {
            "verdicts": entry["verdicts"],
            "seconds_per_map": entry["seconds_per_map"],
            "randomization_s": entry["randomization"]["seconds"],
            "fidelity_s": entry["fidelity"]["seconds_per_image"] * n,
        }
        for method, entry in card["methods"].items()
    }
    queue.put(
        {
            "seconds": seconds,
            "rss_start": rss_start,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            "checks": card["settings"]["checks"],
            "methods": summary,
        }
    )


def run_trust_check(quick: bool) -> dict:
    name, _, side, n = TRUST_CONFIG
    side = QUICK_SIDES[name] if quick else side
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak RSS is this check's alone
    queue = context.Queue()
    available = psutil.virtual_memory().available
    log(f"{name}: trust card, every check, {n} volumes of {side}^3, in a fresh process")
    process = context.Process(target=_trust_child, args=(side, n, queue))
    process.start()
    outcome = None
    while process.is_alive() or not queue.empty():
        try:
            outcome = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: still running
            continue
    process.join()
    log(f"{name}: exit code {process.exitcode}")
    return {
        "config": name,
        "side": side,
        "n": n,
        "exitcode": process.exitcode,
        "available": available,
        "total": psutil.virtual_memory().total,
        "outcome": outcome,
    }


# ------------------------------------------------------------------------------------ report


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if value < 100 else f"{value:.1f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_diff(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def render_table(rows: list[Row]) -> str:
    lines = [
        "| config | check | method | work | ours s | peer | peer s | peer/ours | ours ms per unit | floor s "
        "| ours/floor | max abs diff | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer = fmt(r.peer) if r.peer is not None else (r.peer_note or "-")
        per_unit = "-" if r.ours is None else f"{1000 * r.ours / r.units:.1f} / {r.per_unit}"
        if r.peer is not None:
            per_unit += f" (peer {1000 * r.peer / r.units:.1f})"
        lines.append(
            f"| {r.config} | {r.check} | {r.method} | {r.work} | {fmt(r.ours)} | {r.peer_name} | {peer} | "
            f"{fmt_ratio(ratio(r.peer, r.ours))} | {per_unit} | {fmt(r.floor)} | {fmt_ratio(ratio(r.ours, r.floor))} | "
            f"{fmt_diff(r.diff)} | {'; '.join(r.notes)} |"
        )
    return "\n".join(lines)


def render_trust(trust: dict | None) -> str:
    if trust is None:
        return "not run"
    gib = 2**30
    outcome = trust["outcome"]
    head = (
        f"- {trust['config']}: `trust_card` on {trust['n']} volumes of {trust['side']}^3, DenseNet121, "
        f"machine memory {trust['total'] / gib:.1f} GiB, available at start {trust['available'] / gib:.1f} GiB"
    )
    if outcome is None:
        return (
            head + f"\n- **did not finish**: the process exited with code {trust['exitcode']} (out of memory or error)"
        )
    lines = [
        head,
        f"- checks: {', '.join(outcome['checks'])}; methods: {', '.join(outcome['methods'])}; "
        "default settings otherwise (localization against a centred sphere mask, repeatability against a "
        "second DenseNet121 initialised with seed 1)",
        f"- finished: exit code {trust['exitcode']}, {outcome['seconds']:.1f} s; resident memory "
        f"{outcome['rss_start'] / gib:.2f} GiB before the card, peak {outcome['peak_rss'] / gib:.2f} GiB",
        "",
        "| method | s per map | randomization s | fidelity s | verdicts |",
        "|---|---|---|---|---|",
    ]
    for method, entry in outcome["methods"].items():
        verdicts = ", ".join(f"{k}: {v}" for k, v in entry["verdicts"].items())
        lines.append(
            f"| {method} | {entry['seconds_per_map']:.3f} | {entry['randomization_s']:.1f} | "
            f"{entry['fidelity_s']:.1f} | {verdicts} |"
        )
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def render_targets(rows: list[Row], trust: dict | None) -> str:
    out = []
    for r in rows:
        speed = ratio(r.peer, r.ours)
        if r.check == "mprt (same states)":
            out.append(
                f"- {r.config} {r.method} MPRT >= 2x faster than Quantus: "
                f"{verdict(None if speed is None else speed >= 2)} ({fmt_ratio(speed) if speed else r.peer_note})"
            )
            out.append(
                f"- {r.config} {r.method} MPRT Spearman values equal to 1e-6: "
                f"{verdict(None if r.diff is None else r.diff <= 1e-6)} (max abs diff {fmt_diff(r.diff)})"
            )
            over = ratio(r.ours, r.floor)
            out.append(
                f"- {r.config} {r.method} MPRT within 1.2x of its floor: "
                f"{verdict(None if over is None else over <= 1.2)} ({fmt_ratio(over)})"
            )
        elif r.check == "fidelity":
            same = verdict(None if r.diff is None else r.diff <= 1e-5)
            if same == "MISSED" and r.ties:
                same = (
                    "n/a, the definitions differ on ties (Quantus: np.argsort order; ours: a fixed random permutation)"
                )
            out.append(
                f"- {r.config} {r.method} fidelity >= 2x faster than Quantus PixelFlipping: "
                f"{verdict(None if speed is None else speed >= 2)} ({fmt_ratio(speed) if speed else r.peer_note}); "
                f"same curve (max abs diff <= 1e-5): {same} ({fmt_diff(r.diff)}); "
                f"ours/floor {fmt_ratio(ratio(r.ours, r.floor))}"
            )
        elif r.check == "mprt (Quantus layers)":
            out.append(
                f"- {r.config} {r.method} MPRT on Quantus' own layer sequence, per state per image: "
                f"peer/ours {fmt_ratio(speed) if speed else r.peer_note}"
            )
    if trust is not None:
        ok = trust["outcome"] is not None and trust["exitcode"] == 0
        peak = f"peak RSS {trust['outcome']['peak_rss'] / 2**30:.2f} GiB" if ok else f"exit code {trust['exitcode']}"
        out.append(f"- {trust['config']}: every check with default settings, no out-of-memory: {verdict(ok)} ({peak})")
    return "\n".join(out)


def versions() -> str:
    parts = []
    for dist in ("torch", "monai", "numpy", "scipy", "quantus", "monai-sal"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def header(args, load_start: tuple[float, ...], done: bool) -> str:
    device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
    lines = [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- device: {device}; torch threads: {torch.get_num_threads()}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- versions: {versions()}",
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- load average at start (1/5/15 min): {' / '.join(f'{v:.2f}' for v in load_start)}; at "
        f"{'end' if done else 'last write'}: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- model: monai DenseNet121(spatial_dims, in_channels=1, out_channels=2), eval mode, random init (seed {SEED}); "
        f"speed does not depend on the weights. Inputs: seed-{SEED} standard normal images; target: each image's "
        "predicted class, given to both implementations.",
        f"- repeats: best of {args.repeats}, ours / peer / floor round robin; *peer/ours* > 1 means ours is faster; "
        "*ours ms per unit*: ours' seconds per state and image (MPRT) or per network row (fidelity), the peer's "
        "in brackets.",
    ]
    if not done:
        lines.append("- **partial**: the run had not finished when this was written")
    if args.quick:
        lines.append("- quick mode: small images (64^2, 32^3), one repeat: a run-through, not a measurement")
    return "\n".join(lines)


def render_report(rows: list[Row], trust: dict | None, args, load_start, done: bool) -> str:
    return "\n\n".join(
        [
            "## Run",
            header(args, load_start, done),
            "## Results",
            render_table(rows),
            "## Memory: every check on 3D volumes",
            render_trust(trust),
            "## Targets",
            render_targets(rows, trust),
        ]
    )


# -------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--methods", default="gradient,gradcam", help="comma-separated method names")
    parser.add_argument("--checks", default="mprt,fidelity", help="comma-separated, from mprt, fidelity")
    parser.add_argument("--repeats", type=int, default=3, help="best of R (ours, peer and floor round robin)")
    parser.add_argument(
        "--stock-order",
        default=None,
        help="CONFIG:METHOD pairs (comma-separated) that also run Quantus MPRT on its own layer sequence ('' for none;"
        " default 2d224:gradient, none with --quick)",
    )
    parser.add_argument("--no-trust", action="store_true", help="skip the 3d96 trust-card memory check")
    parser.add_argument("--quick", action="store_true", help="small images and one repeat: a run-through")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    if args.stock_order is None:
        args.stock_order = "" if args.quick else "2d224:gradient"
    args.stock_order = [tuple(p.split(":", 1)) for p in args.stock_order.split(",") if p.strip()]
    if args.quick:
        args.repeats = 1
    return args


def write(report: str, path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(
                "# Trust checks: speed and memory benchmark\n\nGenerated by `scripts/benchmark_trust.py`.\n\n"
                + report
                + "\n"
            )
        log(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        quantus()
    except ImportError:
        sys.exit('error: this benchmark needs Quantus: pip install -e ".[test,bench]"')
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    log(f"{torch.get_num_threads()} threads, configs {args.configs}, methods {args.methods}, checks {args.checks}")
    rows: list[Row] = []
    trust = None
    for name in args.configs:
        setup = make_setup(name, args.quick)
        for method in args.methods:
            if "mprt" in args.checks:
                rows.append(bench_mprt(setup, method, args.repeats))
                if (name, method) in args.stock_order:
                    rows.append(bench_mprt_stock(setup, method))
            if "fidelity" in args.checks:
                rows.append(bench_fidelity(setup, method, args.repeats))
        write(render_report(rows, trust, args, load_start, done=False), args.out)
    if not args.no_trust:
        trust = run_trust_check(args.quick)
    report = render_report(rows, trust, args, load_start, done=True)
    write(report, args.out)
    print(report)
    log("done")


if __name__ == "__main__":
    restart_with_batch_allocator()  # the memory allocator of batch work, as `monai-sal` uses it
    main()
