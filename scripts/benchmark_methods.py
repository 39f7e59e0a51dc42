"""Time every saliency method of ``explain`` against its floor and its peers, in one run.

    .venv/bin/python scripts/benchmark_methods.py --quick
    .venv/bin/python scripts/benchmark_methods.py \\
        --configs 2d224b1,2d224b8,3d64,3d96 --out docs/BENCHMARK_METHODS.md

Model: ``monai.networks.nets.DenseNet121(spatial_dims, in_channels=1, out_channels=2)`` in eval
mode with a fixed-seed random initialisation (speed does not depend on the weights), on CUDA
when available, else CPU. Inputs: fixed-seed standard normal images. Target: the predicted class
of each image, passed explicitly to ours and to every peer.

Configurations: ``2d224b1`` (one 224 x 224 image), ``2d224b8`` (eight), ``3d64`` (one 64^3
volume), ``3d96`` (one 96^3 volume).

For each configuration and method the script measures, back to back:

* ours: ``explain(model, images, method, target, **work)``, best of R repeats (``--repeats`` for
  methods of at most 2 passes per image, ``--repeats-slow`` for the others);
* the floor: the nominal number of network passes of the method (below) times the measured time
  of one pass. "floor@chunk" uses the chunk sizes the method actually ran (seen by a forward
  pre-hook on the model); "floor@best" uses the best per-row time over a sweep of batch sizes
  (powers of two up to the memory limit and ``--sweep-max``, stopping after two sizes that are
  clearly slower per row than the best), which is the floor the targets refer to;
* the peers on the same images with the same steps, samples, windows and strides.

Nominal passes per image (forward+backward unless said): gradient 1, gradient_x_input 1,
smoothgrad n_samples, integrated_gradients steps (ours includes both path ends in ``steps``, no
extra pass), smoothgrad_ig n_samples * steps, guided_backprop 1, gradcam 1, guided_gradcam 2 (captum's count; ours
shares one forward pass between its plain and its guided backward pass),
occlusion one *forward-only* pass per window, xrai 2 * steps (+ segmentation and region
selection, timed separately), meaningful_perturbation ``steps`` (each step depends on the
previous one, so only the images of a batch share a pass). Rows the run passes beyond these
(occlusion's unoccluded image, one more row per image) are counted and shown, and count
against ours.

Work per configuration: the library's defaults, or ``--quick`` (a few steps, large occlusion
windows: a run-through in a few minutes, not a measurement), then ``--trimmed`` (less work for
2d224b8, 3d64 and 3d96, see ``TRIMMED_WORK``; 2d224b1 keeps the defaults), then ``--steps-3d N``
(IG, SmoothGrad-IG, XRAI and meaningful-perturbation steps of the 3D configurations), then
``--set CONFIG:METHOD.PARAM=VALUE`` (any work parameter; CONFIG is a configuration name, ``2d``,
``3d`` or ``all``). The work is applied identically to ours, the peers and the floor, and printed
in the table.

On a CPU shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``: with the default
(spinning) policy, two OpenMP threads on two busy cores can make one pass 30x slower.

Peers whose one pass would not fit in memory are reported as skipped (a forward pre-hook refuses
a pass larger than ``--memory-fraction`` of the free memory allows) rather than run. Peers that
explain one image per call (monai.visualize, PAIR, TorchRay) are timed on the first
``--peer-images`` images of a batch and reported per image.

Progress goes to stderr; the Markdown report to stdout and, with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import DenseNet121
from torch import nn

from monai_sal_app.saliency import available_methods, explain, get_method, model_guard
from monai_sal_app.saliency.core import auto_batch_size, max_rows_in_memory
from monai_sal_app.saliency.occlusion import occlusion_geometry

CONFIGS = {"2d224b1": (2, 224, 1), "2d224b8": (2, 224, 8), "3d64": (3, 64, 1), "3d96": (3, 96, 1)}
GRADCAM_LAYER = "class_layers.relu"  # MONAI DenseNet's last feature block (ours finds the same)
SEED = 0

# The knobs that set how much work a method does, with the library's defaults filled in later.
WORK_PARAMS = {
    "smoothgrad": ("n_samples",),
    "integrated_gradients": ("steps",),
    "smoothgrad_ig": ("n_samples", "steps"),
    "occlusion": ("window", "stride"),
    "xrai": ("steps",),
    "meaningful_perturbation": ("steps",),
}
QUICK_WORK = {
    "smoothgrad": {"n_samples": 4},
    "integrated_gradients": {"steps": 4},
    "smoothgrad_ig": {"n_samples": 2, "steps": 2},
    "xrai": {"steps": 2},
    "meaningful_perturbation": {"steps": 2},
}
# --trimmed: the work that makes the full run feasible on a CPU. 2d224b1 keeps
# the library's defaults (the reference numbers); the batch of 8 and the volumes do less.
TRIMMED_WORK = {
    "2d224b8": {
        "integrated_gradients": {"steps": 20},
        "smoothgrad": {"n_samples": 10},
        "smoothgrad_ig": {"n_samples": 2, "steps": 10},
        "occlusion": {"window": 32, "stride": 32},
        "xrai": {"steps": 10},
        "meaningful_perturbation": {"steps": 20},
    },
    "3d64": {
        "integrated_gradients": {"steps": 10},
        "smoothgrad_ig": {"n_samples": 2, "steps": 10},
        "occlusion": {"window": 16, "stride": 16},
        "meaningful_perturbation": {"steps": 10},
    },
    "3d96": {
        "integrated_gradients": {"steps": 8},
        "smoothgrad": {"n_samples": 10},
        "smoothgrad_ig": {"n_samples": 2, "steps": 8},
        "occlusion": {"window": 32, "stride": 32},
        "xrai": {"steps": 8},
        "meaningful_perturbation": {"steps": 8},
    },
}
STEP_PARAMS_3D = {
    "integrated_gradients": "steps",
    "smoothgrad_ig": "steps",
    "xrai": "steps",
    "meaningful_perturbation": "steps",
}


def log(message: str) -> None:
    """A progress line on stderr, stamped with the elapsed time."""
    elapsed = time.perf_counter() - START
    print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {message}", file=sys.stderr, flush=True)


START = time.perf_counter()


# ----------------------------------------------------------------------------------- passes


class WouldExceedMemory(RuntimeError):
    """Raised by the pass guard instead of running a forward+backward pass that would not fit."""


@dataclass
class PassLog:
    """Every forward call of the model while active: (rows, grad enabled)."""

    calls: list[tuple[int, bool]] = field(default_factory=list)

    def grad_rows(self) -> int:
        return sum(r for r, g in self.calls if g)

    def describe(self) -> str:
        """'48 fb (chunks 37,11) + 2 f' style summary of the calls."""
        parts = []
        for grad, name in ((True, "fb"), (False, "f")):
            sizes = [r for r, g in self.calls if g == grad]
            if sizes:
                distinct = sorted(set(sizes), reverse=True)
                parts.append(
                    f"{sum(sizes)} {name} in {len(sizes)} pass{'es' if len(sizes) > 1 else ''}"
                    f" (rows {','.join(map(str, distinct[:3]))}{'..' if len(distinct) > 3 else ''})"
                )
        return " + ".join(parts) or "none"


@contextlib.contextmanager
def watch_passes(model: nn.Module, max_grad_rows: int) -> PassLog:
    """Record every forward call of ``model``; refuse a gradient-enabled one above ``max_grad_rows``."""
    record = PassLog()

    def pre_hook(module, args):
        rows = int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 0
        grad = torch.is_grad_enabled()
        if grad and rows > max_grad_rows:
            raise WouldExceedMemory(f"one pass of {rows} rows (at most {max_grad_rows} fit in the free memory)")
        record.calls.append((rows, grad))

    handle = model.register_forward_pre_hook(pre_hook)
    try:
        yield record
    finally:
        handle.remove()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PassTimer:
    """Best-of-2 wall time of one forward+backward (or forward-only) pass of ``rows`` random inputs,
    cached per (rows, grad). Run under ``model_guard`` like ``explain`` (frozen parameters, no
    in-place activations), with the gradient taken with respect to the input only."""

    def __init__(self, model: nn.Module, row_shape: tuple[int, ...], device: torch.device):
        self.model, self.row_shape, self.device = model, row_shape, device
        self.cache: dict[tuple[int, bool], float] = {}

    def time(self, rows: int, grad: bool, fresh: bool = False) -> float:
        """Cached time of one pass; ``fresh`` measures again (and caches the new value)."""
        key = (rows, grad)
        if fresh or key not in self.cache:
            generator = torch.Generator(device=self.device).manual_seed(SEED + rows)
            x = torch.randn((rows, *self.row_shape), generator=generator, device=self.device)
            best = math.inf
            with model_guard(self.model):
                for _ in range(2):
                    synchronize(self.device)
                    start = time.perf_counter()
                    if grad:
                        with torch.enable_grad():
                            xg = x.clone().requires_grad_(True)
                            torch.autograd.grad(self.model(xg)[:, 0].sum(), xg)
                    else:
                        with torch.no_grad():
                            self.model(x)
                    synchronize(self.device)
                    best = min(best, time.perf_counter() - start)
            self.cache[key] = best
            log(f"    pass timing: {rows} row(s) {'fwd+bwd' if grad else 'fwd'} {best:.3f} s ({best / rows:.3f} s/row)")
        return self.cache[key]

    def chunked(self, rows: int, chunk: int, grad: bool) -> float:
        """Time of ``rows`` rows in passes of ``chunk`` rows (the last pass holds the rest), with
        the pass times measured afresh (right after the method they are the floor of)."""
        chunk = max(1, min(chunk, rows))
        full, rest = divmod(rows, chunk)
        return full * self.time(chunk, grad, fresh=True) + (self.time(rest, grad, fresh=True) if rest else 0.0)

    def best_rate(self, max_rows: int, grad: bool, extra: int | None = None) -> tuple[float, int]:
        """(lowest seconds per row, its batch size) over powers of two up to ``max_rows`` (and
        ``extra``), stopping after two sizes in a row that are slower per row than 1.15 x the best
        (one slow size can be noise from other jobs on a shared machine).

        The sweep uses cached pass times (each size is measured once per configuration); the
        winning size is then measured afresh, so the rate returned is from this moment."""
        best, best_rows, rows, worse = math.inf, 1, 1, 0
        while rows <= max_rows and worse < 2:
            rate = self.time(rows, grad) / rows
            if rate < best:
                best, best_rows = rate, rows
            worse = worse + 1 if rate > 1.15 * best else 0
            rows *= 2
        if extra and extra <= max_rows:
            rate = self.time(extra, grad) / extra
            if rate < best:
                best, best_rows = rate, extra
        return self.time(best_rows, grad, fresh=True) / best_rows, best_rows


# ------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    """One configuration: model, images, targets, pass timer and memory limit."""

    name: str
    spatial_dims: int
    side: int
    batch: int
    device: torch.device
    model: nn.Module
    images: torch.Tensor
    target: torch.Tensor
    timer: PassTimer
    max_grad_rows: int

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.images.shape[2:])


def make_setup(name: str, device: torch.device, memory_fraction: float) -> Setup:
    spatial_dims, side, batch = CONFIGS[name]
    torch.manual_seed(SEED)
    model = DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=2).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(SEED)
    images = torch.randn((batch, 1, *([side] * spatial_dims)), generator=generator, device=device)
    with torch.no_grad():
        target = model(images).argmax(1)
    # rows whose forward+backward fit in memory_fraction of the free memory (measured activations)
    max_grad_rows = max_rows_in_memory(model, images[:1], memory_fraction=memory_fraction)
    return Setup(
        name,
        spatial_dims,
        side,
        batch,
        device,
        model,
        images,
        target,
        PassTimer(model, tuple(images.shape[1:]), device),
        max_grad_rows,
    )


def config_work(setup: Setup, method: str, args) -> dict[str, Any]:
    """The work parameters of ``method`` in this configuration (see the module docstring)."""
    if method not in WORK_PARAMS:
        return {}
    defaults = available_methods()[method]["defaults"]
    work = {p: defaults[p] for p in WORK_PARAMS[method]}
    if args.quick:
        work.update(
            {"window": setup.side // 2, "stride": setup.side // 2} if method == "occlusion" else QUICK_WORK[method]
        )
    if args.trimmed:
        work.update(TRIMMED_WORK.get(setup.name, {}).get(method, {}))
    if args.steps_3d and setup.spatial_dims == 3 and method in STEP_PARAMS_3D:
        work[STEP_PARAMS_3D[method]] = args.steps_3d
    for scope, method_name, param, value in args.set:
        applies = scope in ("all", setup.name) or scope == f"{setup.spatial_dims}d"
        if applies and method_name == method:
            work[param] = value
    if method == "occlusion":  # explicit geometry, so that the peers get exactly the same windows
        window, stride = occlusion_geometry(setup.spatial, work["window"], work["stride"])
        work = {
            "window": window[0] if len(set(window)) == 1 else list(window),
            "stride": stride[0] if len(set(stride)) == 1 else list(stride),
        }
    return work


def per_axis(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * dims


def nominal_passes(method: str, work: dict[str, Any], setup: Setup) -> tuple[int, bool, str]:
    """(passes per image, forward+backward?, formula) of the method's floor."""
    if method in ("gradient", "gradient_x_input", "guided_backprop", "gradcam"):
        return 1, True, "1"
    if method == "guided_gradcam":
        return 2, True, "2"
    if method == "smoothgrad":
        return work["n_samples"], True, "n_samples"
    if method == "integrated_gradients":
        return work["steps"], True, "steps"
    if method == "smoothgrad_ig":
        return work["n_samples"] * work["steps"], True, "n_samples*steps"
    if method == "occlusion":
        window, stride = per_axis(work["window"], setup.spatial_dims), per_axis(work["stride"], setup.spatial_dims)
        count = math.prod(math.ceil((s - w) / t) + 1 for s, w, t in zip(setup.spatial, window, stride))
        return count, False, "windows (fwd only)"
    if method == "xrai":
        return 2 * work["steps"], True, "2*steps + segmentation"
    if method == "meaningful_perturbation":
        return work["steps"], True, "steps"
    raise ValueError(f"no pass count known for method {method!r}; add it to nominal_passes")


# ----------------------------------------------------------------------------- timing runs


@dataclass
class Timing:
    """Seconds per image of one implementation, or why it has none."""

    name: str
    seconds_per_image: float | None = None
    note: str = ""
    passes: str = ""
    calls: list[tuple[int, bool]] = field(default_factory=list)


def clear_parameter_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def run_once(name: str, fn: Callable[[], Any], images_done: int, setup: Setup, note: str = "") -> Timing:
    """Time one call of ``fn`` (which explains ``images_done`` images) under the pass guard.

    Never raises: a pass that would not fit, or a peer's error, is returned as the timing's note.
    The model's ``requires_grad`` flags are restored and parameter gradients (which some peers
    accumulate with ``.backward()``) dropped afterwards.
    """
    requires_grad = [p.requires_grad for p in setup.model.parameters()]
    try:
        with watch_passes(setup.model, setup.max_grad_rows) as record:
            synchronize(setup.device)
            start = time.perf_counter()
            fn()
            synchronize(setup.device)
            seconds = time.perf_counter() - start
        timing = Timing(name, seconds / images_done, note, record.describe(), record.calls)
    except WouldExceedMemory as exc:
        timing = Timing(name, None, f"skipped: {exc}")
    except Exception as exc:  # a peer failing is a result to report, not a reason to stop
        log(f"    {name} failed: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        timing = Timing(name, None, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    finally:
        for p, flag in zip(setup.model.parameters(), requires_grad):
            p.requires_grad_(flag)
        clear_parameter_grads(setup.model)
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    shown = f"{timing.seconds_per_image:.3f} s/img" if timing.seconds_per_image is not None else timing.note
    log(f"    {name}: {shown}  [{timing.passes}]")
    return timing


def faster(best: Timing | None, new: Timing) -> Timing:
    """The better of two timings of one implementation (a failed run never replaces a good one)."""
    if best is None or best.seconds_per_image is None:
        return new
    if new.seconds_per_image is not None and new.seconds_per_image < best.seconds_per_image:
        return new
    return best


# ------------------------------------------------------------------------------------ peers


def _captum():
    import captum.attr as captum_attr

    return captum_attr


def peers_for(
    method: str, work: dict[str, Any], setup: Setup, peer_images: int
) -> list[tuple[str, Callable[[], Any], int, str]]:
    """(name, call, images explained by the call, note) for every peer of ``method``."""
    model, x, t, dims = setup.model, setup.images, setup.target, setup.spatial_dims
    k = min(peer_images, setup.batch)
    per_image_note = f"first {k} of {setup.batch} images, one per call" if k < setup.batch else ""
    interp = "bilinear" if dims == 2 else "trilinear"
    layer = dict(model.named_modules())[GRADCAM_LAYER]
    peers: list[tuple[str, Callable[[], Any], int, str]] = []

    def one_by_one(call: Callable[[torch.Tensor, int], Any]) -> Callable[[], Any]:
        return lambda: [call(x[i : i + 1], int(t[i])) for i in range(k)]

    def noise_std(sigma: float) -> float:
        return float(sigma * (x.max() - x.min()))

    if method == "gradient":
        ca = _captum()
        peers.append(("captum Saliency", lambda: ca.Saliency(model).attribute(x, target=t, abs=False), setup.batch, ""))
        import monai.visualize as mv

        peers.append(
            ("monai VanillaGrad", one_by_one(lambda xi, ti: mv.VanillaGrad(model)(xi, index=ti)), k, per_image_note)
        )
    elif method == "gradient_x_input":
        ca = _captum()
        peers.append(
            ("captum InputXGradient", lambda: ca.InputXGradient(model).attribute(x, target=t), setup.batch, "")
        )
    elif method == "smoothgrad":
        ca = _captum()
        n, sigma = work["n_samples"], available_methods()["smoothgrad"]["defaults"]["sigma"]

        def nt(batch_size):
            return lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=n,
                nt_samples_batch_size=batch_size,
                stdevs=noise_std(sigma),
                target=t,
                abs=False,
            )

        peers.append(("captum NoiseTunnel(Saliency)", nt(None), setup.batch, "nt_samples_batch_size default (all)"))
        peers.append((f"captum NoiseTunnel(Saliency) nt_samples_batch_size={n}", nt(n), setup.batch, ""))
        import monai.visualize as mv

        sg = mv.SmoothGrad(model, stdev_spread=sigma, n_samples=n, magnitude=False, verbose=False)
        peers.append(("monai SmoothGrad", one_by_one(lambda xi, ti: sg(xi, index=ti)), k, per_image_note))
    elif method == "integrated_gradients":
        ca = _captum()
        steps = work["steps"]
        peers.append(
            (
                "captum IG (one batch)",
                lambda: ca.IntegratedGradients(model).attribute(x, target=t, n_steps=steps),
                setup.batch,
                "default call",
            )
        )
        peers.append(
            (
                "captum IG internal_batch_size=10",
                lambda: ca.IntegratedGradients(model).attribute(x, target=t, n_steps=steps, internal_batch_size=10),
                setup.batch,
                "",
            )
        )
    elif method == "smoothgrad_ig":
        ca = _captum()
        n, steps = work["n_samples"], work["steps"]
        sigma = available_methods()["smoothgrad_ig"]["defaults"]["sigma"]
        peers.append(
            (
                "captum NoiseTunnel(IG) internal_batch_size=10",
                lambda: ca.NoiseTunnel(ca.IntegratedGradients(model)).attribute(
                    x,
                    nt_type="smoothgrad",
                    nt_samples=n,
                    stdevs=noise_std(sigma),
                    target=t,
                    n_steps=steps,
                    internal_batch_size=10,
                ),
                setup.batch,
                "",
            )
        )
    elif method == "guided_backprop":
        ca = _captum()
        peers.append(
            ("captum GuidedBackprop", lambda: ca.GuidedBackprop(model).attribute(x, target=t), setup.batch, "")
        )
        import monai.visualize as mv

        peers.append(
            (
                "monai GuidedBackpropGrad",
                one_by_one(lambda xi, ti: mv.GuidedBackpropGrad(model)(xi, index=ti)),
                k,
                per_image_note,
            )
        )
    elif method == "gradcam":
        ca = _captum()
        peers.append(
            (
                "captum LayerGradCam (+upsample)",
                lambda: ca.LayerAttribution.interpolate(
                    ca.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True), setup.spatial, interp
                ),
                setup.batch,
                "",
            )
        )
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def pytorch_grad_cam_call():
            with PGCGradCAM(model=model, target_layers=[layer]) as cam:
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

        peers.append(("pytorch-grad-cam GradCAM", pytorch_grad_cam_call, setup.batch, ""))
        import monai.visualize as mv

        peers.append(
            (
                "monai GradCAM",
                lambda: mv.GradCAM(nn_module=model, target_layers=GRADCAM_LAYER)(x, class_idx=None),
                setup.batch,
                "class_idx=None (= the predicted targets)",
            )
        )
    elif method == "guided_gradcam":
        ca = _captum()
        peers.append(
            (
                "captum GuidedGradCam",
                lambda: ca.GuidedGradCam(model, layer).attribute(x, target=t, interpolate_mode=interp),
                setup.batch,
                "",
            )
        )
    elif method == "occlusion":
        ca = _captum()
        window, stride = per_axis(work["window"], dims), per_axis(work["stride"], dims)
        peers.append(
            (
                "captum Occlusion perturbations_per_eval=16",
                lambda: ca.Occlusion(model).attribute(
                    x,
                    sliding_window_shapes=(1, *window),
                    strides=(1, *stride),
                    baselines=0.0,
                    target=t,
                    perturbations_per_eval=16,
                ),
                setup.batch,
                "",
            )
        )
        import monai.visualize as mv

        overlaps = {1.0 - s / w for s, w in zip(stride, window)}
        if len(overlaps) == 1:
            occ = mv.OcclusionSensitivity(
                model, mask_size=list(window), n_batch=16, verbose=False, mode=0.0, overlap=overlaps.pop()
            )
            peers.append(
                ("monai OcclusionSensitivity n_batch=16", one_by_one(lambda xi, ti: occ(xi)), k, per_image_note)
            )
        else:
            peers.append(("monai OcclusionSensitivity", None, k, "n/a: one overlap for all axes only"))
    elif method == "xrai" and dims == 2:
        try:
            from saliency.core import INPUT_OUTPUT_GRADIENTS, XRAI, XRAIParameters
        except ImportError as exc:
            peers.append(("PAIR XRAI", None, k, f"n/a (not importable: {exc})"))
        else:

            def call_model(x_batch, call_model_args=None, expected_keys=None):
                xb = torch.as_tensor(np.moveaxis(x_batch, -1, 1), dtype=torch.float32, device=setup.device)
                xb.requires_grad_(True)
                score = model(xb)[:, call_model_args["target"]].sum()
                (grad,) = torch.autograd.grad(score, xb)
                return {INPUT_OUTPUT_GRADIENTS: np.moveaxis(grad.detach().cpu().numpy(), 1, -1)}

            images_hwc = np.moveaxis(x.detach().cpu().numpy(), 1, -1)
            params = XRAIParameters(steps=work["steps"])
            peers.append(
                (
                    "PAIR XRAI batch_size=20",
                    lambda: [
                        XRAI().GetMask(
                            images_hwc[i],
                            call_model,
                            call_model_args={"target": int(t[i])},
                            batch_size=20,
                            extra_parameters=params,
                        )
                        for i in range(k)
                    ],
                    k,
                    per_image_note,
                )
            )
    elif method == "meaningful_perturbation":
        if dims != 2:
            peers.append(("TorchRay extremal_perturbation", None, k, "n/a (2D only)"))
        else:
            try:
                from torchray.attribution.extremal_perturbation import extremal_perturbation
            except Exception as exc:  # any import failure is reported in the cell
                peers.append(
                    ("TorchRay extremal_perturbation", None, k, f"n/a (not installable: {type(exc).__name__}: {exc})")
                )
            else:
                steps = work["steps"]
                peers.append(
                    (
                        "TorchRay extremal_perturbation areas=[0.1]",
                        one_by_one(lambda xi, ti: extremal_perturbation(model, xi, ti, areas=[0.1], max_iter=steps)),
                        k,
                        (per_image_note + "; " if per_image_note else "") + "max_iter=steps",
                    )
                )
    return peers


# ---------------------------------------------------------------------------- XRAI pieces


def xrai_own_work(setup: Setup, peer_images: int) -> tuple[Timing, Timing | None]:
    """Segmentation + region selection per image: ours, and PAIR's (2D), on the same images and
    the same attribution (the gradient map, so that no IG is paid for here)."""
    from monai_sal_app.saliency import xrai as ours_xrai

    attribution = explain(setup.model, setup.images, "gradient", setup.target)[:, 0].cpu().double().numpy()
    pixels = setup.images.detach().cpu().double().numpy()
    k = min(peer_images, setup.batch)

    def ours() -> None:
        for i in range(setup.batch):
            if setup.spatial_dims == 2:
                membership = ours_xrai.segment_membership_2d(pixels[i])
            else:
                membership = ours_xrai.segment_membership_3d(pixels[i])
            ours_xrai.select_regions(attribution[i].reshape(-1), membership)

    ours_timing = run_once("ours: segmentation + selection", ours, setup.batch, setup)
    if setup.spatial_dims != 2:
        return ours_timing, None
    try:
        from saliency.core.xrai import XRAI, _gain_density, _get_segments_felzenszwalb
    except ImportError as exc:
        return ours_timing, Timing("PAIR segmentation + _xrai", None, f"n/a (not importable: {exc})")
    images_hwc = np.moveaxis(pixels, 1, -1)

    def pair() -> None:
        for i in range(k):
            segments = _get_segments_felzenszwalb(images_hwc[i])
            XRAI._xrai(
                attr=attribution[i],
                segs=segments,
                gain_fun=_gain_density,
                area_perc_th=1.0,
                min_pixel_diff=50,
                integer_segments=True,
            )

    return ours_timing, run_once("PAIR _get_segments_felzenszwalb + _xrai", pair, k, setup)


# ------------------------------------------------------------------------------- one method


@dataclass
class Row:
    config: str
    method: str
    work: dict[str, Any]
    formula: str
    passes_per_image: int
    ours: Timing
    floor_chunk: float | None = None
    floor_best: float | None = None
    best_rows: int | None = None
    chunk: int | None = None
    ig_passes_floor: float | None = None
    peers: list[Timing] = field(default_factory=list)
    own_work: tuple[Timing, Timing | None] | None = None
    note: str = ""
    load: float = 0.0


def largest_pass(timing_passes: list[tuple[int, bool]], grad: bool) -> int | None:
    sizes = [r for r, g in timing_passes if g == grad]
    return max(sizes) if sizes else None


def warm_up(setup: Setup, method: str, per_image: int, grad: bool) -> None:
    """One untimed pass at the chunk size ours is expected to use (and its remainder), so that
    ours, which runs first, does not pay alone for a new batch shape (allocator, oneDNN/cuDNN
    primitives). The expectation mirrors the library: ``auto_batch_size`` rows, of the images
    alone for meaningful perturbation (one jittered copy per image and step by default)."""
    rows = setup.batch * per_image
    if method == "meaningful_perturbation":  # sequential steps: only the images share a pass
        chunk = min(setup.batch, auto_batch_size(setup.model, setup.images, 1))
        rows = setup.batch
    elif method == "occlusion":  # forward-only chunks, the unoccluded image being one more row
        rows = setup.batch * (per_image + 1)
        chunk = auto_batch_size(setup.model, setup.images, per_image + 1, forward_only=True)
    else:
        chunk = min(auto_batch_size(setup.model, setup.images, per_image), setup.max_grad_rows)
    for size in {chunk, rows % chunk} - {0}:
        setup.timer.time(size, grad)


def bench_method(setup: Setup, method: str, args) -> Row:
    work = config_work(setup, method, args)
    per_image, grad, formula = nominal_passes(method, work, setup)
    repeats = args.repeats if per_image <= 2 else args.repeats_slow
    log(f"  {setup.name} {method} {work or ''}: {per_image} pass(es)/image, best of {repeats}")
    params = dict(work)
    note = ""

    def ours_call():
        return explain(setup.model, setup.images, method, setup.target, **params)

    warm_up(setup, method, per_image, grad)
    # Round robin: ours, then each peer, R times; each implementation keeps its best run, so
    # load from other jobs on a shared machine hits them alike.
    ours = run_once("ours", ours_call, setup.batch, setup)
    if ours.seconds_per_image is None and ours.note.startswith("skipped"):
        # the guard refused a pass of ours' default chunk: pass the automatic chunk, and say so
        params["batch_size"] = auto_batch_size(setup.model, setup.images, per_image)
        note = (
            f"the default batch_size would run {ours.note.split('skipped: ')[1]}; "
            f"timed with batch_size={params['batch_size']} (auto_batch_size) instead"
        )
        ours = run_once("ours (batch_size=auto)", ours_call, setup.batch, setup)
    peers = peers_for(method, work, setup, args.peer_images)
    peer_best: list[Timing | None] = [
        None if call else Timing(name, None, peer_note) for name, call, _, peer_note in peers
    ]
    for round_index in range(repeats):
        if round_index:
            ours = faster(ours, run_once("ours", ours_call, setup.batch, setup))
        for k, (name, call, images_done, peer_note) in enumerate(peers):
            done = peer_best[k]
            if call is None or (done is not None and done.seconds_per_image is None):
                continue  # n/a, skipped or failed: once is enough
            peer_best[k] = faster(done, run_once(name, call, images_done, setup, peer_note))
    # ours' chunk: its largest pass of the floor's kind (forward+backward, or forward for occlusion)
    chunk = largest_pass(ours.calls, grad)
    row = Row(
        setup.name,
        method,
        work,
        formula,
        per_image,
        ours,
        note=note,
        chunk=chunk,
        peers=[t for t in peer_best if t is not None],
        load=os.getloadavg()[0],
    )

    rows_total = setup.batch * per_image
    max_batch = setup.batch if method == "meaningful_perturbation" else rows_total
    max_batch = min(max_batch, setup.max_grad_rows) if grad else max_batch
    if chunk:
        row.floor_chunk = setup.timer.chunked(rows_total, chunk, grad) / setup.batch
    sweep_cap = min(max_batch, args.sweep_max)
    rate, row.best_rows = setup.timer.best_rate(sweep_cap, grad, extra=chunk if chunk and chunk <= max_batch else None)
    row.floor_best = rate * rows_total / setup.batch
    if method == "xrai":
        row.own_work = xrai_own_work(setup, args.peer_images)
        row.ig_passes_floor = row.floor_best
        seg = row.own_work[0].seconds_per_image or 0.0
        row.floor_best += seg
        if row.floor_chunk is not None:
            row.floor_chunk += seg
    return row


# ---------------------------------------------------------------------------------- report


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else (f"{value:.3f}" if value < 10 else f"{value:.1f}")


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def describe_work(row: Row) -> str:
    parts = [f"{k}={v}" for k, v in row.work.items()]
    return ", ".join(parts) if parts else "-"


def render_table(rows: list[Row]) -> str:
    lines = [
        "| config | method | work | floor passes/img | ours: passes run | ours s/img | floor@chunk s/img (chunk) | ours/floor@chunk "
        "| floor@best s/img (batch) | ours/floor@best | peers: s/img (peer/ours) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = row.ours.seconds_per_image
        peer_cells = []
        for peer in row.peers:
            if peer.seconds_per_image is None:
                peer_cells.append(f"{peer.name}: {peer.note}")
            else:
                extra = f"; {peer.note}" if peer.note else ""
                peer_cells.append(
                    f"{peer.name}: {fmt_seconds(peer.seconds_per_image)} ({fmt_ratio(ratio(peer.seconds_per_image, ours))}{extra})"
                )
        if row.own_work:
            mine, pair = row.own_work
            cell = f"segmentation+selection: ours {fmt_seconds(mine.seconds_per_image)}"
            if pair is not None:
                cell += (
                    f", PAIR {fmt_seconds(pair.seconds_per_image) if pair.seconds_per_image is not None else pair.note}"
                    f" ({fmt_ratio(ratio(pair.seconds_per_image, mine.seconds_per_image))})"
                )
            cell += f"; ours / IG-passes floor {fmt_ratio(ratio(ours, row.ig_passes_floor))}"
            peer_cells.append(cell)
        ours_cell = fmt_seconds(ours) if ours is not None else row.ours.note
        if row.note:
            ours_cell += f" (note: {row.note})"
        lines.append(
            f"| {row.config} | {row.method} | {describe_work(row)} | {row.passes_per_image} ({row.formula}) "
            f"| {row.ours.passes or '-'} | {ours_cell} "
            f"| {fmt_seconds(row.floor_chunk)} ({row.chunk or '-'}) | {fmt_ratio(ratio(ours, row.floor_chunk))} "
            f"| {fmt_seconds(row.floor_best)} ({row.best_rows or '-'}) | {fmt_ratio(ratio(ours, row.floor_best))} "
            f"| {'<br>'.join(peer_cells) or '-'} | {row.load:.1f} |"
        )
    return "\n".join(lines)


def find_peer(row: Row, prefix: str) -> Timing | None:
    for peer in row.peers:
        if peer.name.startswith(prefix) and peer.seconds_per_image is not None:
            return peer
    return None


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def render_targets(rows: list[Row]) -> str:
    """One line per target and configuration, with the measured numbers."""
    out = []
    misses = [
        r
        for r in rows
        if ratio(r.ours.seconds_per_image, r.floor_best) is not None
        and ratio(r.ours.seconds_per_image, r.floor_best) > 1.2
    ]
    measured = [r for r in rows if ratio(r.ours.seconds_per_image, r.floor_best) is not None]
    out.append(
        f"- Every method within 1.2x of floor@best: {verdict(not misses if measured else None)} "
        f"({len(measured) - len(misses)}/{len(measured)} rows)"
        + (
            "; over: "
            + ", ".join(f"{r.config} {r.method} {ratio(r.ours.seconds_per_image, r.floor_best):.2f}x" for r in misses)
            if misses
            else ""
        )
    )
    for row in rows:
        ours = row.ours.seconds_per_image
        if row.method == "integrated_gradients":
            peer = find_peer(row, "captum IG (one batch)")
            r = ratio(peer.seconds_per_image if peer else None, ours)
            captum = [p.seconds_per_image for p in row.peers if p.name.startswith("captum IG") and p.seconds_per_image]
            r_fastest = ratio(min(captum), ours) if captum else None
            out.append(
                f"- {row.config} IG >= 1.5x faster than captum's default call: "
                f"{verdict(None if r is None else r >= 1.5)} ({fmt_ratio(r)}); no slower than captum's faster call: "
                f"{verdict(None if r_fastest is None else r_fastest >= 1.0)} ({fmt_ratio(r_fastest)})"
            )
        if row.method == "gradcam":
            peer = find_peer(row, "captum LayerGradCam")
            r = ratio(peer.seconds_per_image if peer else None, ours)
            out.append(
                f"- {row.config} Grad-CAM no slower than captum LayerGradCam: "
                f"{verdict(None if r is None else r >= 1.0)} ({fmt_ratio(r)})"
            )
        if row.method == "smoothgrad":
            monai_peer = find_peer(row, "monai SmoothGrad")
            captum_peers = [p for p in row.peers if p.name.startswith("captum NoiseTunnel") and p.seconds_per_image]
            r_monai = ratio(monai_peer.seconds_per_image if monai_peer else None, ours)
            r_captum = ratio(min(p.seconds_per_image for p in captum_peers), ours) if captum_peers else None
            out.append(
                f"- {row.config} SmoothGrad >= 1.7x faster than monai.visualize: "
                f"{verdict(None if r_monai is None else r_monai >= 1.7)} ({fmt_ratio(r_monai)}); "
                f"no slower than captum NoiseTunnel (its faster variant): "
                f"{verdict(None if r_captum is None else r_captum >= 1.0)} ({fmt_ratio(r_captum)})"
            )
        if row.method == "xrai" and row.own_work:
            mine, pair = row.own_work
            if pair is not None:
                r = ratio(pair.seconds_per_image, mine.seconds_per_image)
                out.append(
                    f"- {row.config} XRAI segmentation+selection >= 4x faster than PAIR's: "
                    f"{verdict(None if r is None else r >= 4)} ({fmt_ratio(r)})"
                )
            if row.config == "3d64":
                r = ratio(ours, row.ig_passes_floor)
                out.append(
                    f"- 3d64 XRAI <= 1.3x its IG passes (floor@best of 2*steps passes): "
                    f"{verdict(None if r is None else r <= 1.3)} ({fmt_ratio(r)}, steps={row.work['steps']})"
                )
        if row.method in ("occlusion", "meaningful_perturbation"):
            cells = [
                f"{p.name} {fmt_ratio(ratio(p.seconds_per_image, ours)) if p.seconds_per_image else p.note}"
                for p in row.peers
            ]
            out.append(f"- {row.config} {row.method} (batched) peer/ours: " + "; ".join(cells))
    return "\n".join(out)


def versions() -> str:
    names = {
        "torch": "torch",
        "monai": "monai",
        "captum": "captum",
        "grad-cam": "pytorch_grad_cam",
        "saliency": "saliency (PAIR)",
        "torchray": "torchray",
    }
    parts = []
    for dist, label in names.items():
        try:
            parts.append(f"{label} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{label} not installed")
    return ", ".join(parts)


def header(device: torch.device, args, load_start: tuple[float, ...]) -> str:
    if device.type == "cuda":
        device_text = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        device_text = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
    return "\n".join(
        [
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- device: {device_text}; torch threads: {torch.get_num_threads()}; "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
            f"- versions: {versions()}",
            f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
            f"- load average at start (1/5/15 min): {' / '.join(f'{v:.2f}' for v in load_start)}",
            "- model: monai DenseNet121(spatial_dims, in_channels=1, out_channels=2), eval mode, random init "
            f"(seed {SEED}); speed does not depend on the weights. Inputs: seed-{SEED} standard normal images; "
            "target: each image's predicted class, passed explicitly to every implementation.",
            f"- repeats: best of {args.repeats} for methods of <= 2 passes/image, best of {args.repeats_slow} otherwise "
            "(ours and its peers round robin); pass timings best of 2.",
            "- columns: *floor passes/img* = the method's nominal network passes per image (fb = forward+backward, "
            "f = forward only); *ours: passes run* = what the call actually ran, seen by a hook on the model; "
            "*floor@chunk* = nominal passes at ours' own chunk size (measured right after ours); *floor@best* = "
            "nominal passes at the fastest batch size found (the floor of the targets); for XRAI both floors include "
            "ours' segmentation + selection time; *peer/ours* > 1 means ours is faster; *load* = 1-min load average "
            "after the method.",
        ]
    )


# ------------------------------------------------------------------------------------- main


def parse_set(text: str) -> tuple[str, str, str, Any]:
    """'3d96:xrai.steps=10' -> ('3d96', 'xrai', 'steps', 10)."""
    try:
        scope, rest = text.split(":", 1)
        target, value = rest.split("=", 1)
        method, param = target.split(".", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--set expects CONFIG:METHOD.PARAM=VALUE, got {text!r}") from None
    if scope not in (*CONFIGS, "2d", "3d", "all"):
        raise argparse.ArgumentTypeError(f"--set scope must be one of {[*CONFIGS, '2d', '3d', 'all']}, got {scope!r}")
    if param not in WORK_PARAMS.get(method, ()):
        raise argparse.ArgumentTypeError(f"--set: {method}.{param} is not a work parameter; known: {WORK_PARAMS}")
    parsed: Any = [int(v) for v in value.split(",")] if "," in value else int(value)
    return scope, method, param, parsed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all registered)")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps/samples and large occlusion windows, for ours and peers"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of R for methods of <= 2 passes per image")
    parser.add_argument("--repeats-slow", type=int, default=1, help="best of R for the other methods")
    parser.add_argument(
        "--trimmed",
        action="store_true",
        help="less work for 2d224b8, 3d64 and 3d96 (TRIMMED_WORK) so that the full run is feasible",
    )
    parser.add_argument(
        "--steps-3d",
        type=int,
        default=None,
        help="steps of IG, SmoothGrad-IG, XRAI and meaningful perturbation in 3D configs (after --trimmed)",
    )
    parser.add_argument(
        "--set",
        action="append",
        type=parse_set,
        default=[],
        metavar="CONFIG:METHOD.PARAM=VALUE",
        help="override one work parameter, e.g. 3d96:occlusion.window=24 (repeatable)",
    )
    parser.add_argument(
        "--peer-images",
        type=int,
        default=2,
        help="images timed for peers that explain one image per call (per-image time reported)",
    )
    parser.add_argument("--sweep-max", type=int, default=64, help="largest batch tried for the floor@best sweep")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.7,
        help="refuse a forward+backward pass needing more than this fraction of the free memory",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice, one per core)"
    )
    parser.add_argument(
        "--explainers",
        default=None,
        metavar="DIR",
        help="also train (or reuse) in DIR the chest-xray classifier and its mask generator, and time the mask "
        "generator against meaningful perturbation on the same test images, with both AUPRCs",
    )
    parser.add_argument("--explainer-images", type=int, default=20, help="test images with a mask for --explainers")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.quick:  # a run-through, not a measurement: one repeat, short floor sweep
        args.repeats = args.repeats_slow = 1
        args.sweep_max = min(args.sweep_max, 4)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    # the methods that explain the benchmark's plain DenseNet121 (wildcat needs its head; the trained
    # explainers are timed by --explainers)
    registered = [m for m in available_methods() if get_method(m).requires is None and get_method(m).explainer is None]
    args.methods = registered if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in registered]
    if unknown:
        parser.error(f"method(s) {unknown} not timed here; these are: {registered} (trained explainers: --explainers)")
    return args


def bench_trained_explainers(args) -> str:
    """The mask generator against meaningful perturbation (its library defaults) on the same test
    images of the ``explainers`` study (chest-xray, the ``default`` scale's classifier and mask
    generator), one image per call: seconds per map and AUPRC (Markdown)."""
    import csv

    from monai_sal_app.experiments.runner import run_experiment
    from monai_sal_app.metrics.stats import to_markdown

    log(f"trained explainers in {args.explainers} ({args.explainer_images} test images with a mask)")
    settings = {
        "methods": ["meaningful_perturbation", "mask_generator"],
        "mp_steps": get_method("meaningful_perturbation").defaults["steps"],
        "test_per_class": args.explainer_images,
    }
    run_experiment("explainers", args.explainers, overrides=settings, progress=False, log=log)
    results = Path(args.explainers) / "results"
    rows = {}
    for name in ("explainers_summary", "timing_summary"):
        with open(results / f"{name}.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                rows.setdefault(row["method"], {}).update(row)
    seconds = {method: float(row["seconds_per_map_mean"]) for method, row in rows.items()}
    ratio = seconds["meaningful_perturbation"] / seconds["mask_generator"]
    table = [
        {
            "method": method,
            "images": int(row["n"]),
            "s per map": seconds[method],
            "AUPRC mean": float(row["auprc_mean"]),
            "AUPRC 95% CI": f"{float(row['auprc_ci_low']):.3f}-{float(row['auprc_ci_high']):.3f}",
        }
        for method, row in rows.items()
    ]
    verdict = "MET" if ratio >= 100 else "MISSED"
    return (
        "Classifier and mask generator of `monai-sal experiment run explainers` (chest-xray, conv5-fc3 at "
        f"64^2), in `{args.explainers}`; one image per call, the pathology class explained.\n\n"
        + to_markdown(table, floatfmt=".4f")
        + f"\n- mask generator >= 100x faster than meaningful perturbation: {verdict} ({ratio:.0f}x)"
    )


def render_report(
    rows: list[Row], reference: list[str], device: torch.device, args, load_start, done: bool, explainers: str = ""
) -> str:
    load_now = os.getloadavg()
    return "\n\n".join(
        [
            "## Run",
            header(device, args, load_start)
            + f"\n- load average at {'end' if done else 'last write'}: "
            + " / ".join(f"{v:.2f}" for v in load_now)
            + ("" if done else "\n- **partial**: the run had not finished when this was written")
            + (
                "\n- quick mode: reduced work for ours and peers alike (not a measurement of the default settings)"
                if args.quick
                else ""
            ),
            "## Reference passes\n\n" + "\n".join(reference),
            "## Results (seconds per image)\n\n" + render_table(rows),
            "## Targets\n\n" + render_targets(rows),
            *(["## Trained explainers (seconds per map)\n\n" + explainers] if explainers else []),
        ]
    )


def write_report(report: str, path: str | None) -> None:
    """The Markdown report to ``path`` (nothing without one)."""
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(
                "# Saliency methods: speed benchmark\n\nGenerated by `scripts/benchmark_methods.py`.\n\n"
                + report
                + "\n"
            )
        log(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_start = os.getloadavg()
    log(f"device {device}, {torch.get_num_threads()} threads, configs {args.configs}, methods {args.methods}")
    rows: list[Row] = []
    reference = []
    for name in args.configs:
        setup = make_setup(name, device, args.memory_fraction)
        one_pass = setup.timer.time(1, True)
        reference.append(
            f"- {name}: one forward+backward pass of 1 row {one_pass:.3f} s; "
            f"forward only {setup.timer.time(1, False):.3f} s; at most {setup.max_grad_rows} rows per "
            f"forward+backward pass in {args.memory_fraction:.0%} of the free memory"
        )
        log(f"{name}: {reference[-1][2:]}")
        for method in args.methods:
            rows.append(bench_method(setup, method, args))
        del setup
        # after every configuration, so that a long run that is stopped keeps its results
        write_report(render_report(rows, reference, device, args, load_start, done=False), args.out)
    explainers = bench_trained_explainers(args) if args.explainers else ""
    report = render_report(rows, reference, device, args, load_start, done=True, explainers=explainers)
    write_report(report, args.out)
    print(report)
    log("done")


if __name__ == "__main__":
    # Not restarted with the batch allocator (monai_sal_app.allocator), unlike the other benchmark
    # scripts: its floor sweeps passes up to the free-memory limit, and jemalloc keeping every freed
    # page would leave that peak resident, so the later configurations would find no free memory
    # (docs/BENCHMARK_METHODS.md). It runs on the allocator it is given.
    main()
