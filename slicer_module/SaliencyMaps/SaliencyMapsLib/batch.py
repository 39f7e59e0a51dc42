"""Running one explanation after another with progress and cancel (one method on every volume, or
every method on one volume). A failed item is reported and the batch goes on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchReport", "Job", "jobs_for_methods", "jobs_for_volumes", "run_batch"]


@dataclass(frozen=True)
class Job:
    """One explanation: a volume node, a model and a method with its parameters."""

    volume: Any
    model: str
    method: str
    params: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.volume.GetName()} / {self.model} / {self.method}"


@dataclass
class BatchReport:
    """What a batch did: results of the finished jobs, (job, message) of the failed ones, and
    whether it was cancelled before the end."""

    done: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    cancelled: bool = False

    def summary(self) -> str:
        text = f"{len(self.done)} done, {len(self.failed)} failed" + (", cancelled" if self.cancelled else "")
        return text + "".join(f"\n{job.title}: {message}" for job, message in self.failed)


def jobs_for_volumes(volumes: Sequence, model: str, method: str, params: dict | None = None) -> list[Job]:
    """One method on every volume."""
    return [Job(volume, model, method, dict(params or {})) for volume in volumes]


def jobs_for_methods(volume, model: str, methods: Sequence[str], params: dict | None = None) -> list[Job]:
    """Every method on one volume (``params``: method -> its parameters)."""
    return [Job(volume, model, method, dict((params or {}).get(method, {}))) for method in methods]


def run_batch(
    jobs: Sequence[Job],
    run: Callable[[Job], Any],
    progress: Callable[[int, int, str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    errors: tuple[type[BaseException], ...] | None = None,
) -> BatchReport:
    """``run(job)`` for each job in order. ``progress(done, total, title)`` before each job and at
    the end; ``cancelled()`` is asked before each job (the job running finishes). Exceptions of
    ``errors`` (default: the module's ServerError and SceneError) are recorded with their
    message; any other propagates."""
    if errors is None:
        from SaliencyMapsLib.client import ServerError
        from SaliencyMapsLib.scene import SceneError

        errors = (ServerError, SceneError)
    report = BatchReport()
    total = len(jobs)
    for index, job in enumerate(jobs):
        if cancelled is not None and cancelled():
            report.cancelled = True
            break
        if progress is not None:
            progress(index, total, job.title)
        try:
            report.done.append((job, run(job)))
        except errors as error:
            report.failed.append((job, str(error)))
    if progress is not None:
        progress(len(report.done) + len(report.failed), total, "cancelled" if report.cancelled else "done")
    return report
