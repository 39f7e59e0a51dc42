"""The one call, ``explain(model, images, method, target=None, **params)``, and its registry.

Every post-hoc method is a function ``fn(model, images, target, **params) -> maps`` registered
by name with its default parameters. ``explain`` does everything the methods share:

* validates the input (a float tensor of shape (N, C, H, W) or (N, C, D, H, W), finite, with the
  dimensionality and channel count the model's first convolution expects);
* resolves the target (None -> predicted class per image; int; or an (N,) tensor);
* runs the method inside :func:`model_guard`, which puts the model in eval mode, freezes its
  parameters, turns in-place activations off for the methods that hook into modules and
  restores all of it afterwards, so a method never leaves a trace on the model;
* moves the images to the model's device and returns the maps on the images' device.

A method receives images already on the model's device, detached, with ``requires_grad=False``,
and ``target`` as a long tensor of shape (N,). It returns raw maps of shape (N, 1, *spatial)
on the input grid. Normalisation is a separate step (``saliency.postprocess``).

Definitions, references and defaults of every registered method: docs/METHODS.md#attribution-methods.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn

from monai_sal_app.models.guard import model_guard

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_LIST_ITEMS",
    "BoundError",
    "MethodSpec",
    "Stopped",
    "auto_batch_size",
    "available_methods",
    "check_request",
    "check_stop",
    "check_target_range",
    "chunks",
    "explain",
    "get_method",
    "max_rows_in_memory",
    "model_device",
    "model_guard",
    "model_input_spec",
    "register",
    "resolve_target",
    "stop_when",
    "target_scores",
    "validate_images",
]


@dataclass(frozen=True)
class MethodSpec:
    """A registered attribution method: its function, default parameters and a one-line summary.

    ``requires``: None when the method explains any classifier; otherwise (test, what it needs):
    ``test(model)`` says whether the method can explain ``model`` and the text says what it needs.
    ``explainer``: the kind of trained explainer (``monai_sal_app.explainers``) the method needs as
    its ``explainer=`` parameter, or None. ``signed``: True when a map's sign says for (positive)
    or against (negative) the target class, so that its signed values rank the evidence
    (``evaluation.fidelity`` ranks such maps by value, the others by magnitude). ``hooks``: the
    method hooks into the network's modules (so it cannot explain a TorchScript module) and runs
    with in-place activations off, unless ``guards_in_place``: it turns them off itself where its
    captures need it.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    requires: tuple[Callable[[nn.Module], bool], str] | None = None
    explainer: str | None = None
    bounds: dict[str, int | float] = field(default_factory=dict)
    passes: Callable[[dict[str, Any], tuple[int, ...]], int] | None = None
    cheaper: str = ""
    signed: bool = False
    hooks: bool = False
    guards_in_place: bool = False

    def applies_to(self, model: nn.Module) -> bool:
        if self.hooks and isinstance(model, torch.jit.ScriptModule):
            return False
        return self.requires is None or bool(self.requires[0](model))

    def needs(self, model: nn.Module) -> str:
        """What the method needs that ``model`` lacks (for the error when it does not apply)."""
        if self.hooks and isinstance(model, torch.jit.ScriptModule):
            return NO_HOOKS
        return self.requires[1] if self.requires is not None else ""

    def passes_per_image(self, params: dict[str, Any], spatial_shape: tuple[int, ...]) -> int:
        """Network passes (a forward, with its backward when the method differentiates) per image
        for ``params`` (merged over the defaults) on inputs of ``spatial_shape``."""
        if self.passes is None:
            return 1
        try:
            return max(1, int(self.passes({**self.defaults, **params}, tuple(spatial_shape))))
        except (TypeError, ValueError):  # a malformed parameter: the method itself says what is wrong
            return 1


_REGISTRY: dict[str, MethodSpec] = {}
MAX_BATCH_SIZE = 1024  # rows per network pass a server accepts (memory, not work)
NO_HOOKS = (
    "it hooks into the network's layers, and a TorchScript module takes no hooks; the gradient methods, "
    "integrated gradients, XRAI and occlusion explain it"
)
MAX_LIST_ITEMS = 16  # values in a list parameter (e.g. XRAI's segmentation scales) a server accepts


def register(
    name: str,
    summary: str = "",
    requires: tuple[Callable[[nn.Module], bool], str] | None = None,
    explainer: str | None = None,
    bounds: dict[str, int | float] | None = None,
    passes: Callable[[dict[str, Any], tuple[int, ...]], int] | None = None,
    cheaper: str = "",
    signed: bool = False,
    hooks: bool = False,
    guards_in_place: bool = False,
) -> Callable[[Callable], Callable]:
    """Register ``fn(model, images, target, **params)`` under ``name``.

    The defaults published by :func:`available_methods` are read from the keyword arguments of
    ``fn`` after ``target`` so that the signature is the single source of truth. ``requires``:
    (test, what it needs) for a method that explains only some models; ``explainer``: the kind of
    trained explainer it takes (see :class:`MethodSpec`). ``bounds``: parameter -> largest value
    a server accepts (every parameter that multiplies work or memory; ``batch_size`` is bounded for
    all methods by :data:`MAX_BATCH_SIZE`; the key ``passes`` bounds the network passes per image),
    see :func:`check_request`; ``passes(params, spatial_shape)``: network passes per image
    (default 1), for the request's cost; ``cheaper``: how to lower it (e.g. "lower steps");
    ``signed``: the map's sign says for or against the target, ``hooks``: the method hooks into
    the network's modules or captures their outputs (:class:`MethodSpec`; the others, and those
    that say ``guards_in_place``, run with the network's in-place activations left on, see
    ``models.guard.model_guard``).
    """

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"saliency method {name!r} is registered twice")
        sig = inspect.signature(fn)
        defaults = {
            p.name: p.default for p in list(sig.parameters.values())[3:] if p.default is not inspect.Parameter.empty
        }
        summary_line = summary or (fn.__doc__ or "").strip().split("\n")[0]
        limits = {**({"batch_size": MAX_BATCH_SIZE} if "batch_size" in defaults else {}), **(bounds or {})}
        _REGISTRY[name] = MethodSpec(
            name,
            fn,
            defaults,
            summary_line,
            requires,
            explainer,
            limits,
            passes,
            cheaper,
            signed,
            hooks,
            guards_in_place,
        )
        return fn

    return decorate


def available_methods(model: nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """Name -> {"defaults": {...}, "bounds": {...}, "summary": str, "signed": bool} for every registered method
    (sorted by name); with ``model``, only the methods that can explain it (``wildcat`` needs a
    WILDCAT head). ``bounds``: the largest value of each parameter a server accepts."""
    return {
        n: {"defaults": dict(s.defaults), "bounds": dict(s.bounds), "summary": s.summary, "signed": s.signed}
        for n, s in sorted(_REGISTRY.items())
        if model is None or s.applies_to(model)
    }


def _too_large(value: Any, bound: int | float) -> bool:
    """Whether ``value`` (a number, or a list of numbers: any of them) exceeds ``bound``."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value > bound
    if isinstance(value, (list, tuple)):
        return any(_too_large(v, bound) for v in value)
    return False


def check_request(
    method: str,
    params: dict[str, Any],
    spatial_shape: tuple[int, ...],
    max_cost: float | None = None,
    budget_name: str = "max_cost",
) -> int:
    """Refuse (:class:`BoundError` naming the parameter and what to do) a request over ``method``'s
    bounds, or whose estimated cost per image (network passes x voxels of inputs of
    ``spatial_shape``) is above ``max_cost`` (None: no budget; ``budget_name``: the setting that
    message names). Returns the cost. The server applies this to every request; ``explain`` does
    not (a library call is the caller's own budget), the CLI with ``--max-cost``."""
    spec = get_method(method)
    listed = "each method's bounds are listed by `monai-sal methods` and in /info"
    for name, bound in spec.bounds.items():
        value = params.get(name)
        if isinstance(value, (list, tuple)) and len(value) > MAX_LIST_ITEMS:
            raise BoundError(f"{method}: {name} has {len(value)} values, at most {MAX_LIST_ITEMS} are accepted")
        if _too_large(value, bound):
            raise BoundError(f"{method}: {name}={value!r} is above its bound of {bound:g}; {listed}")
    passes = spec.passes_per_image(params, spatial_shape)
    lower = spec.cheaper or "use a cheaper method"
    if passes > spec.bounds.get("passes", math.inf):  # e.g. occlusion: windows per image
        raise BoundError(
            f"{method}: {passes} network passes per image is above its bound of {spec.bounds['passes']:g}; {lower}"
        )
    cost = passes * math.prod(spatial_shape)
    if max_cost is not None and cost > max_cost:
        raise BoundError(
            f"{method}: estimated cost {cost:.3g} (network passes x input voxels: {passes} passes of "
            f"{'x'.join(map(str, spatial_shape))}) is above the budget of {max_cost:.3g} ({budget_name}); {lower}"
        )
    return cost


class BoundError(ValueError):
    """A request over a method's bounds or over the cost budget (see :func:`check_request`)."""


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name``; ``ValueError`` naming the known methods otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown saliency method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def model_input_spec(model: nn.Module) -> tuple[int, int]:
    """(spatial_dims, in_channels) read from the model's first convolution (in a TorchScript
    module, the first submodule compiled from a ``Conv2d``/``Conv3d``, channels from its weight)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return (2 if isinstance(module, nn.Conv2d) else 3), module.in_channels
        kind = getattr(module, "original_name", None) if isinstance(module, torch.jit.ScriptModule) else None
        if kind in ("Conv2d", "Conv3d") and hasattr(module, "weight"):
            return (2 if kind == "Conv2d" else 3), int(module.weight.shape[1])
    raise ValueError("cannot explain a model without a Conv2d/Conv3d layer (spatial dims unknown)")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def validate_images(model: nn.Module, images: torch.Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` with a clear message for input the model cannot take."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor, got dtype {images.dtype}")
    spatial_dims, channels = model_input_spec(model)
    expected = "(N, C, H, W)" if spatial_dims == 2 else "(N, C, D, H, W)"
    if images.ndim != spatial_dims + 2:
        raise ValueError(
            f"the model takes {spatial_dims}D images {expected}, got a tensor of shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if images.shape[1] != channels:
        raise ValueError(f"the model takes {channels} channel(s), got {images.shape[1]} (shape {tuple(images.shape)})")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")


def resolve_target(model: nn.Module, images: torch.Tensor, target) -> torch.Tensor:
    """Target class per image as a long tensor of shape (N,) on the images' device.

    ``None`` -> the predicted class (argmax of the logits, one forward pass without gradients);
    an int -> that class for every image; a sequence or tensor of N ints -> one class per image.
    A given target costs no forward pass: classes beyond the model's outputs are refused by
    :func:`target_scores`, which every method uses to pick the score it explains.
    """
    n = images.shape[0]
    if target is None:
        with torch.no_grad():
            logits = model(images)
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=images.device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"target must be an int class index or N of them, got {target!r}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for a batch of {n} images")
    if (t < 0).any():
        raise ValueError(f"target {t.tolist()} out of range: class indices start at 0")
    return t


def target_scores(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The target entry of each row of ``outputs`` (N, num_classes) (logits or probabilities),
    shape (N,). Summing it gives per-image gradients. A target >= num_classes raises ``ValueError``
    (checked here rather than with an extra forward pass; an out-of-range gather is an opaque
    device-side assert on CUDA)."""
    check_target_range(target, outputs.shape[1])
    return outputs.gather(1, target.view(-1, 1)).squeeze(1)


def check_target_range(target: torch.Tensor, num_classes: int) -> None:
    """``ValueError`` when a class index in ``target`` (N,) is >= ``num_classes``."""
    if int(target.max()) >= num_classes:
        raise ValueError(f"target {target.tolist()} out of range for a model with {num_classes} classes")


def chunks(n: int, batch_size: int | None) -> Iterator[slice]:
    """Slices of ``range(n)`` of at most ``batch_size`` (all of it when None or <= 0); before each,
    :func:`check_stop`."""
    step = n if not batch_size or batch_size <= 0 else int(batch_size)
    for start in range(0, n, step):
        check_stop()
        yield slice(start, min(n, start + step))


class Stopped(RuntimeError):
    """Work stopped between two chunks because the caller asked it to (the message says why)."""


_STOP_CHECK: contextvars.ContextVar[Callable[[], str | None] | None] = contextvars.ContextVar(
    "monai_sal_stop_check", default=None
)


@contextlib.contextmanager
def stop_when(check: Callable[[], str | None]) -> Iterator[None]:
    """Within the block, methods call ``check()`` before each chunk of network passes (and each
    optimisation step) and stop with :class:`Stopped` and its answer when it returns a reason.

    How a server applies a time limit, a client's disconnect or a shutdown to a running request:
    the check is a context variable, so it follows the work into the thread that runs it.
    """
    token = _STOP_CHECK.set(check)
    try:
        yield
    finally:
        _STOP_CHECK.reset(token)


def check_stop() -> None:
    """Raise :class:`Stopped` if the enclosing :func:`stop_when` check gives a reason."""
    check = _STOP_CHECK.get()
    if check is not None:
        reason = check()
        if reason:
            raise Stopped(reason)


_ACTIVATION_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def _activation_bytes_per_row(model: nn.Module, row: torch.Tensor) -> int:
    """Bytes autograd keeps for backward when ``row`` (1, C, *spatial) goes through ``model``.

    Measured, not guessed: one forward pass under ``saved_tensors_hooks`` adds up the storages
    of the tensors saved for the backward pass (each storage once), leaving out the model's own
    parameters and buffers, which do not grow with the batch. Cached per model (weakly) and
    input shape, dtype and device, so repeated calls cost nothing; the cache only steers chunk
    sizes, never results.
    """
    key = (tuple(row.shape[1:]), row.dtype, row.device)
    cached = _ACTIVATION_BYTES.setdefault(model, {})
    if key in cached:
        return cached[key]
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = row[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    cached[key] = sum(seen.values())
    return cached[key]


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` on CUDA, psutil's available RAM otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def max_rows_in_memory(model: nn.Module, images: torch.Tensor, memory_fraction: float = 0.5) -> int:
    """Rows (network inputs like ``images[:1]``) whose forward+backward pass fits in
    ``memory_fraction`` of the device's free memory (:func:`free_memory_bytes`), at least 1.

    One row costs ``2 * A + 4 * B`` bytes, with A the activation memory autograd saves for one
    image (measured by :func:`_activation_bytes_per_row`; the backward pass holds gradients of
    about the same size) and B the bytes of one input row (the row, its gradient, and the
    method's own copies such as noise or the weighted sum).
    """
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    return max(1, int(memory_fraction * free_memory_bytes(images.device) // _row_bytes(model, images)))


def _row_bytes(model: nn.Module, images: torch.Tensor) -> int:
    return 2 * _activation_bytes_per_row(model, images[:1]) + 4 * images[0].numel() * images.element_size()


# On a CPU, rows per pass stop paying once a chunk's working set leaves the caches: the cap sits
# inside the plateau measured for forward+backward passes (docs/BENCHMARKS.md, "Chunk sizes
# on a CPU").
CPU_CHUNK_BYTES = 5 * 2**29  # 2.5 GiB

# Forward-only passes (occlusion) keep no activations for a backward pass, so their working set
# per row is a few layers' outputs and the best chunk is smaller (docs/BENCHMARKS.md,
# "Chunk sizes on a CPU").
CPU_FORWARD_CHUNK_BYTES = 2 * 2**30


def auto_batch_size(
    model: nn.Module,
    images: torch.Tensor,
    passes_per_image: int = 1,
    memory_fraction: float = 0.5,
    forward_only: bool = False,
) -> int:
    """Rows (network inputs) per pass for a method that needs ``passes_per_image`` passes of each
    of the N images (IG steps, noise samples, occlusion windows...).

    The chunk is the largest that fits in memory (:func:`max_rows_in_memory`); on a CPU also at
    most :data:`CPU_CHUNK_BYTES` of rows (larger chunks run slower per row there), or
    :data:`CPU_FORWARD_CHUNK_BYTES` for ``forward_only`` passes (no backward pass); at most
    ``N * passes_per_image``. The rows are then split evenly over the passes that needs (50 rows
    at most 16 per pass -> 4 passes of 13, not 16+16+16+2: a small last pass is slow per row).
    Every method that takes ``batch_size`` uses this rule when it is None.
    """
    if passes_per_image < 1:
        raise ValueError(f"passes_per_image must be >= 1, got {passes_per_image}")
    fit = max_rows_in_memory(model, images, memory_fraction)
    if images.device.type == "cpu":
        cap = CPU_FORWARD_CHUNK_BYTES if forward_only else CPU_CHUNK_BYTES
        fit = min(fit, max(1, cap // _row_bytes(model, images)))
    rows = images.shape[0] * passes_per_image
    fit = min(fit, rows)
    return math.ceil(rows / math.ceil(rows / fit))


def explain(model: nn.Module, images: torch.Tensor, method: str = "gradcam", target=None, **params) -> torch.Tensor:
    """Saliency maps of ``model`` for ``images`` by ``method``.

    Args:
        model: a classifier returning logits (N, num_classes); 2D or 3D.
        images: float tensor (N, C, H, W) or (N, C, D, H, W). Not modified.
        method: a registered method name (see :func:`available_methods`).
        target: None (predicted class), an int, or N ints (one per image).
        **params: the method's parameters; unknown names raise ``ValueError``.

    Returns:
        Raw maps, float tensor (N, 1, *spatial) on the images' device and grid.
    """
    spec = get_method(method)
    unknown = set(params) - set(spec.defaults)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for method {method!r}; it takes {sorted(spec.defaults)}"
        )
    if not spec.applies_to(model):
        raise ValueError(f"method {method!r} cannot explain this {type(model).__name__}: {spec.needs(model)}")
    validate_images(model, images)
    device = model_device(model)
    x = images.detach().to(device=device, dtype=torch.float32)
    with model_guard(model, keep_in_place=not spec.hooks or spec.guards_in_place), torch.enable_grad():
        t = resolve_target(model, x, target)
        maps = spec.fn(model, x, t, **params)
    expected = (x.shape[0], 1, *x.shape[2:])
    if tuple(maps.shape) != expected:
        raise RuntimeError(f"method {method!r} returned shape {tuple(maps.shape)}, expected {expected}")
    return maps.detach().to(images.device)
