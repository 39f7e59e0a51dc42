"""4xx answers with a message naming the problem, instead of MONAI Label's blanket 500.

The stock MONAI Label 0.8.5 server registers no exception handler: an unknown model, a request
without input, a ``params`` field that is not JSON or any exception raised by a task is a 500.

- :class:`RequestError` is a ``fastapi.HTTPException``: raised anywhere while a request is served
  (``MonaiSalApp.infer``, an infer task, a train task run with ``run_sync=true``) it becomes that
  status and ``{"detail": message}`` through FastAPI's default handler, with nothing to register.
- :func:`install_http_errors` adds handlers for what fails in MONAI Label's own endpoint code,
  before our app is reached: ``params`` not JSON (400), an infer request with neither image id,
  session nor file (the stock 500, answered 400), ``MONAILabelException(INVALID_INPUT)`` (400) and
  MONAI Label's image/label-not-found exceptions (404).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["RequestError", "install_http_errors"]

logger = logging.getLogger(__name__)

_NO_INPUT_DETAIL = "Neither Image nor File"  # start of the stock infer endpoint's 500 detail


class RequestError(HTTPException):
    """A request the server cannot serve as sent: ``status_code`` (4xx, or 503) and a message for the user."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code=status_code, detail=message)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


async def _invalid_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse({"detail": f"the 'params' form field is not valid JSON ({exc})"}, status_code=400)


async def _monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        return JSONResponse({"detail": exc.msg}, status_code=404)
    if exc.error == MONAILabelError.INVALID_INPUT:
        return JSONResponse({"detail": exc.msg}, status_code=400)
    logger.error("MONAI Label error on %s: %s %s", request.url.path, exc.error, exc.msg)
    return JSONResponse({"detail": f"{exc.error.value}: {exc.msg}"}, status_code=500)


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 500 and str(exc.detail).startswith(_NO_INPUT_DETAIL):
        return JSONResponse(
            {
                "detail": "no input image: send ?image=<datastore id>, ?session_id=<id from PUT /session/> or a 'file' upload"
            },
            status_code=400,
        )
    return await http_exception_handler(request, exc)


def install_http_errors(app: FastAPI) -> None:
    """Register the handlers above on ``app`` (idempotent); works on a server that is already running.

    Starlette copies the handlers into its middleware stack when the stack is built (at the first
    ASGI call, i.e. the lifespan startup, which is when MONAI Label loads our ``main.py``); the stack
    is dropped here so that the next request rebuilds it with the new handlers.
    """
    if getattr(app.state, "monai_sal_http_errors", False):
        return
    app.add_exception_handler(json.JSONDecodeError, _invalid_json)
    app.add_exception_handler(MONAILabelException, _monailabel_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.state.monai_sal_http_errors = True
    app.middleware_stack = None
    logger.info("monai-sal HTTP error handlers installed")
