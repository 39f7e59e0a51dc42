"""A served classifier checkpoint: loaded once, reloaded when its files change, never served broken.

A checkpoint is ``<model_dir>/<name>.pt`` (a plain ``state_dict``) plus its model card
``<name>.json`` (see :mod:`monai_sal_app.models.checkpoint`). :class:`ServedModel` keeps the loaded
network and reloads it when the size or modification time of either file changes, so a train
task (or a user copying a new checkpoint in) is picked up by the next request without restarting
the server. If the files are missing or do not load, the model is unavailable (:meth:`problem`
says why) and requests get a 503: it never runs with random or stale weights after a failed reload.

Trained explainers beside the checkpoint (``<name>.mask_generator.pt`` with its card) are loaded
the same way; each offers its method for this model only while its card names the weights now
served (after a retraining it is not offered, and the log says why).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from monai_sal_app.evaluation.trust import OutdatedTrustCard, read_trust_card, trust_card_path
from monai_sal_app.explainers import EXPLAINER_KINDS, check_explainer_for, load_explainer
from monai_sal_app.lib.errors import RequestError
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.checkpoint import card_path, weights_fingerprint
from monai_sal_app.models.sources import BUNDLE_METADATA, LoadedModel, load_model_source, source_files, source_kind
from monai_sal_app.saliency import available_methods, get_method

__all__ = ["MODEL_NAME", "ServedModel", "find_model_sources"]

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # usable in a URL path and as a file name
_RELOAD_ATTEMPTS = 3  # a checkpoint replaced while it is being read is read again


def find_model_sources(
    model_dir: str | os.PathLike, names: list[str] | None = None
) -> tuple[dict[str, Path], dict[str, str]]:
    """Model sources in ``model_dir``: ``({name: path}, {name: why it is not served})``.

    A source (``models.sources``) is ``<name>.pt`` with ``<name>.json`` (our checkpoint and card,
    or a factory's sidecar), ``<name>.ts`` with ``<name>.json`` (TorchScript), or a bundle folder
    ``<name>/`` with ``configs/metadata.json``; trained explainers (``<name>.<kind>.pt``) are served
    with their model. ``names`` None takes every one; otherwise exactly those names. Names must
    match :data:`MODEL_NAME`. Nothing is loaded here.
    """
    model_dir = Path(model_dir)
    found: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    if names is None:
        entries = sorted(model_dir.iterdir()) if model_dir.is_dir() else []
        bundles = {p.name for p in entries if p.is_dir() and source_kind(p) == "bundle"}  # other folders: not models
        stems = {p.stem for p in entries if p.suffix in (".pt", ".ts")} | bundles
        explainers = tuple(f".{kind}" for kind in EXPLAINER_KINDS)
        candidates = sorted(s for s in stems if not s.endswith(explainers) and not s.startswith("."))
    else:
        candidates = list(names)
    for name in candidates:
        folder, weights = model_dir / name, model_dir / f"{name}.pt"
        path = (
            folder if folder.is_dir() else model_dir / f"{name}.ts" if (model_dir / f"{name}.ts").is_file() else weights
        )
        if not MODEL_NAME.match(name):
            skipped[name] = f"invalid model name {name!r} (letters, digits, '_', '-', '.' only)"
        elif path.is_dir():
            if source_kind(path) is None:
                skipped[name] = f"not a model: a folder without {BUNDLE_METADATA}"
            else:
                found[name] = path
        elif not path.is_file():
            skipped[name] = f"weights missing: {weights}"
        elif not path.with_suffix(".json").is_file():
            skipped[name] = f"model card missing: {path.with_suffix('.json')}"
        else:
            found[name] = path
    return found, skipped


class ServedModel:
    """The classifier of one checkpoint, shared by the infer and train tasks of one served model.

    ``use()`` yields ``(model, card)`` while holding the model's run lock, so concurrent requests
    on the same model run one after another (a saliency method hooks into and differentiates
    through the shared network). Everything else (card, methods, explainers, trust; ``/info``)
    takes only the short state lock, so it answers while a request runs; a reload then swaps in
    the new network for the next request, and the running one finishes on the network it started
    with.
    """

    def __init__(self, name: str, path: str | os.PathLike, device: torch.device) -> None:
        self.name = name
        self.path = Path(path)
        self.device = torch.device(device)
        self._lock = threading.RLock()  # the loaded state: held for a reload, never for a request
        self._run_lock = threading.Lock()  # one request at a time on the shared network
        self._stamp: tuple | None = None
        self._model: nn.Module | None = None
        self._card: ModelCard | None = None
        self._loaded: LoadedModel | None = None
        self._error: str | None = None
        self._trust: dict | None = None
        self._trust_stamp: tuple | None = None
        self._trust_problem = ""  # why the card on disk is not used, when it is not
        self._fingerprint: str | None = None
        self._explainers: dict[str, tuple[tuple, nn.Module | None]] = {}  # kind -> (stamps, module or None)

    def _file_stamp(self) -> tuple:
        """(name, mtime_ns, size) of each file of the source (``models.sources.source_files``: the
        weights and the card, or a bundle's configs and models); FileNotFoundError if one is missing."""
        stamps = []
        for path in source_files(self.path):
            stat = os.stat(path)
            stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
        if not stamps:
            raise FileNotFoundError(2, "no model files", str(self.path))
        return tuple(stamps)

    def _refresh(self) -> None:
        """Load the checkpoint if it changed since the last load (caller holds the lock)."""
        try:
            stamp = self._file_stamp()
        except FileNotFoundError as error:
            self._forget(f"weights or model card missing ({error.filename})")
            return
        if stamp == self._stamp:
            return
        for _ in range(_RELOAD_ATTEMPTS):
            try:
                loaded = load_model_source(self.path, device=self.device)
                after = self._file_stamp()
            except (FileNotFoundError, ValueError) as error:  # SourceError and CheckpointError are ValueErrors
                self._forget(str(error))
                return
            if after == stamp:
                if self._stamp is not None:
                    logger.info("model %s: reloaded %s (changed on disk)", self.name, self.path)
                self._loaded, self._stamp, self._error = loaded, stamp, None
                self._model, self._card = loaded.network, loaded.card
                self._fingerprint = weights_fingerprint(loaded.network)
                return
            stamp = after  # replaced while loading: read the new files
        self._forget(f"checkpoint kept changing while being read ({self.path})")

    def _forget(self, reason: str) -> None:
        if self._error != reason:
            logger.warning("model %s is not served: %s", self.name, reason)
        self._model, self._card, self._loaded, self._stamp, self._error = None, None, None, None, reason

    def problem(self) -> str | None:
        """Why the model cannot be served now (None when it can); loads or reloads it if needed."""
        with self._lock:
            self._refresh()
            return self._error

    def card(self) -> ModelCard:
        """The current model card; :class:`RequestError` 503 when the model is unavailable."""
        return self._current()[1]

    def _current(self) -> tuple[nn.Module, ModelCard]:
        """The up-to-date ``(model, card)`` (reloaded if the files changed); 503 if unavailable."""
        with self._lock:
            self._refresh()
            if self._model is None:
                raise RequestError(503, f"model {self.name!r} is unavailable: {self._error}")
            return self._model, self._card

    def files_modified_ns(self) -> int:
        """Modification time (ns) of the newest file of the source on disk (weights, card, a
        bundle's configs and models); FileNotFoundError if one is missing."""
        return max(os.stat(path).st_mtime_ns for path in source_files(self.path))

    def modified(self) -> str:
        """Modification time of the newest file of the source now served, ISO 8601 UTC."""
        seconds = max(m for _, m, _ in self._stamp) / 1e9 if self._stamp else os.stat(self.path).st_mtime
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="milliseconds")

    def trust(self) -> dict:
        """The model's trust card in short (``evaluation.trust.trust_summary``), re-read when its file
        (``<name>.trust.json``) changes; ``{"available": False, "why": ...}`` without a usable one.
        ``stale`` is true when the weights are newer than the card (retrained since)."""
        with self._lock:
            path = trust_card_path(self.path)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                self._trust, self._trust_stamp = None, None
                return {"available": False, "why": f"no trust card: monai-sal trust --model {self.path.name} <images>"}
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._trust_stamp:
                self._trust_problem = ""
                try:
                    self._trust = read_trust_card(self.path)
                except OutdatedTrustCard as error:
                    self._trust, self._trust_problem = None, f"{error}".replace(str(path), path.name)
                except ValueError as error:
                    logger.warning("model %s: trust card not used: %s", self.name, error)
                    self._trust, self._trust_problem = (
                        None,
                        f"the trust card {path.name} is corrupt (see the server log)",
                    )
                self._trust_stamp = stamp
            if self._trust is None:
                return {"available": False, "why": self._trust_problem}
            stale = self.files_modified_ns() > stat.st_mtime_ns
            return {"available": True, "stale": stale, "card": self._trust}

    def explainer_path(self, kind: str) -> Path:
        """Where this model's trained ``kind`` explainer is looked for: ``<name>.<kind>.pt`` beside it."""
        return self.path.with_name(f"{self.path.stem}.{kind}.pt")

    def explainers(self) -> dict[str, nn.Module]:
        """Kind -> loaded explainer, for the explainer checkpoints beside the model that were trained
        for the weights now served; re-read when their files or the model's change."""
        with self._lock:
            self._current()
            found = {}
            for kind in EXPLAINER_KINDS:
                path = self.explainer_path(kind)
                try:
                    stamps = (os.stat(path).st_mtime_ns, os.stat(card_path(path)).st_mtime_ns, self._stamp)
                except FileNotFoundError:
                    self._explainers.pop(kind, None)
                    continue
                if kind not in self._explainers or self._explainers[kind][0] != stamps:
                    try:
                        explainer, explainer_card = load_explainer(path, device=self.device)
                        check_explainer_for(explainer_card, self._fingerprint)
                    except (FileNotFoundError, ValueError) as error:  # CheckpointError, ExplainerMismatch
                        logger.warning("model %s: method %s is not offered: %s", self.name, kind, error)
                        explainer = None
                    self._explainers[kind] = (stamps, explainer)
                if self._explainers[kind][1] is not None:
                    found[kind] = self._explainers[kind][1]
            return found

    def methods(self) -> dict[str, dict]:
        """The saliency methods that can explain the model now served: ``available_methods(model)``,
        those that need a trained explainer only when one for these weights is beside it."""
        with self._lock:
            model, _ = self._current()
            explainers = self.explainers()
            return {
                name: spec
                for name, spec in available_methods(model).items()
                if get_method(name).explainer is None or get_method(name).explainer in explainers
            }

    def unavailable_methods(self) -> dict[str, str]:
        """The registered methods not offered for the model now served, each with why (a WILDCAT
        head or a trained explainer it lacks, hooks a TorchScript module does not take)."""
        with self._lock:
            model, _ = self._current()
            offered = self.methods()
            reasons = {}
            for name in available_methods():
                spec = get_method(name)
                if name in offered:
                    continue
                if not spec.applies_to(model):
                    reasons[name] = spec.needs(model)
                else:
                    reasons[name] = f"it needs a {spec.explainer} trained for these weights beside the model"
            return reasons

    @property
    def kind(self) -> str:
        """ "checkpoint", "bundle", "torchscript" or "factory" (``models.sources``); 503 if unavailable."""
        with self._lock:
            self._current()
            return self._loaded.kind

    @contextlib.contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """Hold the model's run lock and yield the up-to-date source (``models.sources.LoadedModel``:
        network, card, ``prepare``); 503 if unavailable."""
        with self._run_lock:
            with self._lock:
                self._current()
                loaded = self._loaded
            yield loaded
