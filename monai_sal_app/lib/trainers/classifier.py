"""The train task of one served classifier: retrain it from a manifest and replace its checkpoint.

``POST /train/<name>`` with a JSON body of parameters (all optional)::

    {"manifest": "train/manifest.csv", "loss": "ce", "augmentations": ["noise", "erasing"],
     "epochs": 20, "batch_size": 32, "lr": 0.001, "patience": 5, "val_fraction": 0.2, "seed": 0,
     "architecture": "conv5fc3", "head": null}

``head``: null (the architecture's own classifier), ``"wildcat"`` or ``{"name": "wildcat", "kmax": 0.2,
"kmin": null, "alpha": 0.7, "maps": 8}`` (options not given take their defaults); by default the
current checkpoint's head.

``manifest`` is a path inside the studies folder (relative to it, or absolute) or, by default,
the manifest the current checkpoint was trained on (recorded in its model card). Training is
:func:`monai_sal_app.models.manifest_training.train_from_manifest`, the same as ``monai-sal train``;
it writes ``<name>.pt`` and ``<name>.json`` atomically (each written under a temporary name and
renamed), and the infer task reloads them at its next request because their mtime changed.
MONAI Label runs this task in a subprocess unless the request says ``run_sync=true``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

from monai_sal_app.arguments import check_integer
from monai_sal_app.lib.errors import RequestError
from monai_sal_app.lib.served_model import ServedModel
from monai_sal_app.models.augment import AUGMENTATIONS, parse_augmentation
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.factory import ARCHITECTURES, head_options
from monai_sal_app.models.losses import LOSSES
from monai_sal_app.models.manifest_training import train_from_manifest

__all__ = ["TRAIN_DEFAULTS", "ClassifierTrainer"]

logger = logging.getLogger(__name__)

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 20,
    "batch_size": 32,
    "lr": 1e-3,
    "patience": 5,
    "val_fraction": 0.2,
    "seed": 0,
}
# Keys MONAI Label's train endpoint and background runner add to the request.
_MONAILABEL_TRAIN_KEYS = frozenset({"model", "gpus", "local_rank", "bundle_path", "device", "client_id"})


def _positive_int(name: str, value: Any) -> int:
    try:
        return check_integer(value, name)
    except ValueError as error:
        raise RequestError(400, str(error)) from None


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise RequestError(400, f"{name} must be a number in ({low}, {high}), got {value!r}")
    return float(value)


def _head(value: Any) -> dict | None:
    """The ``head`` train parameter: null or "none", "wildcat", or {"name": "wildcat", ...options}."""
    if value is None or value == "none":
        return None
    if isinstance(value, str):
        value = {"name": value}
    try:
        return head_options(value)
    except ValueError as error:
        raise RequestError(400, f"head: {error}") from None


class ClassifierTrainer(TrainTask):
    """Retrain the classifier served as ``name`` (its checkpoint is replaced in place)."""

    def __init__(self, name: str, served: ServedModel, studies: str) -> None:
        super().__init__(f"retrain {name} from a manifest (loss, augmentations and epochs as parameters)")
        self.name = name
        self.served = served
        self.studies = studies

    def _card(self) -> ModelCard | None:
        return self.served.card() if self.served.problem() is None else None

    def config(self) -> dict[str, Any]:
        card = self._card()
        if card is None:
            return {
                "manifest": "",
                "architecture": "conv5fc3",
                "head": None,
                "loss": "ce",
                "augmentations": [],
                **TRAIN_DEFAULTS,
            }
        return {
            "manifest": card.data.get("manifest", ""),
            "architecture": card.architecture,
            "head": card.head,
            "loss": card.loss or "ce",
            "augmentations": list(card.augmentations),
            **TRAIN_DEFAULTS,
            **{k: card.training[k] for k in ("batch_size", "lr", "seed") if k in card.training},
        }

    def stats(self) -> dict[str, Any]:
        card = self._card()
        if card is None:
            return {}
        return {
            "checkpoint": self.served.path.name,
            "created": card.created,
            "metrics": card.metrics,
            "epochs_run": card.training.get("epochs_run"),
        }

    def _manifest(self, value: Any, recorded: str) -> str:
        """The manifest path to train on: inside the studies folder, or the one the card records."""
        if not isinstance(value, str) or not value:
            raise RequestError(400, "no manifest: pass 'manifest' (a manifest.csv inside the studies folder)")
        studies = os.path.realpath(self.studies)
        path = os.path.realpath(value if os.path.isabs(value) else os.path.join(studies, value))
        allowed = (recorded and path == os.path.realpath(recorded)) or os.path.commonpath([path, studies]) == studies
        if not allowed:
            raise RequestError(400, f"manifest {value!r} is outside the studies folder")
        if not os.path.isfile(path):
            raise RequestError(404, f"manifest {value!r} not found")
        return path

    def parse(self, request: dict) -> dict[str, Any]:
        """Validated training parameters: the task's :meth:`config` updated by ``request``."""
        defaults = self.config()
        unknown = sorted(set(request) - set(defaults) - _MONAILABEL_TRAIN_KEYS)
        if unknown:
            raise RequestError(400, f"unknown train parameter(s) {unknown}; known: {sorted(defaults)}")
        p = {**defaults, **{k: v for k, v in request.items() if k in defaults}}
        p["manifest"] = self._manifest(p["manifest"], defaults["manifest"])
        if p["architecture"] not in ARCHITECTURES:
            raise RequestError(
                400, f"unknown architecture {p['architecture']!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        p["head"] = _head(p["head"])
        if p["loss"] not in LOSSES:
            raise RequestError(400, f"unknown loss {p['loss']!r}; choose one of {', '.join(LOSSES)}")
        augmentations = p["augmentations"]
        if isinstance(augmentations, str):
            augmentations = [a.strip() for a in augmentations.split(",") if a.strip()]
        if not isinstance(augmentations, list):
            raise RequestError(400, f"augmentations must be a list drawn from {', '.join(AUGMENTATIONS)}")
        for spec in augmentations:
            try:
                parse_augmentation(spec)
            except (TypeError, ValueError) as error:
                raise RequestError(400, f"augmentations: {error}") from None
        p["augmentations"] = augmentations
        for key in ("epochs", "batch_size", "patience"):
            p[key] = _positive_int(key, p[key])
        if isinstance(p["seed"], bool) or not isinstance(p["seed"], int):
            raise RequestError(400, f"seed must be an integer, got {p['seed']!r}")
        p["lr"] = _number("lr", p["lr"], 0.0, 10.0)
        p["val_fraction"] = _number("val_fraction", p["val_fraction"], 0.0, 1.0)
        return p

    def __call__(self, request: dict, datastore) -> dict[str, Any]:

        p = self.parse(request)
        card = self._card()
        if card is None:
            raise RequestError(503, f"model {self.name!r} is unavailable: {self.served.problem()}")
        test_manifest = card.data.get("test_manifest")  # scored again, so /info keeps showing test numbers
        logger.info("training %s on %s: %s", self.name, p["manifest"], {k: v for k, v in p.items() if k != "manifest"})
        start = time.perf_counter()
        try:
            _, trained = train_from_manifest(
                p["manifest"],
                self.served.path,
                arch=p["architecture"],
                # the served network's own options (channels, pools...) when it keeps its architecture
                arch_kwargs=card.arch_kwargs if p["architecture"] == card.architecture else None,
                head=p["head"],
                loss=p["loss"],
                augmentations=p["augmentations"],
                epochs=p["epochs"],
                batch_size=p["batch_size"],
                lr=p["lr"],
                patience=p["patience"],
                val_fraction=p["val_fraction"],
                labels=card.labels,
                test_manifest=test_manifest if test_manifest and os.path.isfile(test_manifest) else None,
                input_size=card.input_size,
                seed=p["seed"],
                device=str(self.served.device),
                progress=False,
                log=logger.info,
            )
        except ValueError as error:
            raise RequestError(400, f"training {self.name} failed: {error}") from error
        return {
            "model": self.name,
            "checkpoint": str(self.served.path),
            "metrics": trained.metrics,
            "epochs_run": trained.training.get("epochs_run"),
            "seconds": time.perf_counter() - start,
        }
