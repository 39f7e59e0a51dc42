"""What an infer request may point at, and what its ``params`` may say.

MONAI Label merges the request's ``params`` JSON into the request itself, after the image and
label it set, and treats any ``image`` that exists as a path as a file to read. Unchecked, a
client could read any file the server can (``?image=../../etc/passwd`` or ``params={"image":
"/etc/passwd"}``). :func:`resolve_image` accepts only

- a datastore id (a file name without folder, looked up in the studies folder),
- the image of a session (a file inside the session store, set by MONAI Label from ``session_id``),
- a file the infer endpoint itself saved from the ``file`` upload (``tmpXXXXXXXX<suffix>`` directly
  in the system temp folder),

and :func:`resolve_label` only the endpoint's own save of the ``label`` upload.
:class:`CheckedSessions` refuses session ids that are not plain names: the stock ``Sessions``
joins the id to its folder, reads ``<id>/meta.info`` and deletes ``<id>`` if its image is gone.
:func:`parse_explain_request` reads ``method``, ``target`` and the method's options;
:func:`read_infer_params` reads the parameters from either form MONAI Label's endpoint is sent.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from monailabel.utils.sessions import Sessions
from starlette.requests import Request

from monai_sal_app.lib.errors import RequestError
from monai_sal_app.saliency import available_methods, get_method
from monai_sal_app.saliency.core import NO_HOOKS

__all__ = [
    "DEFAULT_METHOD",
    "FALLBACK_METHOD",
    "IMAGE_NAME_KEY",
    "MONAILABEL_REQUEST_KEYS",
    "STORE_KEY",
    "CheckedSessions",
    "default_method",
    "parse_explain_request",
    "parse_target",
    "read_infer_params",
    "remove_uploads",
    "resolve_image",
    "resolve_label",
]

DEFAULT_METHOD = "gradcam"
FALLBACK_METHOD = "gradient"  # the default for a model Grad-CAM cannot explain (TorchScript)


def default_method(methods: dict) -> str:
    """The method a request without one gets: :data:`DEFAULT_METHOD` where the model offers it,
    else :data:`FALLBACK_METHOD`."""
    return DEFAULT_METHOD if DEFAULT_METHOD in methods else FALLBACK_METHOD


# Keys MONAI Label itself (endpoint, app, client, Slicer plugin) puts into an infer request.
MONAILABEL_REQUEST_KEYS = frozenset(
    {
        "model",
        "image",
        "image_path",
        "label",
        "session",
        "description",
        "device",
        "save_label",
        "label_tag",
        "client_id",
        "timeout",
        "logging",
        "result_extension",
        "result_dtype",
        "result_compress",
        "label_info",
        "restore_label_idx",
        "largest_cc",
        "gpus",
        "output",
    }
)

# Set by MonaiSalApp.infer: how the image is named in messages (never a server path).
IMAGE_NAME_KEY = "image_name"

# Read by MonaiSalApp.infer: store the map into the image's study in the DICOMweb store (true/false).
STORE_KEY = "store"

# NamedTemporaryFile(suffix=...).name as used by MONAI Label's infer endpoint for uploads.
_UPLOAD_NAME = re.compile(r"^tmp[a-z0-9_]{8}[^/\\]*$")


_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # uuid1 strings, as Sessions.add_session makes them


class CheckedSessions(Sessions):
    """MONAI Label's session store, where an id that is not a plain name (``..``, ``a/b``) is no session."""

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            return None
        return super().get_session(session_id, update_ts=update_ts, fetch_cache=fetch_cache)

    def remove_session(self, session_id: str):
        if isinstance(session_id, str) and _SESSION_ID.match(session_id):
            super().remove_session(session_id)


INFER_QUERY = ("image", "session_id", "output")  # what POST /infer/{model} reads from its query
INFER_FORM = ("params", "file", "label")  # ... and from its form
_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
_EXPECTED = (
    "send the parameters as the form field 'params' (multipart/form-data, with the optional files "
    "'file' and 'label') or as a JSON object body (application/json)"
)


async def read_infer_params(request: Request, params_field: str) -> str:
    """The JSON text of an infer request's parameters: the form field ``params`` (MONAI Label's
    contract, ``params_field`` as FastAPI read it) or, for ``Content-Type: application/json``, the
    body, which must be a JSON object. :class:`RequestError` naming what was expected for an
    unknown query parameter or form field (400), a JSON body that is not an object (400) and a
    body of any other type (415): nothing a client sends is silently ignored."""
    unknown = sorted(set(request.query_params) - set(INFER_QUERY))
    if unknown:
        raise RequestError(
            400,
            f"unknown query parameter(s) {unknown}: the query takes {', '.join(INFER_QUERY)}; "
            f"the method's parameters go in the body: {_EXPECTED}",
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            value = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the JSON body is not valid JSON ({error})") from None
        if not isinstance(value, dict):
            raise RequestError(
                400, f'the JSON body must be an object such as {{"method": "gradient"}}, got {value!r:.60}'
            )
        return json.dumps(value)
    if content_type in _FORMS:
        unknown = sorted(set((await request.form()).keys()) - set(INFER_FORM))
        if unknown:
            raise RequestError(400, f"unknown form field(s) {unknown}: {_EXPECTED}")
        return params_field
    if not content_type and not await request.body():
        return params_field  # no body: the query names the image, the defaults apply
    raise RequestError(415, f"cannot read a body of type {content_type or 'unknown'!r}: {_EXPECTED}")


def remove_uploads(request: dict) -> None:
    """Delete the request's uploaded image and label files.

    MONAI Label deletes them in a background task that only runs when the endpoint returns a
    response; a request that fails with an exception would leave them in the temp folder.
    """
    for key in ("image", "label"):
        value = request.get(key)
        if isinstance(value, str) and _is_upload(value):
            Path(os.path.realpath(value)).unlink(missing_ok=True)


def _is_upload(path: str) -> bool:
    real = os.path.realpath(path)
    return (
        os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
        and _UPLOAD_NAME.match(os.path.basename(real)) is not None
        and os.path.isfile(real)
    )


def _inside(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root and real != root


def resolve_image(request: dict, datastore, sessions) -> tuple[str, str]:
    """``(absolute path, display name)`` of the request's image; :class:`RequestError` otherwise.

    ``datastore``: MONAI Label datastore (``get_image_uri``: a file, or for a DICOMweb datastore the
    folder of the downloaded series); ``sessions``: its ``Sessions`` or None.
    The display name (datastore id, ``session``, ``uploaded file``) replaces server paths in messages.
    """
    image = request.get("image")
    if request.get("session") is not None:
        store = getattr(sessions, "store_path", None)
        if not isinstance(image, str) or not store or not _inside(image, store) or not os.path.isfile(image):
            raise RequestError(
                400, "the session holds no single image file in the session store (upload one file per session)"
            )
        return os.path.realpath(image), "session image"
    if not isinstance(image, str):
        raise RequestError(400, f"'image' must be a datastore id (a string), got {type(image).__name__}")
    if not image:
        raise RequestError(404, "no input image: the image id is empty, or the session_id is unknown or expired")
    if _is_upload(image):
        return os.path.realpath(image), "uploaded file"
    if "/" in image or "\\" in image or image in (".", "..") or "\x00" in image:
        raise RequestError(
            400,
            f"image {image!r} is not a datastore id: ids are file names without folders (upload a file with the 'file' field instead)",
        )
    uri = datastore.get_image_uri(image)
    if not uri or not os.path.exists(uri):
        raise RequestError(404, f"image id {image!r} not found in the datastore")
    return uri, f"image {image!r}"  # a file, or a folder holding one DICOM series


def resolve_label(request: dict) -> str | None:
    """Path of the mask uploaded in the ``label`` form field, or None when there is none."""
    label = request.get("label")
    if label is None:
        return None
    if not isinstance(label, str) or not _is_upload(label):
        raise RequestError(400, "a mask must be uploaded as the 'label' form field (a file), not named in params")
    return os.path.realpath(label)


def parse_target(value: Any, labels: list[str]) -> int | None:
    """``target`` as a class index: None, an int in range, a label name, or a string of digits."""
    if value is None:
        return None
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        if not value.strip().isdigit():
            raise RequestError(400, f"target {value!r} is neither a class index nor one of the labels {labels}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"target must be a class index (int) or a label name, got {value!r}")
    if not 0 <= value < len(labels):
        raise RequestError(400, f"target {value} out of range: the model has {len(labels)} classes {labels}")
    return value


def parse_explain_request(
    request: dict, labels: list[str], task_config: dict, methods: dict[str, dict]
) -> tuple[str, int | None, dict[str, Any]]:
    """``(method, target, method options)`` from an infer request's top-level keys.

    ``methods``: the methods that can explain the model (``available_methods(model)``); a method
    the model cannot use is refused like an unknown one, naming the ones it can.
    The options are the keys named like the chosen method's parameters;
    any other key that is neither ours (``method``, ``target``, ``store``), MONAI Label's
    (:data:`MONAILABEL_REQUEST_KEYS`) nor the task's config gives a 400 naming it.
    """
    method = request.get("method", default_method(methods))
    if not isinstance(method, str) or method not in methods:
        available = f"available for this model: {', '.join(methods)}"
        if isinstance(method, str) and method in available_methods():
            spec = get_method(method)
            if spec.requires:
                needs = spec.requires[1]
            elif spec.explainer:
                needs = f"it needs a {spec.explainer} trained for its weights beside it"
            else:  # the one other reason a method is not offered
                needs = NO_HOOKS
            raise RequestError(400, f"saliency method {method!r} cannot explain this model: {needs}; {available}")
        raise RequestError(400, f"unknown saliency method {method!r}; {available}")
    takes = methods[method]["defaults"]
    if "explainer" in request:
        raise RequestError(400, "'explainer' is not a request parameter: the server uses the one beside the model")
    target = parse_target(request.get("target"), labels)
    options = {key: value for key, value in request.items() if key in takes}
    unknown = sorted(
        set(request)
        - set(takes)
        - {"method", "target", STORE_KEY, IMAGE_NAME_KEY}
        - MONAILABEL_REQUEST_KEYS
        - set(task_config)
    )
    if unknown:
        raise RequestError(
            400,
            f"unknown parameter(s) {unknown}: method {method!r} takes {sorted(takes)}, plus 'method', 'target' "
            "and 'store'",
        )
    return method, target, options
