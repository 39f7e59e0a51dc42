"""What one request may cost the server, and how a running request is stopped.

Settings (``--conf key value``, defaults in :data:`DEFAULT_LIMITS`; docs/SERVER.md lists them):

- ``max_request_cost``: the largest estimated cost of one infer request, network passes x voxels
  of the network input (``saliency.core.check_request``); above it, 400 saying what to lower.
  Every method parameter that multiplies work also has a bound of its own (shown in ``/info``).
- ``max_upload_mb``: the largest request body; above it, 413 before the upload is read
  (from ``Content-Length``), or as soon as a streamed body passes it.
- ``max_pixels`` / ``max_voxels``: the largest 2D / 3D image, checked from the file's header
  before any pixel is decoded (``data.io.read_image(max_voxels=...)``); above it, 413.
- ``request_timeout_s``: the longest an infer request may run; the method stops at its next
  chunk of network passes and the answer is 503 with the reason.

:func:`install_limits` puts them on the running FastAPI app: the upload limit as an ASGI
middleware, and MONAI Label's ``POST /infer/{model}`` endpoint replaced by one that runs the same
code (``monailabel.endpoints.infer.run_inference``) in a worker thread instead of on the event
loop, so that ``/info``, ``/datastore`` and other models' requests answer while it runs. The
worker thread runs inside ``saliency.core.stop_when``: the method stops at its next chunk when the
time limit passes, when the client disconnects, or when the server is told to stop (SIGTERM or
SIGINT: :func:`stop_requests_on_shutdown`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, fields

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from starlette.concurrency import run_in_threadpool

from monai_sal_app.lib.background import on_shutdown_signal
from monai_sal_app.lib.inputs import read_infer_params
from monai_sal_app.saliency.core import stop_when

__all__ = ["DEFAULT_LIMITS", "SHUTTING_DOWN", "ServerLimits", "install_limits", "stop_requests_on_shutdown"]

logger = logging.getLogger(__name__)

SHUTTING_DOWN = threading.Event()  # set on SIGTERM/SIGINT: running requests stop at their next chunk
_DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerLimits:
    """The server's limits (module docstring); ``from_conf`` reads them from ``--conf`` strings."""

    max_request_cost: float = 1e9
    max_upload_mb: float = 512.0
    max_pixels: int = 8192**2
    max_voxels: int = 512**3
    request_timeout_s: float = 600.0

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> ServerLimits:
        """The limits in ``conf`` (strings, e.g. ``"1e9"``), the defaults for the others;
        ``ValueError`` naming the setting for a value that is not a positive number."""
        values = {}
        for item in fields(cls):
            raw = conf.get(item.name)
            if raw is None or raw == "":
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = float("nan")
            if not value > 0 or value == float("inf"):
                raise ValueError(f"--conf {item.name} must be a positive number, got {raw!r}")
            values[item.name] = int(value) if item.type == "int" else value
        return cls(**values)

    @property
    def max_voxels_by_dims(self) -> dict[int, int]:
        """``{2: max_pixels, 3: max_voxels}``, as ``data.io.read_image`` takes it."""
        return {2: self.max_pixels, 3: self.max_voxels}

    def public(self) -> dict:
        """The limits as ``/info`` shows them."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


DEFAULT_LIMITS = ServerLimits()


class UploadLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` is answered 413 unread (by its
    ``Content-Length``) or, for a streamed body, as soon as it passes the limit."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    def _too_large(self) -> JSONResponse:
        return JSONResponse(
            {
                "detail": f"request body larger than this server's limit of {self.max_bytes / 2**20:g} MB (max_upload_mb)"
            },
            status_code=413,
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def counted_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped below
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._too_large()(scope, receive, send)


_FILE = File(None)  # MONAI Label's endpoint parameters, as it declares them (one object each)
_LABEL = File(None)
_USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))


async def _infer_off_the_loop(
    request: Request,
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = _FILE,
    label: UploadFile = _LABEL,
    output: ResultType | None = None,
    user: User = _USER,
):
    """MONAI Label's infer endpoint, run in a worker thread under a stop check (module docstring),
    its parameters read from the form field ``params`` or a JSON body (``inputs.read_infer_params``)."""
    limits: ServerLimits = request.app.state.monai_sal_limits
    deadline = time.monotonic() + limits.request_timeout_s
    disconnected = threading.Event()

    def stop_reason() -> str | None:
        if SHUTTING_DOWN.is_set():
            return "the server is shutting down"
        if disconnected.is_set():
            return "the client disconnected"
        if time.monotonic() > deadline:
            return (
                f"the request ran longer than this server's limit of {limits.request_timeout_s:g} s "
                "(request_timeout_s); ask for less work (fewer steps or samples, or a cheaper method)"
            )
        return None

    params = await read_infer_params(request, params)

    def run():
        with stop_when(stop_reason):
            return run_inference(background_tasks, model, image, session_id, params, file, label, output)

    work = asyncio.ensure_future(run_in_threadpool(run))
    while not work.done():
        await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S)
        if not work.done() and not disconnected.is_set() and await request.is_disconnected():
            logger.info("infer %s: the client disconnected; stopping its work", model)
            disconnected.set()
    return work.result()


def _route_infer_off_the_loop(app: FastAPI) -> None:
    """Put :func:`_infer_off_the_loop` first in the routing table: it answers ``POST /infer/{model}``
    before MONAI Label's own route (left in place, never reached)."""
    path = f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}"
    route = APIRoute(
        path, _infer_off_the_loop, methods=["POST"], summary="Run Inference for supported model", tags=["Infer"]
    )
    app.router.routes.insert(0, route)
    app.openapi_schema = None


def install_limits(app: FastAPI, limits: ServerLimits) -> None:
    """Put ``limits`` on the running app (idempotent): the upload limit, and the infer endpoint that
    runs off the event loop with its time limit (module docstring)."""
    app.state.monai_sal_limits = limits
    if getattr(app.state, "monai_sal_limits_installed", False):
        return
    _route_infer_off_the_loop(app)
    app.middleware_stack = None  # rebuilt at the next request, with the middleware below
    app.add_middleware(UploadLimit, max_bytes=int(limits.max_upload_mb * 2**20))
    app.state.monai_sal_limits_installed = True
    logger.info("monai-sal limits: %s", limits.public())


def stop_requests_on_shutdown() -> None:
    """On SIGTERM or SIGINT, set :data:`SHUTTING_DOWN` (running requests stop at their next chunk),
    then let the server stop (``background.on_shutdown_signal``)."""
    on_shutdown_signal(SHUTTING_DOWN.set)
