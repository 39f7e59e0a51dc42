"""The pages the server returns load nothing from the network.

MONAI Label 0.8.5's own pages fetch their scripts and styles from public CDNs when a browser opens
them: the API explorer at ``/`` and ``/docs`` (Swagger UI and ReDoc), the ``/logs/`` viewer
(jQuery and Ace) and the bundled OHIF viewer at ``/ohif/``. A browser on a hospital network
would reach out to those hosts, or show nothing where they are blocked. :func:`install_pages`
replaces them:

- ``/``: a page of our own, with no script or style from anywhere: the server, its models and the
  addresses of its API (``/info/``, ``/openapi.json``, the docs in docs/SERVER.md);
- ``/logs/``: the log as plain text (``?lines=N``, default 300), for the operator;
- ``/docs``, ``/ohif/`` and ``/static/`` (which holds the OHIF viewer's files): 404.
  ``/openapi.json`` still describes the whole API.
"""

from __future__ import annotations

import html
import os
from collections import deque
from collections.abc import Callable

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.routing import APIRoute
from monailabel.config import settings

__all__ = ["install_pages"]

_REMOVED = ("/", "/docs", "/static")  # top-level routes; the others are answered first by ours
_LOG_LINES = Query(300, ge=1, le=100_000)


def _home_page(info: Callable[[], dict]) -> HTMLResponse:
    meta = info()
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{model.get('dimension', '')}D</td>"
        f"<td>{html.escape(', '.join(model.get('labels', [])))}</td></tr>"
        for name, model in sorted(meta.get("models", {}).items())
    )
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(meta.get('name', ''))}</title></head><body>"
        f"<h1>{html.escape(meta.get('name', ''))} {html.escape(meta.get('version', ''))}</h1>"
        f"<p>{html.escape(meta.get('description', ''))}</p>"
        f"<table><tr><th>model</th><th>dims</th><th>labels</th></tr>{rows}</table>"
        "<p>API: <a href='info/'>info/</a> (models, methods, trust cards), "
        "<a href='openapi.json'>openapi.json</a> (every endpoint); infer with "
        "<code>POST infer/&lt;model&gt;?image=&lt;id&gt;</code>.</p></body></html>"
    )
    return HTMLResponse(body)


def _log_text(lines: int = _LOG_LINES) -> PlainTextResponse:
    path = os.path.join(settings.MONAI_LABEL_APP_DIR, "logs", "app.log")
    try:
        with open(path, errors="replace") as log:
            return PlainTextResponse("".join(deque(log, lines)))
    except FileNotFoundError:
        raise HTTPException(404, "this server writes no log file (started without MONAI Label's launcher)") from None


def _not_served(path: str = "") -> None:
    raise HTTPException(404, "the OHIF viewer is not served by this server")


def install_pages(app: FastAPI, info: Callable[[], dict]) -> None:
    """Replace MONAI Label's pages on the running ``app`` (module docstring; idempotent).
    ``info``: the app's ``/info`` answer, for the home page."""
    if getattr(app.state, "monai_sal_pages", False):
        return
    prefix = settings.MONAI_LABEL_API_STR or ""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in _REMOVED]
    app.router.routes[:0] = [
        APIRoute("/", lambda: _home_page(info), methods=["GET"], include_in_schema=False),
        APIRoute(f"{prefix}/logs/", _log_text, methods=["GET"], summary="The server's log", tags=["Others"]),
        APIRoute(f"{prefix}/ohif/{{path:path}}", _not_served, methods=["GET"], include_in_schema=False),
    ]
    app.docs_url = app.redoc_url = None
    app.openapi_schema = None
    app.state.monai_sal_pages = True
