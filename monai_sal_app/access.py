"""Who may use the server: the access tokens of its two roles, and where it may listen without them.

Two roles (docs/SERVER.md, "Running it for others"):

- ``reader``: ``/info``, infer, datastore reads and sessions;
- ``operator``: everything, including training, scoring, datastore writes and deletes, the logs
  and the model files.

Each role has a bearer token that the operator sets in the server's environment
(``MONAI_SAL_READER_TOKEN``, ``MONAI_SAL_OPERATOR_TOKEN``) or in a tokens file that only its owner
can read (``--conf tokens_file FILE`` or ``monai-sal serve --tokens-file FILE``, lines
``reader=<token>`` and ``operator=<token>``), never on a command line, where ``ps`` shows it to
every user of the machine. A client sends ``Authorization: Bearer <token>``.

Without tokens the server answers on loopback only: :func:`check_listen_address` refuses any other
address, and the server's access control answers a request from another address 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MIN_TOKEN_LENGTH",
    "OPERATOR",
    "READER",
    "TOKEN_ENVIRONMENT",
    "AccessTokens",
    "check_listen_address",
    "is_loopback",
]

READER, OPERATOR = "reader", "operator"
TOKEN_ENVIRONMENT = {READER: "MONAI_SAL_READER_TOKEN", OPERATOR: "MONAI_SAL_OPERATOR_TOKEN"}
MIN_TOKEN_LENGTH = 16
HOW_TO_SET = (
    f"set {TOKEN_ENVIRONMENT[OPERATOR]} and {TOKEN_ENVIRONMENT[READER]} in the server's environment "
    "(or --conf tokens_file FILE)"
)


@dataclass(frozen=True)
class AccessTokens:
    """The bearer tokens of the two roles (empty: that role has no token). Never shown in a repr."""

    reader: str = field(default="", repr=False)
    operator: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        for role in (READER, OPERATOR):
            token = getattr(self, role)
            if token and (len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token)):
                raise ValueError(
                    f"the {role} token must be at least {MIN_TOKEN_LENGTH} characters without spaces "
                    '(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))")'
                )
        if self.reader and self.reader == self.operator:
            raise ValueError("the reader and operator tokens must differ")

    @property
    def enabled(self) -> bool:
        """Whether requests must carry a token (at least one role has one)."""
        return bool(self.reader or self.operator)

    def role_of(self, presented: str) -> str | None:
        """The role whose token is ``presented`` (None for none); compares in constant time
        against both tokens, so the time taken says nothing about either."""
        given = presented.encode()
        is_operator = bool(self.operator) and hmac.compare_digest(given, self.operator.encode())
        is_reader = bool(self.reader) and hmac.compare_digest(given, self.reader.encode())
        return OPERATOR if is_operator else READER if is_reader else None

    @classmethod
    def from_settings(cls, conf: Mapping[str, str], environ: Mapping[str, str] | None = None) -> AccessTokens:
        """The tokens of ``conf["tokens_file"]`` or of the environment (not both); ``ValueError``
        naming the problem for a missing, unreadable, badly formed or group/world-readable file."""
        environ = os.environ if environ is None else environ
        from_environment = {role: environ.get(name, "").strip() for role, name in TOKEN_ENVIRONMENT.items()}
        path = conf.get("tokens_file") or ""
        if not path:
            return cls(**from_environment)
        if any(from_environment.values()):
            raise ValueError(
                f"tokens come from either the environment ({', '.join(TOKEN_ENVIRONMENT.values())}) "
                "or tokens_file, not both"
            )
        return cls(**_read_tokens_file(Path(path)))


def _read_tokens_file(path: Path) -> dict[str, str]:
    """``{role: token}`` from lines ``reader=<token>`` / ``operator=<token>`` (``#`` comments)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read the tokens file {path}: {error.strerror or error}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"the tokens file {path} is readable by other users (mode {stat.filemode(mode)}); chmod 600 it"
        )
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, sep, token = line.partition("=")
        role = role.strip()
        if not sep or role not in TOKEN_ENVIRONMENT or role in tokens:
            raise ValueError(
                f"the tokens file {path}, line {number}: expected reader=<token> or operator=<token>, once each"
            )
        tokens[role] = token.strip()
    return tokens


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) means this machine only: every address it resolves
    to is a loopback address. An empty host, a wildcard or a name that does not resolve is not."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_listen_address(host: str, tokens: AccessTokens) -> None:
    """``ValueError`` (one line saying what to do) when the server would listen on ``host``, an
    address other machines can reach, without access tokens."""
    if tokens.enabled or is_loopback(host):
        return
    where = "every interface" if host.strip("[]") in ("0.0.0.0", "::", "") else "an address other machines can reach"
    raise ValueError(
        f"refusing to listen on {host or 'every interface'} ({where}) without authentication: "
        f"{HOW_TO_SET}, or listen on 127.0.0.1"
    )
