"""The infer task of one served classifier: class probabilities plus a saliency heatmap.

It implements MONAI Label's ``InferTask`` interface directly rather than ``BasicInferTask``:
the whole path is ``data.io.read_image`` -> the model source's ``prepare`` (min-max and resize,
or a bundle's own preprocessing) -> ``inference.explain_prepared`` (the path shared with the
CLI) -> a NIfTI written with the input's own affine, so none of BasicInferTask's transform chain,
writer or network loader would be used. Consequences:

- Gradients: nothing here runs under ``torch.no_grad()``; the explanation still runs inside
  ``torch.enable_grad()`` so that it also works when called from a no-grad context.
- Geometry: the heatmap is ``explain_array``'s map on the image's own array grid, saved with the
  affine ``read_image`` returned (for NIfTI inputs, with the file's own array shape, e.g. a 2D
  image stored as (H, W, 1) gives an (H, W, 1) heatmap). Reading the heatmap back with
  ``read_image`` gives an array of the input's shape, voxel for voxel.
- A mask uploaded as ``label`` is binarised as ``> 0.5`` and scored with
  ``metrics.localization.mask_metrics``: ``localization_metrics``, exactly as ``monai-sal evaluate``
  does, and for an XRAI map the XRAI-region Dice of its regions.

The request keys are read by :func:`monai_sal_app.lib.inputs.parse_explain_request`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from monai_sal_app.data.io import ImageError, ImageTooLarge, read_image, write_nifti
from monai_sal_app.evaluation.trust import trust_summary
from monai_sal_app.files import json_safe
from monai_sal_app.inference import explain_prepared
from monai_sal_app.lib.errors import RequestError
from monai_sal_app.lib.inputs import IMAGE_NAME_KEY, default_method, parse_explain_request
from monai_sal_app.lib.limits import DEFAULT_LIMITS, ServerLimits
from monai_sal_app.lib.served_model import ServedModel
from monai_sal_app.metrics.localization import mask_metrics
from monai_sal_app.saliency import get_method
from monai_sal_app.saliency.core import BoundError, check_request

__all__ = ["SaliencyInfer", "nifti_array_shape"]

logger = logging.getLogger(__name__)

INPUT_FORMATS = {2: ["nifti", "nrrd", "png", "jpeg", "dicom"], 3: ["nifti", "nrrd", "dicom"]}


def nifti_array_shape(path: str, spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The array shape stored in the NIfTI file ``path`` (``read_image`` drops trailing singleton axes)."""
    shape = tuple(int(s) for s in nib.load(path).shape)
    return shape if int(np.prod(shape)) == int(np.prod(spatial_shape)) else spatial_shape


class SaliencyInfer(InferTask):
    """``POST /infer/<name>``: probabilities (JSON) and a float32 NIfTI heatmap on the input grid."""

    def __init__(
        self, name: str, served: ServedModel, description: str = "", limits: ServerLimits = DEFAULT_LIMITS
    ) -> None:
        card = served.card()
        super().__init__(
            type=InferType.CLASSIFICATION,
            labels=list(card.labels),
            dimension=card.spatial_dims,
            description=description or f"{card.architecture} {card.spatial_dims}D classifier with saliency maps",
            config={"method": default_method(served.methods()), "target": None},
        )
        self.name = name
        self.served = served
        self.limits = limits

    def is_valid(self) -> bool:
        return self.served.problem() is None

    def info(self) -> dict[str, Any]:
        """What a client needs to build its menus: dimension, labels, input size, methods, device."""
        card = self.served.card()
        spatial_dims = card.spatial_dims
        return json_safe(
            {
                "type": self.type,
                "labels": list(card.labels),
                "dimension": spatial_dims,
                "description": self.description,
                "config": self.config(),
                "source": self.served.kind,
                "architecture": card.architecture,
                "input_size": card.input_size,
                "decision_threshold": card.decision_threshold,
                "input_formats": INPUT_FORMATS[spatial_dims],
                "preprocessing": card.preprocessing,
                "methods": self.served.methods(),
                "methods_unavailable": self.served.unavailable_methods(),
                "default_method": default_method(self.served.methods()),
                "device": str(self.served.device),
                "checkpoint": {
                    "file": self.served.path.name,
                    "modified": self.served.modified(),
                    "created": card.created,
                },
                "metrics": card.metrics,
                "trust": self._trust(),
                "output": {
                    "heatmap": "NIfTI (.nii, uncompressed) float32 on the input's grid",
                    "json": "probabilities, target, method, params, seconds, metrics",
                },
            }
        )

    def __call__(self, request: dict) -> tuple[str, dict]:
        """Explain ``request["image"]`` (a path already checked by the app); returns (heatmap path, JSON)."""
        start = time.perf_counter()
        image_path = request["image"]
        shown = request.get(IMAGE_NAME_KEY, "image")
        card = self.served.card()
        labels = list(card.labels)
        methods = self.served.methods()
        method, target, options = parse_explain_request(request, labels, self.config(), methods)  # before reading
        self._check_cost(method, options, card.input_size)
        array, meta = self._read(image_path, shown, allow_constant=False)
        mask = None
        if request.get("label"):
            mask = self._read(request["label"], "mask", allow_constant=True)[0] > 0.5
            if mask.shape != array.shape:
                raise RequestError(
                    400,
                    f"mask shape {list(mask.shape)} differs from the image's {list(array.shape)}: send the mask on the image's grid",
                )
            if not mask.any() or mask.all():
                raise RequestError(
                    400, "mask must contain both foreground (> 0.5) and background pixels/voxels to score a map"
                )
        read_seconds = time.perf_counter() - start

        with self.served.use() as loaded:
            model, card = loaded.network, loaded.card
            current = self.served.methods()
            if list(card.labels) != labels or current != methods:  # replaced meanwhile
                labels, methods = list(card.labels), current
                method, target, options = parse_explain_request(request, labels, self.config(), methods)
                self._check_cost(method, options, card.input_size)
            kind = get_method(method).explainer
            if kind is not None:  # the trained explainer beside the checkpoint, never one named by the client
                options = {**options, "explainer": self.served.explainers()[kind]}
            try:
                prepared = loaded.prepare(image_path, array, meta)
                with torch.enable_grad():
                    explanation = explain_prepared(model, card, prepared, method, target=target, params=options)
            except (ValueError, TypeError) as error:
                raise RequestError(400, f"{shown}: {error}") from error
            checkpoint = {"file": self.served.path.name, "modified": self.served.modified()}
            decision_threshold = card.decision_threshold

        metrics_start = time.perf_counter()
        metrics = mask_metrics(explanation.saliency, mask, xrai=method == "xrai") if mask is not None else None
        metrics_seconds = time.perf_counter() - metrics_start

        write_start = time.perf_counter()
        heatmap_path = self._write_heatmap(explanation.saliency, image_path, meta, method)
        write_seconds = time.perf_counter() - write_start

        probabilities = explanation.probabilities
        predicted = explanation.prediction
        result = {
            "model": self.name,
            "labels": labels,
            "probabilities": dict(zip(labels, probabilities)),
            "prediction": {
                "index": predicted,
                "label": labels[predicted],
                "probability": probabilities[predicted],
                "decision_threshold": decision_threshold,
            },
            "target": {
                "index": explanation.target,
                "label": labels[explanation.target],
                "probability": probabilities[explanation.target],
            },
            "method": method,
            "params": {
                **methods[method]["defaults"],
                **options,
                **({"explainer": self.served.explainer_path(kind).name} if kind is not None else {}),
            },
            "device": str(self.served.device),
            "checkpoint": checkpoint,
            "image": {"format": meta["format"], "shape": list(array.shape)},
            "heatmap": {
                "format": "nifti",
                "dtype": "float32",
                "shape": list(explanation.saliency.shape),
                "min": float(explanation.saliency.min()),
                "max": float(explanation.saliency.max()),
            },
            "seconds": {
                "read": read_seconds,
                **explanation.seconds,
                "metrics": metrics_seconds,
                "write": write_seconds,
                "task_total": time.perf_counter() - start,
            },
        }
        result["trust"] = self._trust(method)
        if metrics is not None:
            result["metrics"] = metrics
        logger.info(
            "%s %s %s target=%d: %.3f s", self.name, shown, method, explanation.target, result["seconds"]["task_total"]
        )
        return heatmap_path, json_safe(result)

    def _trust(self, method: str | None = None) -> dict:
        """The trust card in short: all methods (``/info``) or ``method``'s entry (an answer)."""
        found = self.served.trust()
        if not found["available"]:
            return found
        return {"stale": found["stale"], **trust_summary(found["card"], method)}

    def _check_cost(self, method: str, options: dict, input_size) -> None:
        """400 for a parameter over its bound or a request over the server's cost budget."""
        try:
            check_request(method, options, tuple(input_size), self.limits.max_request_cost, "max_request_cost")
        except BoundError as error:
            raise RequestError(400, str(error)) from error

    def _read(self, path: str, shown: str, allow_constant: bool) -> tuple[np.ndarray, dict]:
        """The image (or mask) as ``read_image`` gives it: 413 over the size limits, before decoding."""
        try:
            return read_image(path, allow_constant=allow_constant, max_voxels=self.limits.max_voxels_by_dims)
        except ImageTooLarge as error:
            setting = "max_pixels or max_voxels"
            raise RequestError(413, f"{str(error).replace(str(path), shown)} ({setting})") from error
        except ImageError as error:
            raise RequestError(400, str(error).replace(str(path), shown)) from error

    def _write_heatmap(self, saliency: np.ndarray, image_path: str, meta: dict, method: str) -> str:
        """Write the map to a new temporary ``.nii`` (MONAI Label deletes it after the response).

        Uncompressed: a float32 map of noise-like values compresses poorly, and gzip would add its
        time to every answer."""
        if meta["format"] == "nifti":
            saliency = saliency.reshape(nifti_array_shape(image_path, saliency.shape))
        handle, path = tempfile.mkstemp(prefix=f"heatmap_{self.name}_{method}_", suffix=".nii")
        os.close(handle)
        try:
            write_nifti(saliency.astype(np.float32), path, affine=meta["affine"])
        except BaseException:
            os.unlink(path)
            raise
        return path
