"""Access control of the running server: a bearer token per role on every request, and loopback
only when no token is set (:mod:`monai_sal_app.access` holds the tokens and the roles).

:class:`AccessControl` is the outermost ASGI middleware, so a request without the right token is
answered before its body is read and before any route runs:

- tokens set: no or an unknown token is 401 (``WWW-Authenticate: Bearer``), the reader's token on
  an operator's endpoint 403; CORS preflights (``OPTIONS``) pass, as browsers send them without
  credentials;
- no tokens: a request from any address other than loopback is 403 (the server was started
  somewhere that lets other machines reach it; ``check_listen_address`` refuses that at start for
  the launchers it knows).

:func:`required_role` maps each MONAI Label endpoint to the role it needs: the reader's list is
explicit (:data:`READER_ENDPOINTS`) and everything else, including endpoints a later MONAI Label
adds, needs the operator. Tokens are never logged; a refusal is logged with method, path and
client address.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from monailabel.config import settings
from starlette.websockets import WebSocketClose

from monai_sal_app.access import HOW_TO_SET, OPERATOR, READER, AccessTokens

__all__ = ["READER_ENDPOINTS", "AccessControl", "install_access_control", "launcher_listen_host", "required_role"]

logger = logging.getLogger(__name__)

# (HTTP methods, path pattern below MONAI Label's API prefix) a reader may use; all else: operator.
READER_ENDPOINTS = (
    ({"GET", "HEAD"}, r"/"),  # the server's own page
    ({"GET", "HEAD"}, r"/openapi\.json"),
    ({"GET", "HEAD"}, r"/favicon\.ico"),
    ({"GET", "HEAD"}, r"/info/?"),
    ({"POST"}, r"/infer/[^/]+"),
    ({"GET", "HEAD"}, r"/datastore/?"),  # the list
    ({"GET", "HEAD"}, r"/datastore/(image|label)(/info)?"),
    ({"GET", "HEAD"}, r"/datastore/dataset"),
    ({"PUT"}, r"/session/?"),  # an upload to infer on several times
    ({"GET", "HEAD", "DELETE"}, r"/session/[^/]+"),
    ({"POST"}, r"/activelearning/[^/]+"),  # the next image to look at
)
_READER_PATTERNS = [(methods, re.compile(pattern)) for methods, pattern in READER_ENDPOINTS]


def required_role(method: str, path: str) -> str:
    """The role a request needs: :data:`READER_ENDPOINTS` for a reader, everything else the operator."""
    prefix = settings.MONAI_LABEL_API_STR or ""
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :] or "/"
    for methods, pattern in _READER_PATTERNS:
        if method in methods and pattern.fullmatch(path):
            return READER
    return OPERATOR


def _is_loopback_client(client) -> bool:
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refusal(status: int, detail: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class AccessControl:
    """ASGI middleware: the token check of the module docstring in front of ``app``."""

    def __init__(self, app, tokens: AccessTokens) -> None:
        self.app = app
        self.tokens = tokens

    def refusal(self, scope) -> JSONResponse | None:
        """The 401/403 answer for this request, or None to let it through."""
        method, path, client = scope.get("method", ""), scope.get("path", ""), scope.get("client")
        if not self.tokens.enabled:
            if _is_loopback_client(client):
                return None
            return _refusal(403, f"this server has no access tokens and answers only on loopback: {HOW_TO_SET}")
        if method == "OPTIONS":
            return None
        presented = ""
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    presented = credentials.strip()
        if not presented:
            return _refusal(401, "this server needs a token: send 'Authorization: Bearer <token>'")
        role = self.tokens.role_of(presented)
        if role is None:
            return _refusal(401, "the token is not valid for this server")
        needed = required_role(method, path)
        if needed == OPERATOR and role != OPERATOR:
            return _refusal(403, f"{method} {path} needs the operator's token; the reader's token cannot do it")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            refusal = self.refusal({"method": "GET", **scope})
            if refusal is not None:
                client = scope.get("client") or ("?", 0)
                logger.warning(
                    "refused %s %s from %s: %d", scope.get("method"), scope.get("path"), client[0], refusal.status_code
                )
                answer = refusal if scope["type"] == "http" else WebSocketClose(code=1008)
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def launcher_listen_host(argv: list[str]) -> str | None:
    """The address the server was told to listen on, from the command line of the two launchers
    that load this app: ``monailabel start_server`` (``--host``/``-i``, default 0.0.0.0) and
    ``uvicorn`` (``--host``, default 127.0.0.1); None for any other launcher (``monai-sal serve``
    checks its own ``--host`` before it starts)."""
    program = os.path.basename(argv[0]) if argv else ""
    parser = argparse.ArgumentParser(add_help=False)
    if argv[1:2] == ["start_server"]:
        parser.add_argument("-i", "--host", default="0.0.0.0")
        rest = argv[2:]
    elif program.startswith("uvicorn") or argv[0].endswith(os.path.join("uvicorn", "__main__.py")):
        parser.add_argument("--host", default="127.0.0.1")
        rest = argv[1:]
    else:
        return None
    return parser.parse_known_args(rest)[0].host


def install_access_control(app: FastAPI, tokens: AccessTokens) -> None:
    """Put :class:`AccessControl` outermost on the running ``app`` (idempotent)."""
    if getattr(app.state, "monai_sal_access_control", False):
        return
    app.middleware_stack = None  # rebuilt at the next request, with the middleware below
    app.add_middleware(AccessControl, tokens=tokens)
    app.state.monai_sal_access_control = True
    logger.info(
        "access control: %s",
        f"tokens for {', '.join(r for r in (READER, OPERATOR) if getattr(tokens, r))}"
        if tokens.enabled
        else "no tokens, loopback clients only",
    )
