"""Files written whole or not at all, and values made ready for JSON: the one home of both.

Every file monai-sal writes for others to read (checkpoints and cards, manifests, images, tables,
figures, reports) goes through :func:`atomic_path`: it is written under a temporary name in its
own folder and renamed into place, so a reader never sees half a file and an error leaves the
previous file as it was. Standard library and numpy only: every layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_path", "atomic_write", "json_safe", "remove_stale_temporaries", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` (same folder, so the rename is atomic) ending in ``suffix``
    (for writers that read the format from the name, e.g. ``".nii.gz"``); renamed to ``path`` when
    the block ends without an error, removed when it raises. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Remove the temporary files :func:`atomic_path` left under ``folder`` (recursively) when its
    process was killed before it could rename or remove them; returns how many. Call it only when
    no other process is writing there."""
    stale = [path for path in Path(folder).rglob(".*.tmp*") if path.is_file()] if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object], mode: str = "wb") -> Path:
    """Call ``write(file)`` on a file opened with ``mode`` at a temporary path, flush it to disk,
    then rename it to ``path`` (:func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as temporary:
        encoding = None if "b" in mode else "utf-8"
        with open(temporary, mode, encoding=encoding, newline=None if "b" in mode else "") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda handle: handle.write(text), mode="w")


def json_digest(value: Any) -> str:
    """SHA-256 (hex) of ``value``'s JSON (:func:`json_safe`, keys sorted): equal for equal settings."""
    return hashlib.sha256(json.dumps(json_safe(value), sort_keys=True, default=str).encode()).hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` ready for ``json.dumps(..., allow_nan=False)``: mapping keys as strings, tuples and
    arrays as lists, numpy scalars as Python numbers, NaN and infinities as None, paths as strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
