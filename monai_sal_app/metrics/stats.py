"""Summary statistics and report tables: mean with a t-distribution 95% CI, per-group summaries,
GitHub Markdown and CSV output. numpy and scipy only (no torch), like the rest of ``metrics``.

Definition of the interval: docs/METHODS.md#mean-and-95-ci.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from monai_sal_app.arguments import check_integer
from monai_sal_app.files import atomic_write

__all__ = ["bootstrap_ci", "mean_ci", "summarize", "to_markdown", "write_csv"]


def _values(values, confidence: float) -> np.ndarray:
    """``values`` as a flat float64 array without NaN (and ``None``), after checking ``confidence``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[~np.isnan(array)]


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, ci_low, ci_high)`` of ``values`` with a Student-t confidence interval.

    ``mean +- t_{(1+confidence)/2, n-1} * std(ddof=1) / sqrt(n)``, as
    ``scipy.stats.t.interval(confidence, n - 1, loc=mean, scale=sem)``. NaNs (and ``None``) are
    ignored and ``n`` counts the rest. One value -> ``(v, nan, nan)``; no value ->
    ``(nan, nan, nan)``; identical values -> ``(v, v, v)`` (zero-width interval). Python floats.
    """
    array = _values(values, confidence)
    n = array.size
    if n < 2:
        return (math.nan, math.nan, math.nan) if n == 0 else (float(array[0]), math.nan, math.nan)
    mean = float(array.mean())
    # Here, not at the top: the metrics import numpy only, and scipy.stats takes about half a
    # second to import, which only the confidence intervals need.
    from scipy import stats as scipy_stats

    sem = float(array.std(ddof=1)) / math.sqrt(n)
    half_width = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * sem
    return mean, mean - half_width, mean + half_width


def bootstrap_ci(
    values, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, ci_low, ci_high)`` of ``values`` with a percentile bootstrap confidence interval.

    ``n_resamples`` resamples of the n values with replacement, drawn by
    ``numpy.random.default_rng(seed)``; the bounds are the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the resamples' means (``numpy.quantile``, linear). NaNs
    (and ``None``) are ignored. One value -> ``(v, nan, nan)``; no value -> ``(nan, nan, nan)``.
    Used where the values are bounded or skewed (shares in [0, 1]) and a t interval could leave
    their range. Python floats.
    """
    check_integer(n_resamples, "n_resamples", 100)
    array = _values(values, confidence)
    n = array.size
    if n < 2:
        return (math.nan, math.nan, math.nan) if n == 0 else (float(array[0]), math.nan, math.nan)
    mean = float(array.mean())
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return mean, float(low), float(high)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _metric_value(row: Mapping, metric: str, index: int) -> float:
    value = row.get(metric)
    if value is None:
        return math.nan
    if isinstance(value, (numbers.Real, np.bool_)):
        return float(value)
    raise TypeError(f"row {index}: metric {metric!r} is not a number: {value!r}")


def summarize(
    rows: Sequence[Mapping],
    group_by: str | tuple[str, ...],
    metrics: Sequence[str] | None = None,
) -> list[dict]:
    """Per-group mean and CI of each metric, for the report tables.

    ``rows``: one dict per image (e.g. ``{"method": "gradcam", "roc_auc": 0.81, ...}``).
    ``group_by``: a key or tuple of keys; groups appear in order of first occurrence.
    ``metrics``: the keys to summarise; ``None`` -> every key (other than the group keys) whose
    values are all numbers (bools excluded) or ``None``, in order of first occurrence.
    Returns one dict per group: the group keys, ``n`` (rows in the group), then for each metric
    ``<m>_mean``, ``<m>_ci_low``, ``<m>_ci_high`` from :func:`mean_ci` (a missing or ``None``
    value counts as NaN and is ignored, so a metric's interval may rest on fewer than ``n`` rows).
    """
    keys = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    if not keys:
        raise ValueError("group_by is empty")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {index} is a {type(row).__name__}, not a dict")
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"row {index} has no group key {missing[0]!r}")
    if metrics is None:
        candidates: dict[str, bool] = {}
        for row in rows:
            for key, value in row.items():
                if key in keys:
                    continue
                numeric = value is None or _is_number(value)
                candidates[key] = candidates.get(key, True) and numeric
        metrics = [key for key, numeric in candidates.items() if numeric]
    groups: dict[tuple, list[tuple[int, Mapping]]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(tuple(row[key] for key in keys), []).append((index, row))
    summary = []
    for group_values, members in groups.items():
        out = dict(zip(keys, group_values))
        out["n"] = len(members)
        for metric in metrics:
            mean, low, high = mean_ci([_metric_value(row, metric, index) for index, row in members])
            out[f"{metric}_mean"], out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = mean, low, high
        summary.append(out)
    return summary


def _columns(rows: Sequence[Mapping]) -> list[str]:
    if not rows:
        raise ValueError("no rows to write")
    columns: dict[str, None] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {index} is a {type(row).__name__}, not a dict")
        columns.update(dict.fromkeys(row))
    return list(columns)


def _markdown_cell(value, floatfmt: str) -> str:
    if value is None:
        text = ""
    elif isinstance(value, (float, np.floating)):
        text = format(float(value), floatfmt)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Sequence[Mapping], floatfmt: str = ".3f") -> str:
    """A GitHub Markdown table of ``rows`` (columns: every key, in order of first occurrence).

    Floats use ``floatfmt`` (NaN prints ``nan``), ``None`` or a missing key an empty cell; ``|``
    in text is escaped. Columns holding only numbers are right-aligned. Ends with a newline.
    """
    columns = _columns(rows)
    numeric = [all(_is_number(row.get(c)) or row.get(c) is None for row in rows) for c in columns]
    lines = [
        "| " + " | ".join(_markdown_cell(c, floatfmt) for c in columns) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(row.get(c), floatfmt) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write ``rows`` as CSV (header: every key, in order of first occurrence) atomically.

    The file is written next to ``path`` under a temporary name and moved into place
    (``files.atomic_write``), so a reader never sees a half-written table. Floats keep full precision;
    a missing key is an empty cell. Parent folders are created. Returns the path.
    """
    columns = _columns(rows)

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            # str(): shortest round-trip text of a numpy float (the csv module would repr()
            # np.float64 as a float subclass, which numpy 2 spells "np.float64(...)").
            writer.writerow({key: (str(v) if isinstance(v, np.floating) else v) for key, v in row.items()})

    return atomic_write(path, write, mode="w")
