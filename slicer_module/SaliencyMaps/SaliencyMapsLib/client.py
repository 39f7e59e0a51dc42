"""The REST calls of the SaliencyMaps module to a monai-sal MONAI Label server.

Standard library only (``urllib``, ``json``, ``email``), so it runs in 3D Slicer's Python as it
is. Every failure becomes a :class:`ServerError` whose message can be shown to the user as it is:
server down or unreachable, no answer in time, a refusal with the server's own message (4xx/5xx),
or an answer that is not what a monai-sal server sends.
"""

from __future__ import annotations

import json
import mimetypes
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

__all__ = ["ExplainResult", "ServerClient", "ServerError", "saliency_models"]


class ServerError(Exception):
    """A request that did not give a usable answer. ``status``: the HTTP status, or None when the
    server was not reached or did not answer in time."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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
    """``ServerClient("http://127.0.0.1:8000", timeout=60)``; ``timeout`` in seconds per request."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        url = (url or "").strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ServerError(f"server URL must look like http://host:port, got {url!r}")
        if timeout <= 0:
            raise ServerError(f"timeout must be positive, got {timeout}")
        self.url = url
        self.timeout = float(timeout)

    def info(self) -> dict:
        """``GET /info/``: the app's models (labels, dimension, methods with defaults and bounds,
        device, trust card) and limits."""
        _, body = self._request("GET", "/info/")
        return self._json(body, "/info/")

    def explain(
        self,
        model: str,
        image: str | Path,
        method: str,
        params: dict | None = None,
        target: int | str | None = None,
        label: str | Path | None = None,
    ) -> ExplainResult:
        """``POST /infer/<model>``: upload ``image`` (a file the server reads: NIfTI, NRRD, PNG,
        JPEG, DICOM) and optionally ``label`` (a mask on the image's grid, to be scored by the
        server); returns the answer's JSON and heatmap."""
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
        headers, answer = self._request("POST", path, body, {"Content-Type": content_type})
        return _explain_result(headers.get("Content-Type", ""), answer)

    def _request(self, verb: str, path: str, body: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(self.url + path, data=body, method=verb, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.headers, response.read()
        except urllib.error.HTTPError as error:
            raise ServerError(
                f"the server refused the request ({error.code}): {_server_message(error.read())}", error.code
            ) from None
        except (TimeoutError, socket.timeout):  # noqa: UP041 (distinct classes in Python 3.9, Slicer 5.6)
            raise ServerError(f"no answer from {self.url} within {self.timeout:g} s") from None
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise ServerError(f"no answer from {self.url} within {self.timeout:g} s") from None
            raise ServerError(f"cannot reach the server at {self.url}: {reason}") from None
        except (ConnectionError, OSError) as error:
            raise ServerError(f"the connection to {self.url} failed: {error}") from None

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
