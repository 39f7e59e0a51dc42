"""Where a classifier comes from, and how an image file becomes its input and a map returns.

:func:`load_model_source` takes any of four sources and gives a :class:`LoadedModel`: the network
(eval mode, on the device), a :class:`~monai_sal_app.models.card.ModelCard` (labels, spatial
dims, channels, input size, decision threshold) and :meth:`LoadedModel.prepare`, which reads an
image file into the network's input and says how a map on that input returns to the file's grid.

- **Our checkpoint**: ``<name>.pt`` (a ``state_dict``) with its card ``<name>.json``, as
  ``monai-sal train`` writes it (``models.checkpoint.load_classifier``). Images: ``data.io``
  reads them, min-max to [0, 1], resized to the input size and back.
- **A MONAI bundle folder**: ``configs/metadata.json``, ``configs/inference.json`` (or
  ``.yaml``/``.yml``) with ``network_def`` and ``preprocessing``, ``models/model.pt`` (or
  ``model.ts``). Parsed with ``monai.bundle.ConfigParser``; labels from the metadata's
  ``network_data_format.outputs.<first>.channel_def``, channels and input size from its
  ``inputs.<first>``; weights with ``torch.load(weights_only=True)`` and
  ``load_state_dict(strict=True)`` (never ``monai.bundle.load``, which leaves random weights
  after a mismatch and only logs it). A ``pretrained: true`` in ``network_def`` is set to false:
  nothing is downloaded. Images go through the bundle's own ``preprocessing``; a map returns
  through ``Invertd`` of those transforms (Orientation, Spacing, Resize and the other invertible
  ones), onto the file's grid with its affine.
- **TorchScript**: ``<name>.ts`` (or a TorchScript ``.pt``) with a sidecar ``<name>.json``:
  ``labels``, ``spatial_dims``, ``in_channels``, ``input_size``, optional ``decision_threshold``
  and ``intensity`` (:func:`intensity_scaling`). Methods that hook into modules (Grad-CAM, guided
  backprop) cannot explain it (``saliency.core.MethodSpec.hooks``).
- **A factory**: a sidecar ``<name>.json`` with ``"factory": "package.module:function"`` (and
  ``"kwargs"``), the weights ``<name>.pt`` (a ``state_dict``) beside it, and the same fields as
  for TorchScript.

A bundle's config and a factory's module are code that runs when loaded (``$`` expressions,
imports): load them only from a folder the operator controls, never from a request.

Every source is checked the same way: the network's output on a blank input of the input size
must be logits of shape (1, classes); anything else (a tuple, a dict, other shapes) is a
``SourceError`` naming the file, as is a missing file, a weight mismatch (naming the first
missing and unexpected keys) or metadata that does not say what the network takes.
"""

from __future__ import annotations

import importlib
import json
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_sal_app.data.io import read_image
from monai_sal_app.models.card import CardError, ModelCard
from monai_sal_app.models.checkpoint import CheckpointError, load_classifier
from monai_sal_app.models.device import default_device
from monai_sal_app.models.inputs import preprocess, resize_to

__all__ = [
    "BUNDLE_METADATA",
    "ImageInput",
    "LoadedModel",
    "PreparedImage",
    "SourceError",
    "array_input",
    "in_memory",
    "intensity_scaling",
    "load_model_source",
    "mask_on_input_grid",
    "onto_grid",
    "source_files",
    "source_kind",
]

BUNDLE_METADATA = Path("configs") / "metadata.json"
_BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
_SHOWN_KEYS = 3  # weight keys named in a mismatch message
PIXEL_FORMATS = ("png", "jpeg")  # files without geometry: MONAI's PIL reader puts their axes the other way round


class SourceError(CheckpointError):
    """A model source that cannot be loaded as a classifier; the message names the file and why."""


@dataclass
class PreparedImage:
    """One image file as the network takes it: ``input`` (1, C, *input grid) float32, and
    :meth:`restore`, which takes a map (1, 1, *input grid) back to the file's grid (*spatial) with
    ``affine`` (4x4, the file's voxel-to-world transform as ``data.io.read_image`` gives it)."""

    input: torch.Tensor
    affine: np.ndarray
    restore: Callable[[torch.Tensor], np.ndarray]


@dataclass
class ImageInput:
    """The reading half of :class:`PreparedImage`, made of data only (picklable), so that another
    process (a ``torch.utils.data.DataLoader`` worker) can read and preprocess the file while this
    one computes: ``input`` (1, C, *input grid) float32, ``affine`` (4x4, the file's), ``shape``
    (the file's grid, *spatial) and ``state``, what else the map needs to return (a bundle's
    preprocessed data and how it read the file; None for the other sources)."""

    input: torch.Tensor
    affine: np.ndarray
    shape: tuple[int, ...]
    state: Any = None


@dataclass
class LoadedModel:
    """A classifier from any source (module docstring): ``network`` in eval mode, its ``card``,
    ``kind`` ("checkpoint", "bundle", "torchscript" or "factory") and the ``path`` it came from."""

    network: nn.Module
    card: ModelCard
    kind: str
    path: Path
    _read: Callable[[Path, np.ndarray | None, dict | None], ImageInput]
    _restore: Callable[[ImageInput, torch.Tensor], np.ndarray]
    _prepare_mask: Callable[[Path], np.ndarray | None] | None = None

    def prepare(self, image: str | Path, array: np.ndarray | None = None, meta: dict | None = None) -> PreparedImage:
        """The image file ``image`` as this network's input (:class:`PreparedImage`). ``array`` and
        ``meta``: the file as ``data.io.read_image`` already read it (not read again where the
        source takes arrays; a bundle reads the file with its own transforms, and its map is
        returned in ``array``'s shape)."""
        return self.restorable(self.read_input(image, array, meta))

    def read_input(self, image: str | Path, array: np.ndarray | None = None, meta: dict | None = None) -> ImageInput:
        """What :meth:`prepare` reads and computes from the file, as data (:class:`ImageInput`):
        what a reading process returns. Raises what reading raises (``ValueError``, ``OSError``;
        a bundle's transforms also ``RuntimeError``)."""
        return self._read(Path(image), array, meta)

    def restorable(self, image_input: ImageInput) -> PreparedImage:
        """The :class:`PreparedImage` of an :class:`ImageInput` (read here or in another process)."""
        return PreparedImage(
            image_input.input, image_input.affine, lambda saliency: self._restore(image_input, saliency)
        )

    def prepare_mask(self, mask: str | Path) -> np.ndarray | None:
        """The mask file ``mask`` on the network's input grid, bool (*input_size): through the same
        spatial steps as an image (resize; a bundle's Orientation, Spacing and Resize), then
        ``> 0.5``. None where the source cannot say (a bundle with other spatial transforms, which
        depend on the image's content)."""
        if self._prepare_mask is None:
            return mask_on_input_grid(read_image(mask, allow_constant=True)[0] > 0.5, self.card.input_size)
        return self._prepare_mask(Path(mask))


def in_memory(network: nn.Module, card: ModelCard) -> LoadedModel:
    """A network already at hand (just trained, or loaded by ``load_classifier``) with its card,
    taking images as our checkpoints do."""
    return LoadedModel(network, card, "checkpoint", Path(), *_array_pipeline(card))


def source_kind(path: str | Path) -> str | None:
    """ "bundle", "torchscript", "factory" or "checkpoint" for what is at ``path``; None for none."""
    path = Path(path)
    if path.is_dir():
        return "bundle" if (path / BUNDLE_METADATA).is_file() else None
    if path.suffix == ".json":
        path = _weights_beside(path)
    if _is_torchscript(path):
        return "torchscript"
    if path.suffix == ".pt":  # a factory's sidecar names it; anything else is read as our card
        try:
            return "factory" if "factory" in _read_json(path.with_suffix(".json")) else "checkpoint"
        except SourceError:  # missing or corrupt: load_classifier says which, naming the card
            return "checkpoint"
    return None


def source_files(path: str | Path) -> list[Path]:
    """The files the source at ``path`` is read from (what a reload watches): weights and card or
    sidecar; for a bundle every file under ``configs/`` and ``models/``."""
    path = Path(path)
    if path.is_dir():
        return sorted(f for part in ("configs", "models") for f in (path / part).rglob("*") if f.is_file())
    return [path, path.with_suffix(".json")]


def load_model_source(source: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """The classifier at ``source`` (module docstring). ``SourceError`` (a ``ValueError``) naming
    the file and the problem for anything that is not a loadable classifier."""
    path = Path(source)
    device = torch.device(device) if device is not None else default_device()
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    kind = source_kind(path)
    if kind == "bundle":
        return _load_bundle(path, device)
    if path.suffix == ".json":
        path = _weights_beside(path)
    if kind == "torchscript":
        return _load_torchscript(path, device)
    if kind == "factory":
        return _load_factory(path, device)
    if kind == "checkpoint":
        network, card = load_classifier(path, device=device)
        return LoadedModel(network, card, "checkpoint", path, *_array_pipeline(card))
    raise SourceError(
        f"{path}: not a model source: expected a bundle folder (with {BUNDLE_METADATA}), a TorchScript file "
        "with its <name>.json, or <name>.pt with its <name>.json (a model card or a factory)"
    )


# ------------------------------------------------------------------------------------------------
# images as the network takes them
# ------------------------------------------------------------------------------------------------


def intensity_scaling(spec: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """The intensity step of a sidecar: ``"minmax"`` or absent (None: per-image min-max to [0, 1],
    as our checkpoints), or ``{"a_min", "a_max", "b_min", "b_max", "clip"}``: the linear map of
    [a_min, a_max] to [b_min, b_max] (MONAI's ``ScaleIntensityRange``), clipped when ``clip``."""
    if spec is None or spec == "minmax":
        return None
    if not isinstance(spec, Mapping) or not {"a_min", "a_max"} <= set(spec):
        raise ValueError(f'\'intensity\' must be "minmax" or {{"a_min", "a_max", ...}}, got {spec!r}')
    a_min, a_max = float(spec["a_min"]), float(spec["a_max"])
    b_min, b_max = float(spec.get("b_min", 0.0)), float(spec.get("b_max", 1.0))
    if a_max <= a_min:
        raise ValueError(f"'intensity': a_max must be above a_min, got {a_min} and {a_max}")
    clip = bool(spec.get("clip", False))

    def scale(array: np.ndarray) -> np.ndarray:
        out = (array.astype(np.float32) - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
        return np.clip(out, min(b_min, b_max), max(b_min, b_max)) if clip else out

    return scale


def mask_on_input_grid(mask: np.ndarray, input_size) -> np.ndarray:
    """A bool mask (*spatial) on the input grid: bi/trilinear resize, then ``> 0.5``."""
    resized = resize_to(torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None], input_size)
    return resized[0, 0].numpy() > 0.5


def array_input(
    card: ModelCard,
    array: np.ndarray,
    affine: np.ndarray | None = None,
    scale: Callable[[np.ndarray], np.ndarray] | None = None,
) -> PreparedImage:
    """An image array (*spatial) as our checkpoints take it: min-max to [0, 1] (or ``scale``) and a
    bi/trilinear resize to the card's input size; back by the inverse resize. ``ValueError`` for
    an array of the wrong dimensionality, or constant or not finite."""
    image_input = _array_input(card, array, affine, scale)
    return PreparedImage(image_input.input, image_input.affine, lambda saliency: _resize_back(image_input, saliency))


def _array_input(
    card: ModelCard,
    array: np.ndarray,
    affine: np.ndarray | None = None,
    scale: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ImageInput:
    x = preprocess(array, card.input_size)  # also the checks of dims and values
    if scale is not None:
        x = resize_to(
            torch.from_numpy(np.ascontiguousarray(scale(array), dtype=np.float32)[None, None]), card.input_size
        )
    return ImageInput(x, np.eye(4) if affine is None else affine, tuple(np.asarray(array).shape))


def _resize_back(image_input: ImageInput, saliency: torch.Tensor) -> np.ndarray:
    """A map (1, 1, *input grid) on the file's grid (*spatial): the inverse of :func:`array_input`'s resize."""
    return resize_to(saliency.detach().cpu().float(), image_input.shape)[0, 0].numpy()


def _array_pipeline(card: ModelCard, scale: Callable[[np.ndarray], np.ndarray] | None = None):
    """The reading (``data.io.read_image`` unless given the array, then :func:`array_input`) and
    the return of a map (the inverse resize) of the sources that take arrays."""

    def read(path: Path, array: np.ndarray | None, meta: dict | None) -> ImageInput:
        if array is None or meta is None:
            array, meta = read_image(path)
        return _array_input(card, array, meta["affine"], scale)

    return read, _resize_back


def _bundle_mask_pipeline(preprocessing, card: ModelCard) -> Callable[[Path], np.ndarray | None]:
    """A mask through the bundle's loading and its Orientation, Spacing and Resize steps (its
    intensity steps left out), then ``> 0.5``; None for a bundle with other spatial steps."""
    from monai.transforms import (
        EnsureChannelFirstd,
        InvertibleTransform,
        LoadImaged,
        Orientationd,
        Resized,
        Spacingd,
    )

    steps, other = [], []
    for step in getattr(preprocessing, "transforms", ()):
        if isinstance(step, (LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd, Resized)):
            steps.append(step)
        elif isinstance(step, InvertibleTransform):
            other.append(type(step).__name__)

    def prepare_mask(path: Path) -> np.ndarray | None:
        if other:
            return None
        mask = {"image": str(path)}
        for step in steps:
            mask = step(mask)
        grid = np.asarray(mask["image"].detach().cpu())[0] > 0.5
        return grid if grid.shape == tuple(card.input_size) else None

    return prepare_mask


def onto_grid(array: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray) -> np.ndarray:
    """``array`` (on a grid with the 4x4 voxel-to-world ``affine``) on the grid of ``shape`` and
    ``target_affine`` when both index the same voxels in another axis order or direction (MONAI
    reads NRRD, PNG and DICOM files in another array order than ``data.io.read_image``); a
    trailing axis of size 1 on either side is ignored. ``ValueError`` for grids that differ
    otherwise."""
    source = np.squeeze(array, axis=tuple(range(len(shape), array.ndim))) if array.ndim > len(shape) else array
    n = len(shape)
    if source.ndim != n:
        raise ValueError(f"the map has {source.ndim} axes, the image {n}")
    voxel_to_voxel = np.linalg.inv(np.asarray(target_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    rotation, shift = voxel_to_voxel[:n, :n], voxel_to_voxel[:n, 3]
    signed = np.round(rotation)
    axes = [int(np.argmax(np.abs(row))) for row in signed]
    if not np.allclose(rotation, signed, atol=1e-3) or sorted(axes) != list(range(n)) or np.abs(signed).sum() != n:
        raise ValueError("the bundle reads this file on another grid than monai-sal does; send it as NIfTI")
    out = np.transpose(source, axes)
    for axis in range(n):
        if signed[axis, axes[axis]] < 0:
            out = np.flip(out, axis)
    expected = np.where(np.diag(signed[:, axes]) < 0, np.asarray(out.shape) - 1, 0)
    if out.shape != tuple(shape) or not np.allclose(shift, expected, atol=1e-3):
        raise ValueError("the bundle reads this file on another grid than monai-sal does; send it as NIfTI")
    return np.ascontiguousarray(out)


def _bundle_pipeline(preprocessing, card: ModelCard):
    """The reading (the bundle's ``preprocessing`` on ``{"image": path}``) and the return of a map
    (``Invertd`` of it, then onto the file's grid) of a bundle."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    inverse = Invertd(keys="saliency", transform=preprocessing, orig_keys="image", nearest_interp=False)

    def read(path: Path, array: np.ndarray | None, meta: dict | None) -> ImageInput:
        if array is None or meta is None:
            array, meta = read_image(path)  # the same checks as every other input, and the grid maps return to
        data = preprocessing({"image": str(path)})
        image = data["image"]
        if not isinstance(image, MetaTensor) or tuple(image.shape) != (card.in_channels, *card.input_size):
            raise ValueError(
                f"the bundle's preprocessing gives an image of shape {tuple(image.shape)}, not the "
                f"{(card.in_channels, *card.input_size)} its metadata declares"
            )
        read_affine = np.asarray(image.meta.get("original_affine", image.affine), dtype=np.float64)
        state = {"data": data, "format": meta.get("format"), "read_affine": read_affine}
        return ImageInput(image.as_tensor()[None].float().contiguous(), meta["affine"], tuple(array.shape), state)

    def restore(image_input: ImageInput, saliency: torch.Tensor) -> np.ndarray:
        data, image = image_input.state["data"], image_input.state["data"]["image"]
        mapped = MetaTensor(
            saliency.detach().cpu().float()[0], meta=dict(image.meta), applied_operations=image.applied_operations
        )
        restored = np.asarray(inverse({**data, "saliency": mapped})["saliency"].detach().cpu())[0]
        if image_input.state["format"] in PIXEL_FORMATS:  # no geometry: MONAI's array is read_image's transposed
            restored = np.squeeze(restored).T
            if restored.shape != image_input.shape:
                raise ValueError(f"the map returns on a grid of {restored.shape}, not the image's {image_input.shape}")
            return restored.astype(np.float32)
        read_affine = image_input.state["read_affine"]
        return onto_grid(restored, read_affine, image_input.shape, image_input.affine).astype(np.float32)

    return read, restore


# ------------------------------------------------------------------------------------------------
# the sources
# ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data


def _weights_beside(sidecar: Path) -> Path:
    """The weights file a sidecar ``<name>.json`` describes: ``<name>.ts`` or ``<name>.pt``."""
    for suffix in (".ts", ".pt"):
        if sidecar.with_suffix(suffix).is_file():
            return sidecar.with_suffix(suffix)
    return sidecar.with_suffix(".pt")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with the ``constants.pkl`` and ``code/`` that ``torch.jit.save`` writes."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _card_from_sidecar(sidecar: Path, architecture: str, extra: Mapping[str, Any] | None = None) -> ModelCard:
    data = _read_json(sidecar)
    labels = data.get("labels")
    try:
        return ModelCard(
            architecture=architecture,
            spatial_dims=data.get("spatial_dims"),
            in_channels=data.get("in_channels", 1),
            num_classes=len(labels) if isinstance(labels, list) else 0,
            labels=labels,
            input_size=data.get("input_size"),
            decision_threshold=data.get("decision_threshold"),
            preprocessing=_describe_intensity(data.get("intensity")),
            description=str(data.get("description", "")),
            arch_kwargs=dict(extra or {}),
        )
    except (CardError, TypeError) as error:
        raise SourceError(f"{sidecar}: {error}") from None


def _describe_intensity(spec: Any) -> str:
    if spec is None or spec == "minmax":
        return "per-image min-max to [0, 1], bi/trilinear resize to input_size"
    return f"intensity {json.dumps(spec, sort_keys=True)}, bi/trilinear resize to input_size"


def _check_logits(network: nn.Module, card: ModelCard, where: Path, device: torch.device) -> None:
    """One forward pass on zeros (1, in_channels, *input_size) must give logits (1, num_classes)."""
    blank = torch.zeros((1, card.in_channels, *card.input_size), device=device)
    try:
        with torch.no_grad():
            out = network(blank)
    except Exception as error:  # any network's own exception on an input it does not take
        raise SourceError(
            f"{where}: the network fails on an input of shape {tuple(blank.shape)} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise SourceError(
            f"{where}: the network returns a {type(out).__name__}, not a tensor of logits (N, {card.num_classes})"
        )
    if tuple(out.shape) != (1, card.num_classes):
        raise SourceError(
            f"{where}: the network gives outputs of shape {tuple(out.shape)}, not (1, {card.num_classes})"
        )


def _load_weights(network: nn.Module, weights: Path, described_by: str) -> None:
    """``torch.load(weights_only=True)`` and a strict load; the error names the first differing keys."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SourceError(f"{weights}: no such file (the weights of {described_by})") from None
    except Exception as error:  # torch.load raises many types for truncated or foreign files
        raise SourceError(f"{weights}: unreadable weights ({type(error).__name__}: {error})") from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a checkpoint of MONAI's CheckpointSaver: {"model": state_dict, ...}
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{weights}: not a state_dict of tensors")
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        differences = [
            f"{len(keys)} {what} (first {keys[:_SHOWN_KEYS]})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise SourceError(f"{weights}: the weights do not match {described_by}: {', '.join(differences)}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise SourceError(
            f"{weights}: the weights do not match {described_by} ({str(error).splitlines()[-1].strip()})"
        ) from None


def _weighted(
    network: Any, weights: Path, described_by: str, card: ModelCard, where: Path, device: torch.device
) -> nn.Module:
    """The ``network`` a factory or a bundle built, with ``weights`` loaded strictly, in eval mode on
    ``device``, checked to give logits (:func:`_check_logits`); ``SourceError`` otherwise."""
    if not isinstance(network, nn.Module):
        raise SourceError(f"{where}: {described_by} is a {type(network).__name__}, not a torch module")
    _load_weights(network, weights, described_by)
    network = network.to(device).eval()
    _check_logits(network, card, where, device)
    return network


def _load_torchscript(path: Path, device: torch.device, card: ModelCard | None = None) -> LoadedModel:
    sidecar = path.with_suffix(".json")
    if card is None:
        if not sidecar.is_file():
            raise SourceError(f"{path}: a TorchScript file needs {sidecar.name} beside it (labels, dims, input size)")
        card = _card_from_sidecar(sidecar, "torchscript")
    try:
        network = torch.jit.load(str(path), map_location=device).eval()
    except Exception as error:  # torch.jit.load raises RuntimeError and others for foreign files
        raise SourceError(f"{path}: not a loadable TorchScript file ({type(error).__name__}: {error})") from None
    _check_logits(network, card, path, device)
    scale = intensity_scaling(_read_json(sidecar).get("intensity")) if sidecar.is_file() else None
    return LoadedModel(network, card, "torchscript", path, *_array_pipeline(card, scale))


def _load_factory(weights: Path, device: torch.device) -> LoadedModel:
    sidecar = weights.with_suffix(".json")
    data = _read_json(sidecar)
    spec, kwargs = data.get("factory"), data.get("kwargs", {})
    module_name, _, function_name = str(spec).partition(":")
    if not module_name or not function_name or not isinstance(kwargs, Mapping):
        raise SourceError(f"{sidecar}: 'factory' must be \"package.module:function\" and 'kwargs' an object")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise SourceError(f"{sidecar}: cannot import the factory {spec!r} ({error})") from None
    card = _card_from_sidecar(sidecar, "factory", {"factory": spec, **kwargs})
    try:
        network = factory(**kwargs)
    except Exception as error:  # the factory is the user's code
        raise SourceError(f"{sidecar}: the factory {spec!r} failed ({type(error).__name__}: {error})") from None
    network = _weighted(network, weights, f"the network of {spec}", card, sidecar, device)
    scale = intensity_scaling(data.get("intensity"))
    return LoadedModel(network, card, "factory", weights, *_array_pipeline(card, scale))


def _bundle_card(folder: Path, metadata: dict) -> ModelCard:
    where = folder / BUNDLE_METADATA
    formats = metadata.get("network_data_format")
    inputs = formats.get("inputs") if isinstance(formats, Mapping) else None
    outputs = formats.get("outputs") if isinstance(formats, Mapping) else None
    if not isinstance(inputs, Mapping) or not inputs or not isinstance(outputs, Mapping) or not outputs:
        raise SourceError(f"{where}: 'network_data_format' must describe the network's inputs and outputs")
    first_input, first_output = next(iter(inputs.values())), next(iter(outputs.values()))
    channel_def = first_output.get("channel_def") if isinstance(first_output, Mapping) else None
    if not isinstance(channel_def, Mapping) or not channel_def:
        raise SourceError(f'{where}: the output\'s \'channel_def\' must name each class ({{"0": "normal", ...}})')
    try:
        labels = [str(channel_def[key]) for key in sorted(channel_def, key=int)]
    except ValueError:
        raise SourceError(f"{where}: 'channel_def' keys must be class indices 0, 1, ...") from None
    shape = first_input.get("spatial_shape") if isinstance(first_input, Mapping) else None
    if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
        raise SourceError(f"{where}: the input's 'spatial_shape' must list the network's input size in voxels")
    try:
        return ModelCard(
            architecture="bundle",
            spatial_dims=len(shape),
            in_channels=first_input.get("num_channels", 1),
            num_classes=len(labels),
            labels=labels,
            input_size=shape,
            preprocessing="the bundle's own preprocessing (configs), inverted for the map",
            description=str(metadata.get("name") or metadata.get("description") or ""),
            arch_kwargs={"version": str(metadata.get("version", ""))},
        )
    except (CardError, TypeError) as error:
        raise SourceError(f"{where}: {error}") from None


def _load_bundle(folder: Path, device: torch.device) -> LoadedModel:
    from monai.bundle import ConfigParser

    metadata_path = folder / BUNDLE_METADATA
    metadata = _read_json(metadata_path)
    card = _bundle_card(folder, metadata)
    configs = [folder / "configs" / name for name in _BUNDLE_CONFIGS if (folder / "configs" / name).is_file()]
    if not configs:
        raise SourceError(f"{folder / 'configs'}: no {' or '.join(_BUNDLE_CONFIGS)}")
    parser = ConfigParser()
    try:
        parser.read_meta(str(metadata_path))
        parser.read_config(str(configs[0]))
    except Exception as error:  # yaml and json parsers raise their own types
        raise SourceError(f"{configs[0]}: cannot read ({type(error).__name__}: {error})") from None
    parser["bundle_root"] = str(folder)
    for key in ("network_def", "preprocessing"):
        if key not in parser:
            raise SourceError(f"{configs[0]}: no '{key}'")
    if "network_def#pretrained" in parser and parser["network_def#pretrained"] is True:
        parser["network_def#pretrained"] = False  # the weights come from models/: never downloaded
    try:
        preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
    except Exception as error:  # anything the bundle's code raises
        raise SourceError(f"{configs[0]}: 'preprocessing' cannot be built ({type(error).__name__}: {error})") from None
    torchscript = folder / "models" / "model.ts"
    weights = folder / "models" / "model.pt"
    if not weights.is_file() and torchscript.is_file():
        loaded = _load_torchscript(torchscript, device, card)
        return LoadedModel(
            loaded.network,
            card,
            "bundle",
            folder,
            *_bundle_pipeline(preprocessing, card),
            _bundle_mask_pipeline(preprocessing, card),
        )
    try:
        network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as error:  # anything the bundle's code raises
        raise SourceError(f"{configs[0]}: 'network_def' cannot be built ({type(error).__name__}: {error})") from None
    network = _weighted(network, weights, f"the bundle's network_def ({type(network).__name__})", card, folder, device)
    return LoadedModel(
        network,
        card,
        "bundle",
        folder,
        *_bundle_pipeline(preprocessing, card),
        _bundle_mask_pipeline(preprocessing, card),
    )
