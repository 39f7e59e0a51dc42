"""A worker process that ends with the process that started it.

Processes started for background work (the server's train and scoring tasks, the processes that
train ``monai-sal serve``'s default models) would go on alone when their parent is killed without
a chance to end them (SIGKILL, say). :func:`end_with_parent` asks Linux to send the calling
process SIGTERM when its parent goes (``PR_SET_PDEATHSIG``). Standard library only: every layer
may use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

__all__ = ["end_with_parent"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent_pid: int) -> bool:
    """In a process started by ``parent_pid``: SIGTERM when the parent's thread that started it
    ends. Returns False when the parent is already gone (the caller should exit), True otherwise,
    also off Linux or where ``prctl`` is missing (nothing asked)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return True
    return os.getppid() == parent_pid  # else the parent ended before the request above took effect
