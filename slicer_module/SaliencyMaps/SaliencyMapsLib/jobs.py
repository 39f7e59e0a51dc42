"""Requests that run off the GUI thread, one after another, with progress and cancel.

A :class:`BackgroundJob` runs a list of :class:`Step`. For each step, :meth:`BackgroundJob.poll`
(called on the GUI thread by a timer: a ``qt.QTimer`` in the module) calls ``step.start()``, which
may touch the scene (e.g. write the volume to upload) and returns the request; the request runs
on a worker thread (network only: nothing there touches the scene or Qt); once it has answered,
``step.finish(answer)`` runs on the GUI thread again (e.g. loads the heatmap into the scene).
:meth:`BackgroundJob.cancel` aborts the request in flight by shutting down its connection (the
server then stops its work) and starts no further step. Expected failures (``errors``) are
recorded and the job goes on with the next step; any other exception is raised by ``poll``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from SaliencyMapsLib.client import Cancellation, Cancelled, ServerError
from SaliencyMapsLib.scene import SceneError

__all__ = ["BackgroundJob", "JobReport", "Step"]


def _unchanged(answer):
    return answer


@dataclass
class Step:
    """One request: ``start()`` on the GUI thread returns ``request(cancellation)``, which runs on
    the worker thread; ``finish(answer)`` on the GUI thread gives the step's result."""

    title: str
    start: Callable[[], Callable[[Cancellation], Any]]
    finish: Callable[[Any], Any] = _unchanged


@dataclass
class JobReport:
    """What a job did: ``done`` (title, result) and ``failed`` (title, exception) in order, and
    whether it was cancelled before its end."""

    done: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    cancelled: bool = False

    def summary(self) -> str:
        text = f"{len(self.done)} done, {len(self.failed)} failed" + (", cancelled" if self.cancelled else "")
        return text + "".join(f"\n{title}: {error}" for title, error in self.failed)


class BackgroundJob:
    """``BackgroundJob(steps)``; then :meth:`poll` until it returns True (or :meth:`wait`)."""

    def __init__(self, steps: Sequence[Step], errors: tuple[type[BaseException], ...] = (ServerError, SceneError)):
        self.steps = list(steps)
        self.errors = errors
        self.report = JobReport()
        self.finished = False
        self._index = 0
        self._cancellation = Cancellation()
        self._worker: threading.Thread | None = None
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._started = 0.0

    @property
    def running(self) -> str | None:
        """The title of the step whose request is in flight, or None."""
        return self.steps[self._index].title if self._worker is not None else None

    def progress(self) -> tuple[int, int, str | None, float]:
        """(steps ended, steps in all, title of the request in flight or None, its seconds so far)."""
        seconds = time.monotonic() - self._started if self._worker is not None else 0.0
        return self._index, len(self.steps), self.running, seconds

    def poll(self) -> bool:
        """Collect a request that has answered, start the next one; never waits. True once the
        job has ended (every step done or failed, or cancelled)."""
        if self._worker is not None:
            if self._worker.is_alive():
                return False
            self._collect()
        while not self.finished and self._worker is None:
            if self._cancellation.cancelled or self._index >= len(self.steps):
                self.finished = True
                break
            step = self.steps[self._index]
            try:
                request = step.start()
            except self.errors as error:
                self.report.failed.append((step.title, error))
                self._index += 1
                continue
            except BaseException:
                self.finished = True
                raise
            self._outcome = (None, None)
            self._started = time.monotonic()
            self._worker = threading.Thread(target=self._send, args=(request,), name=step.title, daemon=True)
            self._worker.start()
        return self.finished

    def cancel(self) -> None:
        """Abort the request in flight (its connection is shut down), drop its answer if it came
        already, and start no other step: nothing of this job reaches the scene any more."""
        if not self.finished:
            self.report.cancelled = True
        self._cancellation.cancel()

    def wait(self, interval: float = 0.05) -> JobReport:
        """Poll on this thread until the job ends (for scripts and tests without an event loop)."""
        while not self.poll():
            self._worker.join(interval)
        return self.report

    def _send(self, request) -> None:
        try:
            self._outcome = (request(self._cancellation), None)
        except BaseException as error:  # handed to the GUI thread by poll()
            self._outcome = (None, error)

    def _collect(self) -> None:
        self._worker.join()
        self._worker = None
        step = self.steps[self._index]
        self._index += 1
        answer, error = self._outcome
        if isinstance(error, Cancelled) or self._cancellation.cancelled:  # an answer after Cancel is dropped
            self.report.cancelled = True
        elif error is not None:
            if not isinstance(error, self.errors):
                self.finished = True
                raise error
            self.report.failed.append((step.title, error))
        else:
            try:
                self.report.done.append((step.title, step.finish(answer)))
            except self.errors as failure:
                self.report.failed.append((step.title, failure))
            except BaseException:
                self.finished = True
                raise
