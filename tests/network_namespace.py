"""A network namespace with an address that is not loopback, for servers the tests run "on the network".

``unshare -rn`` makes a user and a network namespace in which the test's user is root; inside it
the loopback interface also gets :data:`ADDRESS` (10.23.0.1/32), which is not a loopback address.
A server listening there is, as far as it can tell, on a hospital network, yet no other machine
(and no process outside the namespace) can reach it. The tests' requests run inside the
namespace (``nsenter``), one batch of :func:`http_calls.perform` calls per process.

Where user namespaces are not allowed (:func:`available` is False), the tests run the same server
configuration on loopback instead, and say so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ADDRESS = "10.23.0.1"
_TESTS = Path(__file__).resolve().parent
_SETUP = f"ip addr add {ADDRESS}/32 dev lo && ip link set lo up"
_RUNNER = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); from http_calls import perform; "
    "print(json.dumps(perform(sys.argv[2], json.load(sys.stdin))))"
)


def available() -> bool:
    """Whether this machine lets the test's user make the namespace (and has ``ip`` to set it up)."""
    if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        return False
    made = subprocess.run(["unshare", "-rn", "sh", "-c", _SETUP], capture_output=True, timeout=30)
    return made.returncode == 0


def wrapper() -> list[str]:
    """The command that runs the command appended to it in a new namespace with :data:`ADDRESS`."""
    return ["unshare", "-rn", "sh", "-c", f'{_SETUP} && exec "$@"', "sh"]


def perform_inside(pid: int, url: str, calls: list[dict], timeout: float = 600) -> list[dict]:
    """:func:`http_calls.perform` run inside the namespace of process ``pid``."""
    done = subprocess.run(
        [
            "nsenter",
            "-t",
            str(pid),
            "-U",
            "-n",
            "--preserve-credentials",
            sys.executable,
            "-c",
            _RUNNER,
            str(_TESTS),
            url,
        ],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"requests inside the namespace failed:\n{done.stderr}")
    return json.loads(done.stdout)
