"""The MONAI Label app class of monai-sal (:class:`MonaiSalApp`).

MONAI Label serves an app *folder* whose ``main.py`` holds a direct subclass of ``MONAILabelApp``,
and it writes into that folder (``logs/``, ``model/``, ``lib/``, ``bin/``). So that nothing is ever
written inside the installed package, the app folder is the work folder of ``monai-sal serve``
(``serve.write_app_folder`` puts a two-line ``main.py`` there that imports this class)::

    monai-sal serve                                   # prepares <workdir> and starts the server
    monailabel start_server --app monai-sal-serve --studies monai-sal-serve/studies

Serves every classifier checkpoint found in the model folder (``<app>/model/<name>.pt`` with its
``<name>.json`` card; ``monai-sal serve`` trains ``chest_xray_2d`` and ``ct_lesion_3d`` there).
Per model: an infer task (probabilities + saliency heatmap, any registered method) and a train
task. A checkpoint that is missing or does not load is left out of ``/info`` and the log says why.

Settings (``--conf key value``):

- ``model_dir``: folder of the checkpoints (default ``<app>/model``);
- ``models``: comma list of model names to serve (default: every checkpoint in ``model_dir``);
- ``device``: e.g. ``cpu`` or ``cuda:1`` (default: CUDA when available, else CPU);
- ``max_request_cost``, ``max_upload_mb``, ``max_pixels``, ``max_voxels``, ``request_timeout_s``:
  what one request may cost (:mod:`monai_sal_app.lib.limits`; shown in ``/info``);
- ``store_heatmaps``, ``store_overlays``, ``dicomweb_timeout_s``, ``dicomweb_cache_mb``,
  ``dicomweb_modalities``: with ``--studies http://.../dicom-web``, a DICOMweb store such as Orthanc
  (:mod:`monai_sal_app.lib.dicomweb`): maps stored back into the study, time limits, the cache bound
  and the modalities listed;
- ``tokens_file``: the access tokens of the reader and the operator (:mod:`monai_sal_app.access`;
  or ``MONAI_SAL_READER_TOKEN`` / ``MONAI_SAL_OPERATOR_TOKEN`` in the environment). Without
  tokens the server answers on loopback only, and does not start on another address.

Running as the server, the app also puts on MONAI Label's FastAPI app: its 4xx messages
(``lib.errors``), the request limits (``lib.limits``), pages that load nothing from the network
(``lib.pages``) and the access control (``lib.access_control``); its background train and scoring
processes end with it (``lib.background``), and the trust cards are recomputed at the start only
when a checkpoint or the datastore changed since they were made.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

import torch
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

from monai_sal_app.access import AccessTokens, check_listen_address
from monai_sal_app.data.dicom_objects import SaliencyDescription, saliency_objects
from monai_sal_app.data.io import read_image
from monai_sal_app.lib.access_control import install_access_control, launcher_listen_host
from monai_sal_app.lib.background import end_background_work_with_the_server, end_with_parent
from monai_sal_app.lib.configs.classifier import ClassifierConfig
from monai_sal_app.lib.dicomweb import DicomWebSettings, DicomWebStudies, store_saliency_objects
from monai_sal_app.lib.errors import RequestError, install_http_errors
from monai_sal_app.lib.inputs import (
    IMAGE_NAME_KEY,
    STORE_KEY,
    CheckedSessions,
    remove_uploads,
    resolve_image,
    resolve_label,
)
from monai_sal_app.lib.limits import SHUTTING_DOWN, ServerLimits, install_limits, stop_requests_on_shutdown
from monai_sal_app.lib.pages import install_pages
from monai_sal_app.lib.scoring.trust import TrustScoring
from monai_sal_app.lib.served_model import find_model_sources
from monai_sal_app.models.device import default_device
from monai_sal_app.saliency.core import Stopped
from monai_sal_app.version import __version__

logger = logging.getLogger(__name__)


_M_ARENA_MAX = -8  # glibc mallopt parameter (malloc.h)


def _glibc():
    """The C library's ``mallopt`` and ``malloc_trim`` (None, None on other C libraries)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return (libc.mallopt, libc.malloc_trim) if libc is not None else (None, None)
    except (OSError, AttributeError):
        return None, None


_MALLOPT, _MALLOC_TRIM = _glibc()


def use_one_malloc_arena() -> None:
    """One glibc malloc arena for the whole server (at start; a no-op on other C libraries).

    Requests allocate image, activation and gradient buffers of many sizes from several threads
    (the event loop, the infer worker threads, Starlette's thread pool for uploads); by default
    glibc gives threads arenas of their own, where freed pages stay, and trimming them all after
    each request cost tens of milliseconds. With one arena the trim after each request
    (:func:`release_free_memory`) is cheap and the server's memory stays flat; both measured
    with ``scripts/benchmark_server_memory.py`` and ``scripts/benchmark_server_latency.py``
    (the numbers are in docs/SERVER.md, "Notes").
    """
    if _MALLOPT is not None:
        _MALLOPT(_M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc only; a no-op elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class MonaiSalApp(MONAILabelApp):
    """Saliency maps for the classifiers in the model folder, over the MONAI Label REST API."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = conf or {}
        server = sys.modules.get("monailabel.app")
        if server is None:  # a train or scoring task process started by the server
            end_with_parent()
        else:
            self.tokens = _tokens_or_exit(conf)
        self.limits = ServerLimits.from_conf(conf)  # a bad setting stops the start with its name
        self.dicomweb = DicomWebSettings.from_conf(conf)
        self.model_dir = os.path.realpath(conf.get("model_dir") or os.path.join(app_dir, "model"))
        self.device = torch.device(conf["device"]) if conf.get("device") else default_device()
        names = [n.strip() for n in conf.get("models", "").split(",") if n.strip()] or None
        found, skipped = find_model_sources(self.model_dir, names)
        self.task_configs: dict[str, ClassifierConfig] = {}
        for name, path in found.items():
            config = ClassifierConfig()
            config.init(
                name, self.model_dir, conf, None, path=path, device=self.device, studies=studies, limits=self.limits
            )
            problem = config.problem()
            if problem:
                skipped[name] = problem
            else:
                self.task_configs[name] = config
        for name, reason in skipped.items():
            logger.warning("model %s is not served: %s", name, reason)
        if self.task_configs:
            logger.info("serving %s on %s from %s", ", ".join(self.task_configs), self.device, self.model_dir)
        else:
            logger.warning(
                "no model is served: no loadable <name>.pt + <name>.json in %s (run `monai-sal serve`, or "
                "`monai-sal train --out %s/<name>.pt`)",
                self.model_dir,
                self.model_dir,
            )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai-sal",
            description="Saliency maps for medical image classifiers (2D and 3D)",
            version=__version__,
        )
        if server is not None:  # running inside the MONAI Label server (not a train subprocess)
            install_http_errors(server.app)
            install_limits(server.app, self.limits)
            install_pages(server.app, self.info)
            install_access_control(server.app, self.tokens)  # last: the outermost middleware
            stop_requests_on_shutdown()
            end_background_work_with_the_server()
            use_one_malloc_arena()

    def on_init_complete(self):
        """MONAI Label's start, except that the trust cards are recomputed only when a checkpoint
        or the datastore changed since they were made (``TrustScoring.reasons_to_score``)."""
        automatic, self._auto_update_scoring = self._auto_update_scoring, False
        try:
            super().on_init_complete()
        finally:
            self._auto_update_scoring = automatic
        if not automatic or "trust" not in self._scoring_methods:
            return
        remote = self.studies.startswith(("http://", "https://"))
        reasons = self._scoring_methods["trust"].reasons_to_score(None if remote else self.datastore())
        if reasons:
            logger.info("trust scoring at start: %s", "; ".join(f"{n}: {r}" for n, r in reasons.items()))
            self.async_scoring("trust")
        else:
            logger.info(
                "trust scoring at start skipped: every trust card is newer than its checkpoint and the datastore"
            )

    def async_scoring(self, method, params=None):
        """MONAI Label's, except that nothing new starts once the server is stopping."""
        if SHUTTING_DOWN.is_set():
            return {}
        return super().async_scoring(method, params)

    def async_training(self, model, params=None, enqueue=False):
        """MONAI Label's, except that nothing new starts once the server is stopping."""
        if SHUTTING_DOWN.is_set():
            return {}
        return super().async_training(model, params, enqueue)

    def init_datastore(self) -> Datastore:
        """The stock local datastore, also listing single-file DICOM X-rays (``*.dcm``); for an
        ``http(s)://`` studies URL, a DICOMweb store (:class:`~monai_sal_app.lib.dicomweb.DicomWebStudies`,
        its downloads cached in ``MONAI_LABEL_DICOMWEB_CACHE_PATH`` or ``<app>/dicomweb-cache``)."""
        if self.studies.startswith(("http://", "https://")):
            self.studies = self.studies.rstrip("/").strip()
            cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
            return DicomWebStudies(
                self.studies,
                cache_dir=cache or os.path.join(self.app_dir, "dicomweb-cache"),
                cache_mb=self.dicomweb.dicomweb_cache_mb,
                timeout_s=self.dicomweb.dicomweb_timeout_s,
                modalities=self.dicomweb.dicomweb_modalities,
            )
        extensions = list(settings.MONAI_LABEL_DATASTORE_FILE_EXT)
        if "*.dcm" not in extensions:
            extensions.append("*.dcm")
        return LocalDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _load_sessions(self, load=False):
        """MONAI Label's session store, refusing ids that are paths (see ``CheckedSessions``)."""
        if not load:
            return None
        return CheckedSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def init_infers(self):
        return {name: config.infer() for name, config in self.task_configs.items()}

    def init_trainers(self):
        """A train task for each served checkpoint of ours (a bundle, TorchScript or factory model
        is trained where it was made)."""
        return {
            name: config.trainer() for name, config in self.task_configs.items() if config.served.kind == "checkpoint"
        }

    def init_scoring_methods(self):
        """``trust``: the trust cards of the served models, recomputed on the datastore images."""
        return {"trust": TrustScoring({name: config.served for name, config in self.task_configs.items()})}

    def _store_requested(self, request: dict, from_store: bool) -> bool:
        """Whether the request's map is to be stored: its ``store`` (true or false; true only for a
        series of the DICOMweb datastore), else ``--conf store_heatmaps``."""
        store = request.get(STORE_KEY)
        if store is None:
            return self.dicomweb.store_heatmaps
        if not isinstance(store, bool):
            raise RequestError(400, f"'store' must be true or false, got {store!r}")
        uploaded = request.get("image") is not None and not isinstance(request.get("image"), str)
        if store and (not from_store or uploaded or "/" in str(request.get("image", ""))):
            raise RequestError(
                400,
                "'store' needs an image of a DICOMweb datastore (the server runs with --studies http://.../dicom-web "
                "and the request names a series by its id); this image has no study to go back to",
            )
        return store

    def _store_heatmap(self, datastore: DicomWebStudies, image_path: str, result: dict) -> dict:
        """Make the map's DICOM objects (a Parametric Map, with ``store_overlays`` RGB overlays) and
        STOW them into the image's study; what happened, for the answer's ``dicom``."""
        answer = result["params"]
        try:
            array, meta = read_image(image_path)
            saliency, _ = read_image(result["file"], allow_constant=True)
            description = SaliencyDescription(
                answer["method"], answer["target"]["label"], answer["target"]["probability"], answer["model"]
            )
            objects = saliency_objects(
                array, meta, saliency.reshape(array.shape), description, overlay=self.dicomweb.store_overlays
            )
        except (ValueError, RuntimeError) as error:
            logger.warning("no DICOM objects made for %s: %s", answer.get("model"), error)
            return {"stored": False, "why": f"no DICOM objects could be made: {error}", "objects": []}
        return store_saliency_objects(datastore.client, objects)

    def info(self):
        meta = super().info()
        meta["device"] = str(self.device)
        meta["model_dir"] = self.model_dir
        meta["limits"] = self.limits.public()
        if isinstance(self._datastore, DicomWebStudies):
            meta["dicomweb"] = {
                "store_heatmaps": self.dicomweb.store_heatmaps,
                "store_overlays": self.dicomweb.store_overlays,
                "timeout_s": self.dicomweb.dicomweb_timeout_s,
                "cache_mb": self.dicomweb.dicomweb_cache_mb,
                "modalities": list(self.dicomweb.dicomweb_modalities),
            }
        return meta

    def infer(self, request, datastore=None):
        """Check the model and the image/label the request points at, then run MONAI Label's infer.

        Raises :class:`RequestError`: 404 for an unknown model or image id, 503 for a model whose
        checkpoint is currently unavailable, a request stopped (time limit, disconnect,
        shutdown) or a DICOMweb store that does not answer, 400 for an image or label that is not
        a datastore id, a session image or an upload (see :mod:`monai_sal_app.lib.inputs`), or a
        ``store`` that cannot be done. With ``store`` (or ``--conf store_heatmaps true``), the map
        of a DICOMweb series also goes into its study; the answer's ``dicom`` says what the store did.
        """
        try:
            model = request.get("model")
            if model not in self._infers:
                raise RequestError(404, f"unknown model {model!r}; served: {', '.join(self._infers) or 'none'}")
            problem = self._infers[model].served.problem()
            if problem:
                raise RequestError(503, f"model {model!r} is unavailable: {problem}")
            datastore = datastore or self.datastore()
            from_store = isinstance(datastore, DicomWebStudies) and request.get("session") is None
            store = self._store_requested(request, from_store)
            checked = copy.deepcopy(request)
            series = checked["image"] if from_store and isinstance(checked.get("image"), str) else ""
            with datastore.hold(series) if series else contextlib.nullcontext():
                checked["image"], checked[IMAGE_NAME_KEY] = resolve_image(checked, datastore, self.sessions())
                from_store = from_store and series != "" and checked[IMAGE_NAME_KEY] != "uploaded file"
                label = resolve_label(checked)
                if label is not None:
                    checked["label"] = label
                result = super().infer(checked, datastore)
                if store and from_store:
                    result["params"]["dicom"] = self._store_heatmap(datastore, checked["image"], result)
            return result
        except Stopped as stopped:
            remove_uploads(request)
            logger.info("infer %s stopped: %s", request.get("model"), stopped)
            raise RequestError(503, f"stopped: {stopped}") from stopped
        except BaseException:
            remove_uploads(request)  # MONAI Label only cleans them up after a successful response
            raise
        finally:
            release_free_memory()


def _tokens_or_exit(conf: Mapping[str, str]) -> AccessTokens:
    """The server's access tokens, after checking where its launcher makes it listen; a bad tokens
    setting, or a reachable address without tokens, ends the start with one line on stderr (raised
    from here, uvicorn would print a traceback around it)."""
    try:
        tokens = AccessTokens.from_settings(conf)
        host = launcher_listen_host(sys.argv)
        if host is not None:
            check_listen_address(host, tokens)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(2)  # before the server has started anything
    return tokens
