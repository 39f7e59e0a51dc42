"""The C memory allocator of batch work, chosen before Python starts.

Batch work (the command line's explain, evaluate, trust, train and studies, the benchmarks)
allocates and frees tensors of tens of megabytes on every pass. With glibc's defaults each such
block is mapped from the kernel and unmapped again when freed, and the page faults of touching
fresh pages cost as much CPU as the work itself. An allocator that keeps its freed pages for the
next pass removes them (the measurements are in docs/BENCHMARKS.md, "The memory allocator").

The allocator must be chosen before the process starts, so ``monai-sal`` starts itself again,
once, with the environment of :func:`batch_environment` (:func:`restart_with_batch_allocator`):

1. jemalloc (Debian's ``libjemalloc2``; ``scripts/install.sh`` unpacks it into ``<repo>/.data``
   when it is not installed system-wide) preloaded, told never to give freed pages back
   (:data:`JEMALLOC_CONF`);
2. else glibc with its tunables raised so that large blocks come from the heap and the heap is
   not trimmed (:data:`GLIBC_TUNABLES`);
3. else (another C library) as it is.

An allocator the user chose (``LD_PRELOAD``, ``MALLOC_CONF`` or ``GLIBC_TUNABLES`` already set)
is left alone. The server does not take this setting: between requests it gives its memory back
(one glibc arena, trimmed after each request: ``main.use_one_malloc_arena``), and
:func:`without_batch_allocator` is the environment it is started with.

Standard library only: it runs before torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "ALLOCATOR_VARIABLE",
    "GLIBC_TUNABLES",
    "JEMALLOC_CONF",
    "allocator_in_use",
    "batch_allocator_for_children",
    "batch_environment",
    "jemalloc_library",
    "peak_resident_memory_mb",
    "restart_with_batch_allocator",
    "without_batch_allocator",
]

# Set in the environment of a process started with the batch allocator: which one it chose
# ("jemalloc", "glibc-tunables", "system" or "user"); a process that finds it set is not restarted.
ALLOCATOR_VARIABLE = "MONAI_SAL_ALLOCATOR"

# jemalloc keeps freed pages ("dirty", then "muzzy") for ever instead of returning them after 10 s:
# with the default decay the returns and the faults of re-touching the pages cost more than glibc.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"

# glibc: blocks up to 4 GiB come from the heap instead of their own mapping, the heap is trimmed
# only above 64 GiB free and grows 1 GiB at a time.
GLIBC_TUNABLES = (
    "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736:glibc.malloc.top_pad=1073741824"
)

_USER_SETTINGS = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
_JEMALLOC_NAME = "libjemalloc.so.2"
_REPO_DATA = Path(__file__).resolve().parents[1] / ".data"


def jemalloc_library() -> Path | None:
    """The jemalloc shared library to preload, or None: searched in ``$MONAI_SAL_DATA/jemalloc``,
    ``<repo>/.data/jemalloc`` (what ``scripts/install.sh`` unpacks) and the system's library folders."""
    roots = [Path(os.environ["MONAI_SAL_DATA"]) / "jemalloc"] if os.environ.get("MONAI_SAL_DATA") else []
    roots.append(_REPO_DATA / "jemalloc")
    for root in roots:
        found = sorted(root.glob(f"usr/lib/*/{_JEMALLOC_NAME}")) if root.is_dir() else []
        if found:
            return found[0]
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib"):
        candidate = Path(folder) / _JEMALLOC_NAME
        if candidate.is_file():
            return candidate
    return None


def _uses_glibc() -> bool:
    return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


def batch_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the batch allocator's settings added (see the module's docstring) and
    :data:`ALLOCATOR_VARIABLE` naming the choice; unchanged when it already names one."""
    env = dict(environ)
    if ALLOCATOR_VARIABLE in env:
        return env
    if any(env.get(name) for name in _USER_SETTINGS):
        env[ALLOCATOR_VARIABLE] = "user"
        return env
    library = jemalloc_library() if sys.platform.startswith("linux") else None
    if library is not None:
        env["LD_PRELOAD"] = str(library)
        env["MALLOC_CONF"] = JEMALLOC_CONF
        env[ALLOCATOR_VARIABLE] = "jemalloc"
    elif _uses_glibc():
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
        env[ALLOCATOR_VARIABLE] = "glibc-tunables"
    else:
        env[ALLOCATOR_VARIABLE] = "system"
    return env


def without_batch_allocator(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the settings :func:`batch_environment` added (those a user set stay):
    the environment the server is started with."""
    env = dict(environ)
    if env.pop(ALLOCATOR_VARIABLE, None) in ("jemalloc", "glibc-tunables"):
        for name in _USER_SETTINGS:
            env.pop(name, None)
    return env


def restart_with_batch_allocator(argv: Sequence[str] | None = None) -> None:
    """Start this process again (``os.execve``, same PID and arguments) with the batch allocator,
    unless it already runs with one or the environment names the user's own; returns only then.
    ``argv``: the interpreter's command line (default ``sys.orig_argv``)."""
    if ALLOCATOR_VARIABLE in os.environ:
        return
    env = batch_environment(os.environ)
    if env[ALLOCATOR_VARIABLE] in ("user", "system"):
        os.environ[ALLOCATOR_VARIABLE] = env[ALLOCATOR_VARIABLE]
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(argv or sys.orig_argv), env)


@contextlib.contextmanager
def batch_allocator_for_children() -> Iterator[None]:
    """Inside it, processes started from this one (``subprocess``, ``multiprocessing`` spawn) run
    with the batch allocator; this process's environment is restored afterwards."""
    before = dict(os.environ)
    os.environ.clear()
    os.environ.update(batch_environment(without_batch_allocator(before)))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def allocator_in_use() -> str:
    """The allocator this process runs with: "jemalloc" or "tcmalloc" when one is loaded (read from
    ``/proc/self/maps``: the batch allocator, or one the user preloaded), "glibc-tunables" when they
    are set, else "glibc" or "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    if os.environ.get("GLIBC_TUNABLES", "").find("glibc.malloc.") >= 0:
        return "glibc-tunables"
    return "glibc" if _uses_glibc() else "system"


def peak_resident_memory_mb() -> float:
    """The largest resident memory this process has had so far, in MiB (``getrusage``; Linux
    reports kibibytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
