"""MONAI Label's background processes (train, scoring, batch infer) end with the server.

MONAI Label runs each train, scoring or batch-infer task as ``python -m
monailabel.interfaces.utils.app -m <method> ...`` from a worker thread, and nothing ends those
processes when the server stops: after SIGTERM a scoring run went on alone. Here:

- :func:`on_shutdown_signal` chains an action in front of the SIGTERM and SIGINT handlers
  (uvicorn's, which then stop the server);
- :func:`end_background_work` (such an action, and again at exit) drops the queued tasks and ends
  every running task process with its children: SIGTERM, then SIGKILL after
  :data:`GRACE_S` seconds for any left at exit;
- :func:`end_with_parent`, called in the task process itself, asks Linux to send it SIGTERM when
  the server goes away without a chance to clean up (killed with SIGKILL, say).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import psutil
from monailabel.utils.async_tasks import utils as monailabel_tasks

from monai_sal_app.processes import end_with_parent as end_with_parent_process

__all__ = [
    "GRACE_S",
    "SERVER_PID_VARIABLE",
    "end_background_work",
    "end_background_work_with_the_server",
    "end_with_parent",
    "on_shutdown_signal",
]

logger = logging.getLogger(__name__)

GRACE_S = 5.0  # how long a task process may take to end on SIGTERM before it is killed
SERVER_PID_VARIABLE = "MONAI_SAL_SERVER_PID"  # the server's pid, in the environment its tasks inherit


def on_shutdown_signal(action: Callable[[], None]) -> None:
    """On SIGTERM or SIGINT, run ``action``, then the handler that was there (or the default
    action). Only from the main thread (signal handlers cannot be set elsewhere); a no-op otherwise,
    and for an ``action`` already chained."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if action in getattr(previous, "monai_sal_actions", ()):
            continue

        def handler(number, frame, previous=previous):
            action()
            if callable(previous):
                previous(number, frame)
            else:  # the default action (or none): restore it and deliver the signal again
                signal.signal(number, previous if previous is not None else signal.SIG_DFL)
                signal.raise_signal(number)

        handler.monai_sal_actions = (action, *getattr(previous, "monai_sal_actions", ()))
        signal.signal(signum, handler)


def _task_processes() -> list[psutil.Process]:
    """The running task processes and all their descendants."""
    found = []
    for running in list(monailabel_tasks.background_processes.values()):
        for process in list(running.values()):
            try:
                parent = psutil.Process(process.pid)
                found += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
    return found


def end_background_work(wait_s: float = 0.0) -> None:
    """Drop every queued task and send SIGTERM to every running task process and its children;
    with ``wait_s``, wait that long for them and SIGKILL the ones left."""
    for executor in list(monailabel_tasks.background_executors.values()):
        executor.shutdown(wait=False, cancel_futures=True)
    processes = _task_processes()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    if processes:
        logger.info("ending %d background task process(es): %s", len(processes), [p.pid for p in processes])
    if wait_s > 0 and processes:
        _, alive = psutil.wait_procs(processes, timeout=wait_s)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def end_background_work_with_the_server() -> None:
    """Install :func:`end_background_work` on SIGTERM/SIGINT and at exit (waiting :data:`GRACE_S`),
    and tell the task processes started from now on which process is the server."""
    os.environ[SERVER_PID_VARIABLE] = str(os.getpid())
    on_shutdown_signal(end_background_work)
    atexit.register(end_background_work, GRACE_S)


def end_with_parent() -> None:
    """In a task process started by the server: SIGTERM when the server's thread that started it
    ends (``processes.end_with_parent``), and exit now if the server is already gone. A no-op
    outside such a process or off Linux."""
    server_pid = os.environ.get(SERVER_PID_VARIABLE)
    if server_pid and not end_with_parent_process(int(server_pid)):
        logger.warning("the server (pid %s) is gone; this task ends", server_pid)
        sys.exit(1)
