"""A DICOMweb store (a PACS such as Orthanc or DCM4CHEE) as the server's datastore, and maps stored back into it.

``--studies http://host/dicom-web`` makes MONAI Label use its DICOMweb datastore. As it comes, that
datastore lists only CT series (its default search filter), waits on a store that does not answer
for as long as the operating system lets a connection wait, treats a half-downloaded series as
cached, keeps every series it ever downloaded on disk, converts series to NIfTI with its own reader
and, at start, downloads the dcmqi tools from the internet. :class:`DicomWebStudies` keeps its
API and changes that:

- it lists the series of every modality in ``modalities`` (default CT, MR, CR and DX), one
  search per modality;
- every request to the store has a time limit (``timeout_s`` to connect and to each read); a
  store that is down, slow or answers an error is a :class:`StoreUnavailable`, a 503 with a
  message naming the store and what happened, never a hang;
- a series is downloaded into a folder of its own under a temporary name and renamed when whole;
  its image is that folder, read by ``data.io.read_image`` (slices sorted along the normal; a
  multi-frame CT or MR, or a single CR or DX image), so the heatmap lies on the DICOM frames;
- the cache of downloaded series stays under ``cache_mb``: after each download the series used
  least recently are removed, never one that a running request holds (:meth:`DicomWebStudies.hold`).

:func:`store_saliency_objects` sends a map's DICOM objects (``data.dicom_objects``) to the store by
STOW-RS and says what the store did with them; a refusal is reported, not raised.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from cachetools import TTLCache, cached
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from pydicom.dataset import Dataset

from monai_sal_app.lib.errors import RequestError

__all__ = [
    "DEFAULT_MODALITIES",
    "DicomWebSettings",
    "DicomWebStudies",
    "StoreUnavailable",
    "store_saliency_objects",
]

logger = logging.getLogger(__name__)

DEFAULT_MODALITIES = ("CT", "MR", "CR", "DX")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class DicomWebSettings:
    """The ``--conf`` settings of a DICOMweb datastore (docs/SERVER.md, "With your PACS"):

    - ``store_heatmaps``: store every map of a DICOMweb series back into its study (a request's
      ``store`` overrides it);
    - ``store_overlays``: also store an RGB Secondary Capture overlay per slice;
    - ``dicomweb_timeout_s``: the time limit of each request to the store (connect, each read);
    - ``dicomweb_cache_mb``: the size bound of the downloaded series;
    - ``dicomweb_modalities``: the modalities listed, comma-separated.
    """

    store_heatmaps: bool = False
    store_overlays: bool = False
    dicomweb_timeout_s: float = 30.0
    dicomweb_cache_mb: float = 2048.0
    dicomweb_modalities: tuple[str, ...] = DEFAULT_MODALITIES

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> DicomWebSettings:
        """The settings in ``conf`` (strings), the defaults for the others; ``ValueError`` naming the
        setting for a value it cannot take."""
        values: dict[str, Any] = {}
        for name in ("store_heatmaps", "store_overlays"):
            raw = str(conf.get(name, "")).strip().lower()
            if raw:
                if raw not in _TRUE + _FALSE:
                    raise ValueError(f"--conf {name} must be true or false, got {conf[name]!r}")
                values[name] = raw in _TRUE
        for name in ("dicomweb_timeout_s", "dicomweb_cache_mb"):
            raw = conf.get(name)
            if raw is None or raw == "":
                continue
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if not 0 < value < float("inf"):
                raise ValueError(f"--conf {name} must be a positive number, got {raw!r}")
            values[name] = value
        if conf.get("dicomweb_modalities"):
            modalities = tuple(m.strip().upper() for m in conf["dicomweb_modalities"].split(",") if m.strip())
            if not modalities or not all(m.isalnum() for m in modalities):
                raise ValueError(
                    f"--conf dicomweb_modalities must be a comma list such as CT,MR, got {conf['dicomweb_modalities']!r}"
                )
            values["dicomweb_modalities"] = modalities
        return cls(**values)


class StoreUnavailable(RequestError):
    """The DICOMweb store did not answer in time, refused the connection or answered an error: a 503."""

    def __init__(self, url: str, error: BaseException) -> None:
        if isinstance(error, requests.exceptions.Timeout):
            what = f"did not answer in time ({error.__class__.__name__})"
        elif isinstance(error, requests.exceptions.ConnectionError):
            what = "cannot be reached (connection refused or lost)"
        elif isinstance(error, requests.exceptions.HTTPError) and error.response is not None:
            what = f"answered {error.response.status_code} {error.response.reason}"
        else:
            what = f"failed: {error}"
        super().__init__(503, f"the DICOMweb store {url} {what}; try again when it is back")


class _TimedSession(requests.Session):
    """A requests session whose every request has a time limit (connect, and each read)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", (self.timeout_s, self.timeout_s))
        return super().request(method, url, **kwargs)


class _Client(DICOMwebClientX):
    """MONAI Label's DICOMweb client with time limits, raising :class:`StoreUnavailable` for failures."""

    def _http_get(self, *args, **kwargs):
        try:
            return super()._http_get(*args, **kwargs)
        except requests.exceptions.RequestException as error:
            raise StoreUnavailable(self.base_url, error) from error

    def _http_post(self, *args, **kwargs):
        try:
            return super()._http_post(*args, **kwargs)
        except requests.exceptions.RequestException as error:
            raise StoreUnavailable(self.base_url, error) from error


class DicomWebStudies(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore listing several modalities, with time limits and a bounded cache.

    ``url``: the store's DICOMweb root (e.g. ``http://127.0.0.1:8042/dicom-web``); ``cache_dir``:
    the folder of downloaded series; ``cache_mb``: its size bound in MiB; ``timeout_s``: the time
    limit of each request to the store; ``modalities``: the series listed (module docstring).
    """

    def __init__(
        self,
        url: str,
        cache_dir: str | os.PathLike,
        cache_mb: float,
        timeout_s: float,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
    ) -> None:
        client = _Client(
            url=url.rstrip("/"),
            session=_TimedSession(timeout_s),
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        client.set_http_retry_params(retry=False)  # its retries would wait out the time limit several times over
        self.modalities = tuple(modalities)
        self.cache_bytes = int(cache_mb * 2**20)
        self.timeout_s = timeout_s
        self._held: Counter[str] = Counter()
        self._lock = threading.RLock()
        super().__init__(client, {"Modality": self.modalities[0]}, str(cache_dir), False, convert_to_nifti=False)
        self.series_dir = Path(self._datastore.image_path())

    @property
    def client(self) -> _Client:
        """The DICOMweb client (time limits, :class:`StoreUnavailable` on failures)."""
        return self._client

    @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def list_images(self) -> list[str]:
        """The SeriesInstanceUIDs of every series of the listed modalities (one search each)."""
        series: dict[str, None] = {}
        for modality in self.modalities:
            for found in self._client.search_for_series(search_filters={"Modality": modality}):
                series[str(Dataset.from_json(found)["SeriesInstanceUID"].value)] = None
        return list(series)

    def status(self) -> dict[str, Any]:
        """MONAI Label's datastore status, or ``{"error": ...}`` while the store is unavailable (so
        that ``/info`` still answers)."""
        try:
            return {**super().status(), "modalities": list(self.modalities)}
        except StoreUnavailable as error:
            return {"total": None, "error": str(error.detail), "modalities": list(self.modalities)}

    def get_image_uri(self, image_id: str) -> str:
        """The folder of series ``image_id`` in the cache, downloaded whole first when missing;
        ``""`` for an id that is not a listed series."""
        if not isinstance(image_id, str) or not _UID.match(image_id) or image_id not in self.list_images():
            return ""
        folder = self.series_dir / image_id
        with self._lock:
            self._held[image_id] += 1  # not evicted while it downloads
        try:
            if not folder.is_dir():
                self._download(image_id, folder)
            os.utime(folder)  # most recently used
        finally:
            with self._lock:
                self._held[image_id] -= 1
        self.trim_cache()
        return str(folder)

    def _download(self, series_uid: str, folder: Path) -> None:
        partial = folder.with_name(f".{folder.name}.{threading.get_ident()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            dicom_web_download_series(None, series_uid, str(partial), self._client, False)
            os.replace(partial, folder)
        except requests.exceptions.RequestException as error:
            raise StoreUnavailable(self._client.base_url, error) from error
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    @contextmanager
    def hold(self, image_id: str) -> Iterator[None]:
        """While the block runs, series ``image_id`` stays in the cache."""
        with self._lock:
            self._held[image_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[image_id] -= 1
            self.trim_cache()

    def trim_cache(self) -> list[str]:
        """Remove the least recently used series until the cache is within ``cache_mb`` (a series a
        request holds stays); returns the removed series."""
        removed = []
        with self._lock:
            folders = [f for f in self.series_dir.iterdir() if f.is_dir() and _UID.match(f.name)]
            sizes = {f: sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) for f in folders}
            total = sum(sizes.values())
            for folder in sorted(folders, key=lambda f: f.stat().st_mtime):
                if total <= self.cache_bytes:
                    break
                if self._held[folder.name] > 0:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder]
                removed.append(folder.name)
        if removed:
            logger.info("DICOMweb cache: removed %d series to stay within %d bytes", len(removed), self.cache_bytes)
        return removed


def store_saliency_objects(client: _Client, objects: Sequence[Dataset]) -> dict[str, Any]:
    """Send ``objects`` (of one study) to the store by STOW-RS into their study; returns what the store did, for an infer answer:
    ``{"stored": bool, "objects": [{"sop_class_uid", "sop_instance_uid", "series_instance_uid"}],
    "study_instance_uid", "seconds"}`` and, when the store refused all or some of them, ``"why"``."""
    start = time.perf_counter()
    listed = [
        {
            "modality": str(ds.Modality),
            "sop_class_uid": str(ds.SOPClassUID),
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "series_instance_uid": str(ds.SeriesInstanceUID),
        }
        for ds in objects
    ]
    answer: dict[str, Any] = {
        "stored": False,
        "objects": listed,
        "study_instance_uid": str(objects[0].StudyInstanceUID),
    }
    try:
        response = client.store_instances(list(objects), study_instance_uid=answer["study_instance_uid"])
    except StoreUnavailable as error:
        answer["why"] = f"the store refused the objects: {error.detail}"
    else:
        failed = [str(item.get("ReferencedSOPInstanceUID", "")) for item in response.get("FailedSOPSequence", [])]
        stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in response.get("ReferencedSOPSequence", [])}
        missing = [o["sop_instance_uid"] for o in listed if o["sop_instance_uid"] not in stored]
        if failed or missing:
            answer["why"] = f"the store refused {len(set(failed) | set(missing))} of {len(listed)} objects"
        else:
            answer["stored"] = True
    answer["seconds"] = time.perf_counter() - start
    if not answer["stored"]:
        logger.warning("saliency objects not stored: %s", answer["why"])
    return answer
