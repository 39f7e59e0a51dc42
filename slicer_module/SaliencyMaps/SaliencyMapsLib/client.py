"""The REST calls of the SaliencyMaps module to a monai-sal MONAI Label server.

Standard library only (``urllib``, ``http.client``, ``json``, ``email``), so it runs in 3D Slicer's
Python as it is. Every failure becomes a :class:`ServerError` whose message can be shown to the
user as it is: server down or unreachable, no answer in time, a refusal with the server's own
message (4xx/5xx), or an answer that is not what a monai-sal server sends.

A request given a :class:`Cancellation` can be aborted from another thread while it waits: its
connection is shut down, which the server notices and stops the work, and the request raises
:class:`Cancelled`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import mimetypes
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

__all__ = ["Cancellation", "Cancelled", "ExplainResult", "ServerClient", "ServerError", "saliency_models"]


class ServerError(Exception):
    """A request that did not give a usable answer. ``status``: the HTTP status, or None when the
    server was not reached or did not answer in time."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Cancelled(ServerError):
    """The request was cancelled by the user (its connection closed)."""

    def __init__(self) -> None:
        super().__init__("cancelled")


class Cancellation:
    """Shared by the thread that makes requests and the one that may cancel them: :meth:`cancel`
    shuts down the socket of every connection opened under it (a request waiting for its answer,
    or reading it, returns at once) and makes any later connection fail with :class:`Cancelled`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._sockets: list[socket.socket] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for opened in self._sockets:  # kept, not the connection: urllib lets go of it before the body is read
                with contextlib.suppress(OSError):  # already closed
                    opened.shutdown(socket.SHUT_RDWR)

    def opened(self, connection: http.client.HTTPConnection) -> None:
        """Called by a connection once it is open: track its socket, or close it when already cancelled."""
        with self._lock:
            if self._cancelled:
                connection.close()
                raise Cancelled()
            self._sockets.append(connection.sock)

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener (proxies and HTTPS as urllib's default one) whose connections report here."""
        cancellation = self

        class Tracked(urllib.request.HTTPHandler):
            def do_open(self, http_class, request, **kwargs):
                return super().do_open(_tracked_connection(http_class, cancellation), request, **kwargs)

        class TrackedTLS(urllib.request.HTTPSHandler):
            def do_open(self, http_class, request, **kwargs):
                return super().do_open(_tracked_connection(http_class, cancellation), request, **kwargs)

        return urllib.request.build_opener(Tracked, TrackedTLS)


def _tracked_connection(http_class, cancellation: Cancellation):
    class TrackedConnection(http_class):
        def connect(self) -> None:
            super().connect()
            cancellation.opened(self)

    return TrackedConnection


@dataclass
class ExplainResult:
    """One infer answer: the JSON part (``result``: probabilities, prediction, target, method,
    params, trust, metrics when a label was sent, ...) and the heatmap NIfTI bytes."""

    result: dict
    heatmap: bytes = field(repr=False)

    @property
    def probabilities(self) -> dict[str, float]:
        return dict(self.result.get("probabilities", {}))

    @property
    def method(self) -> str:
        return str(self.result.get("method", ""))

    @property
    def target_label(self) -> str:
        return str(self.result.get("target", {}).get("label", ""))


def saliency_models(info: dict) -> dict[str, dict]:
    """The models of a ``/info`` answer that serve saliency maps (those that list ``methods``),
    name -> their entry; MONAI Label's other models (segmentation, scoring) are left out."""
    models = info.get("models", {})
    return {name: entry for name, entry in models.items() if isinstance(entry, dict) and "methods" in entry}


class ServerClient:
    """``ServerClient("http://127.0.0.1:8000", timeout=60, token="")``; ``timeout`` in seconds per
    request; ``token``: the server's reader (or operator) token, sent as ``Authorization: Bearer``
    with every request, for a server that asks for one (never stored by the client)."""

    def __init__(self, url: str, timeout: float = 60.0, token: str = "") -> None:
        url = (url or "").strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ServerError(f"server URL must look like http://host:port, got {url!r}")
        if timeout <= 0:
            raise ServerError(f"timeout must be positive, got {timeout}")
        self.url = url
        self.timeout = float(timeout)
        self._headers = {"Authorization": f"Bearer {token.strip()}"} if token and token.strip() else {}

    def info(self, cancellation: Cancellation | None = None) -> dict:
        """``GET /info/``: the app's models (labels, dimension, methods with defaults and bounds,
        device, trust card) and limits."""
        _, body = self._request("GET", "/info/", cancellation=cancellation)
        return self._json(body, "/info/")

    def explain(
        self,
        model: str,
        image: str | Path,
        method: str,
        params: dict | None = None,
        target: int | str | None = None,
        label: str | Path | None = None,
        cancellation: Cancellation | None = None,
    ) -> ExplainResult:
        """``POST /infer/<model>``: upload ``image`` (a file the server reads: NIfTI, NRRD, PNG,
        JPEG, DICOM) and optionally ``label`` (a mask on the image's grid, to be scored by the
        server); returns the answer's JSON and heatmap. :class:`Cancelled` when ``cancellation``
        is cancelled before the answer is read."""
        request = {"method": method, **(params or {})}
        if target is not None:
            request["target"] = target
        fields = {"params": json.dumps(request)}
        files = {"file": Path(image)}
        if label is not None:
            files["label"] = Path(label)
        body, content_type = _multipart(fields, files)
        query = urllib.parse.urlencode({"image": "", "output": "all"})
        path = f"/infer/{urllib.parse.quote(model, safe='')}?{query}"
        headers, answer = self._request("POST", path, body, {"Content-Type": content_type}, cancellation)
        return _explain_result(headers.get("Content-Type", ""), answer)

    def _request(
        self,
        verb: str,
        path: str,
        body: bytes | None = None,
        headers: dict | None = None,
        cancellation: Cancellation | None = None,
    ):
        cancellation = cancellation or Cancellation()
        headers = {**self._headers, **(headers or {})}
        request = urllib.request.Request(self.url + path, data=body, method=verb, headers=headers)
        try:
            with cancellation.opener().open(request, timeout=self.timeout) as response:
                answer = response.headers, response.read()
        except Exception as error:
            if cancellation.cancelled:  # whatever the shut-down connection made the request raise
                raise Cancelled() from None
            raise self._server_error(error) from None
        if cancellation.cancelled:
            raise Cancelled()
        return answer

    def _server_error(self, error: Exception) -> Exception:
        """The :class:`ServerError` that says what went wrong with a request (``error`` itself when
        it is not about the request)."""
        if isinstance(error, urllib.error.HTTPError):
            message = f"the server refused the request ({error.code}): {_server_message(error.read())}"
            return ServerError(message, error.code)
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, (TimeoutError, socket.timeout)):  # distinct classes in Python 3.9
            return ServerError(f"no answer from {self.url} within {self.timeout:g} s")
        if isinstance(error, urllib.error.URLError):
            return ServerError(f"cannot reach the server at {self.url}: {reason}")
        if isinstance(error, (ConnectionError, OSError, http.client.HTTPException)):
            return ServerError(f"the connection to {self.url} failed: {error}")
        return error

    @staticmethod
    def _json(body: bytes, what: str) -> dict:
        try:
            answer = json.loads(body)
        except ValueError:
            raise ServerError(f"{what}: the answer is not JSON; is this a monai-sal server?") from None
        if not isinstance(answer, dict):
            raise ServerError(f"{what}: unexpected answer; is this a monai-sal server?")
        return answer


def _server_message(body: bytes) -> str:
    """The ``detail`` of a FastAPI error answer, else the body's text (shortened)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    return detail[:500] or "no message"


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    """A multipart/form-data body of text ``fields`` and uploaded ``files``; (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        parts.append(value.encode() + b"\r\n")
    for name, path in files.items():
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
        parts.append(f"{head}Content-Type: {kind}\r\n\r\n".encode())
        try:
            parts.append(path.read_bytes() + b"\r\n")
        except OSError as error:
            raise ServerError(f"cannot read {path}: {error.strerror or error}") from None
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _explain_result(content_type: str, body: bytes) -> ExplainResult:
    """The JSON (part ``params``) and the heatmap (part ``image``) of a multipart infer answer."""
    if not content_type.startswith("multipart/"):
        raise ServerError("the infer answer has no heatmap; is this a monai-sal server?")
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    result, heatmap = None, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "params":
            result = json.loads(part.get_payload(decode=True))
        elif name == "image":
            heatmap = part.get_payload(decode=True)
    if result is None or heatmap is None:
        raise ServerError("the infer answer lacks its JSON or its heatmap; is this a monai-sal server?")
    return ExplainResult(result, heatmap)
