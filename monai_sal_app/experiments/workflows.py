"""The batch workflows behind the CLI: explain and evaluate over a manifest.

Each step reads and writes files a user can open (NIfTI maps on the input grid, CSV tables,
Markdown, PNG overlays), so the steps can also be run one by one from the command line.

Both go through their items in fixed blocks of consecutive items, dealt to the ranks under
``torchrun`` (``distributed.shard``), so one process and many compute the same numbers. Worker
processes read each rank's blocks ahead while it computes (``distributed.read_ahead``: a torch
``DataLoader``), so reading overlaps the network's work. Each finished block's rows are written
whole to ``<out>/blocks/`` as it finishes (its maps first); a rerun of the same call computes only
the blocks missing there (and again the blocks with an error row), and the tables are those
blocks' rows in item order, so an interrupted and resumed run writes the very bytes of an
uninterrupted one. Wall times, which differ between any two runs, are a table of their own
(``timings.csv``). An image, map or mask that cannot be read becomes a row whose ``error`` says
why, and the other items go on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from monai_sal_app import distributed
from monai_sal_app.data.io import read_image, write_nifti
from monai_sal_app.evaluation.inputs import mean_training_mask
from monai_sal_app.experiments.report import save_overlay, write_table
from monai_sal_app.files import atomic_path, json_digest, json_safe, remove_stale_temporaries, write_text
from monai_sal_app.metrics.localization import localization_metrics
from monai_sal_app.metrics.stats import summarize, write_csv
from monai_sal_app.models.checkpoint import weights_fingerprint
from monai_sal_app.models.sources import LoadedModel
from monai_sal_app.models.train import predict_probabilities
from monai_sal_app.saliency import explain
from monai_sal_app.saliency.postprocess import postprocess

__all__ = [
    "BLOCKS_FOLDER",
    "EVALUATE_BLOCK",
    "MAPS_COLUMNS",
    "TIMINGS_COLUMNS",
    "evaluate_maps",
    "explain_items",
    "failures",
    "map_seconds",
    "mean_mask_rows",
]

Log = Callable[[str], None]

BLOCKS_FOLDER = "blocks"  # under a workflow's output folder: the rows of each finished block
EVALUATE_BLOCK = 16  # maps scored per block by evaluate_maps
READ_ERRORS = (ValueError, OSError, RuntimeError)  # what reading a file raises (a bundle's transforms: RuntimeError)

MAPS_COLUMNS = [
    "id",
    "image",
    "mask",
    "label",
    "subtype",
    "method",
    "postprocess",
    "target",
    "predicted",
    "probability",
    "map",
    "overlay",
    "error",
]
TIMINGS_COLUMNS = ["id", "method", "seconds_per_image"]


def explain_items(
    source: LoadedModel,
    items: list[dict],
    out: str | Path,
    *,
    methods: Sequence[str] = ("gradcam",),
    params: dict[str, dict[str, Any]] | None = None,
    target: int | None = None,
    postprocess_steps: Sequence[str] = (),
    batch_size: int = 16,
    overlays: int = 8,
    workers: int = 2,
    progress: bool = True,
    log: Log | None = None,
) -> Path:
    """Explain every item with every method; write maps, overlays, ``maps.csv`` and ``timings.csv``
    under ``out``.

    ``source``: the classifier (``models.sources.load_model_source`` for any source, ``in_memory``
    for a network at hand); each image becomes its input as the source takes it
    (``LoadedModel.read_input``: a bundle's own preprocessing, or min-max and resize), read by
    ``workers`` processes ahead of the computation (0: read in this process when needed), and
    each map returns to the image's grid the same way.

    ``postprocess_steps`` (e.g. ``("abs",)``, see ``saliency.postprocess``) are applied to the raw
    maps before they are written, and recorded in the ``postprocess`` column.

    Maps are NIfTI float32 on each input's own grid and affine: ``out/maps/<method>/<id>.nii.gz``.
    The first ``overlays`` items of each method also get ``out/overlays/<method>/<id>.png``.
    Returns the path of ``maps.csv`` (columns :data:`MAPS_COLUMNS`, one row per item and method,
    in the items' order within each block of ``batch_size`` items, method by method), the input
    of ``evaluate``; an item whose image (or, for an overlay, mask) cannot be read has rows with
    empty ``map`` and its reason in ``error``. ``timings.csv`` (:data:`TIMINGS_COLUMNS`) holds
    each map's wall time (the block's time per image, in seconds).

    Resumable (module docstring): a rerun with the same source, items and settings computes only
    the blocks missing from ``out/blocks/``; with other ones it starts again. Under ``torchrun``
    the blocks are dealt to the ranks and rank 0 writes the tables: the rows and the maps are
    those of one process. ``log``: where the closing count (computed now, kept, failed) goes.
    """
    out = Path(out)
    params = params or {}
    model = source.network
    n_blocks = -(-len(items) // batch_size)
    settings = {
        "model": {"kind": source.kind, "path": str(source.path), "weights": weights_fingerprint(model)},
        "items": json_digest(items),
        "methods": list(methods),
        "params": _described(params),
        "target": target,
        "postprocess": list(postprocess_steps),
        "batch_size": batch_size,
        "overlays": overlays,
    }
    blocks, todo = _resumed_blocks(out, settings, n_blocks, written=(out / "maps", out / "overlays"))

    def read_block(block: int) -> list[dict]:
        entries = []
        for index in range(block * batch_size, min(len(items), (block + 1) * batch_size)):
            item = items[index]
            try:
                entry: dict = {"input": source.read_input(item["image"])}
                if index < overlays:
                    entry["image"] = read_image(item["image"])[0]
                    entry["mask"] = read_image(item["mask"], allow_constant=True)[0] > 0.5 if item.get("mask") else None
            except READ_ERRORS as error:
                entry = {"error": _one_line(error)}
            entries.append(entry)
        return entries

    def explain_block(block: int, entries: list[dict]) -> list[dict]:
        first = block * batch_size
        chunk = items[first : first + len(entries)]
        read = [k for k, entry in enumerate(entries) if "error" not in entry]
        prepared = {k: source.restorable(entries[k]["input"]) for k in read}
        if read:
            x = torch.cat([prepared[k].input for k in read])
            probabilities = predict_probabilities(model, x)
            predicted = torch.from_numpy(source.card.predict(probabilities))
            targets = predicted if target is None else torch.full_like(predicted, int(target))
        rows: list[dict] = []
        for method in methods:
            if read:
                t0 = time.perf_counter()
                maps = postprocess(
                    explain(model, x, method, target=targets, **params.get(method, {})), postprocess_steps
                ).cpu()
                per_image = (time.perf_counter() - t0) / len(read)
            for k, item in enumerate(chunk):
                row = {
                    "id": item["id"],
                    "image": item["image"],
                    "mask": item.get("mask") or "",
                    "label": "" if item.get("label") is None else item["label"],
                    "subtype": item.get("subtype", ""),
                    "method": method,
                    "postprocess": "+".join(postprocess_steps),
                }
                if k not in prepared:
                    rows.append({**row, "map": "", "overlay": "", "error": entries[k]["error"]})
                    continue
                j = read.index(k)
                saliency = prepared[k].restore(maps[j : j + 1])
                map_path = write_nifti(
                    saliency, out / "maps" / method / f"{item['id']}.nii.gz", affine=prepared[k].affine
                )
                overlay = ""
                if "image" in entries[k]:
                    title = (
                        f"{item['id']} {method} target={int(targets[j])} p={float(probabilities[j, targets[j]]):.2f}"
                    )
                    overlay = str(
                        save_overlay(
                            entries[k]["image"], saliency, out / "overlays" / method / f"{item['id']}.png",
                            entries[k]["mask"], title,
                        )
                    )  # fmt: skip
                rows.append(
                    {
                        **row,
                        "target": int(targets[j]),
                        "predicted": int(predicted[j]),
                        "probability": float(probabilities[j, targets[j]]),
                        "map": str(map_path),
                        "overlay": overlay,
                        "error": "",
                        "seconds_per_image": per_image,
                    }
                )
        return rows

    for block, entries in tqdm(
        distributed.read_ahead(todo, read_block, workers),
        total=len(todo),
        desc="explaining",
        disable=not progress or not distributed.is_main(),
        leave=False,
    ):
        blocks.write(block, explain_block(block, entries))
    path = out / "maps.csv"
    failed = _finish(blocks, n_blocks, {path: MAPS_COLUMNS, out / "timings.csv": TIMINGS_COLUMNS})
    computed = sum(distributed.all_gather(sum(min(len(items), (b + 1) * batch_size) - b * batch_size for b in todo)))
    if log is not None and distributed.is_main():
        log(
            f"{len(items)} images x {len(methods)} method(s): {computed} computed now, {len(items) - computed} "
            f"kept from an earlier run, {failed // max(1, len(methods))} could not be read"
        )
    return path


def evaluate_maps(
    maps_csv: str | Path,
    out: str | Path,
    *,
    extra_rows: Sequence[dict] = (),
    workers: int = 2,
    log: Log = print,
) -> tuple[list[dict], list[dict]]:
    """Localization metrics of every map that has a mask; per-image CSV and summary tables.

    Writes ``per_image.csv`` (one row per map with a mask: ``id``, ``method``, ``subtype``, the
    ``metrics.localization.localization_metrics``, ``error``) and ``summary.{csv,md}`` (mean and
    95% CI per method, over the rows without an error) under ``out``. A map or mask that cannot
    be read gives a row with its reason in ``error`` and no metrics. ``extra_rows`` are per-image
    rows computed elsewhere (e.g. a baseline map) added as they are. The maps are read and scored
    by ``workers`` processes, in blocks of :data:`EVALUATE_BLOCK` that are dealt to the ranks
    under ``torchrun`` and kept in ``out/blocks/`` (resumable, module docstring); rank 0 writes
    the tables. Returns the per-image rows and the summary.
    """
    maps_csv, out = Path(maps_csv), Path(out)
    with open(maps_csv, newline="") as f:
        entries = list(csv.DictReader(f))
    if not entries:
        raise ValueError(f"{maps_csv}: no maps listed")
    missing = {"id", "map", "mask", "method"} - set(entries[0])
    if missing:
        raise ValueError(f"{maps_csv}: missing column(s) {sorted(missing)}")
    masked = [e for e in entries if e["mask"] and not e.get("error")]
    n_blocks = -(-len(masked) // EVALUATE_BLOCK)
    blocks, todo = _resumed_blocks(out, {"maps": hashlib.sha256(maps_csv.read_bytes()).hexdigest()}, n_blocks)

    def evaluate_block(block: int) -> list[dict]:
        rows = []
        for e in masked[block * EVALUATE_BLOCK : (block + 1) * EVALUATE_BLOCK]:
            row = {"id": e["id"], "method": e["method"], "subtype": e.get("subtype", "")}
            try:
                saliency, _ = read_image(e["map"], allow_constant=True)
                mask = read_image(e["mask"], allow_constant=True)[0] > 0.5
                rows.append({**row, **localization_metrics(saliency, mask), "error": ""})
            except READ_ERRORS as error:
                rows.append({**row, "error": _one_line(error)})
        return rows

    for block, rows in distributed.read_ahead(todo, evaluate_block, workers):
        blocks.write(block, rows)
    distributed.barrier()
    rows = [row for block in range(n_blocks) for row in blocks.rows(block)]
    _check_finished(blocks, n_blocks)
    scored = [{k: v for k, v in row.items() if k != "error"} for row in rows if not row["error"]]
    scored += list(extra_rows)
    if not scored:
        raise ValueError(f"{maps_csv}: no map has a mask to compare with" + (" that could be read" if rows else ""))
    summary = summarize(scored, group_by="method")
    rows = _error_last(rows) + list(extra_rows)
    if distributed.is_main():
        write_csv(rows, out / "per_image.csv")
        write_table(summary, out, "summary")
        log(f"evaluated {len(scored)} maps -> {out / 'summary.md'}")
    distributed.barrier()
    return rows, summary


def map_seconds(maps_csv: str | Path) -> dict[tuple[str, str], float]:
    """Each map's wall time in seconds, by (id, method), from the ``timings.csv`` beside a
    ``maps.csv`` (:func:`explain_items`)."""
    with open(Path(maps_csv).with_name("timings.csv"), newline="") as handle:
        return {(row["id"], row["method"]): float(row["seconds_per_image"]) for row in csv.DictReader(handle)}


def failures(table: str | Path) -> list[dict]:
    """The rows of a workflow's table (``maps.csv``, ``per_image.csv``) whose ``error`` is not empty."""
    with open(table, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("error")]


# ------------------------------------------------------------------------------------------------
# blocks kept on disk
# ------------------------------------------------------------------------------------------------


class _Blocks:
    """The rows of finished blocks in ``folder``: ``block<b>.json`` when every row is fine,
    ``block<b>.failed.json`` when one has an error (computed again by a rerun); each written whole."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, block: int, failed: bool) -> Path:
        return self.folder / f"block{block:06d}{'.failed' if failed else ''}.json"

    def finished(self) -> set[int]:
        """The blocks whose rows are all fine."""
        return {int(path.name[5:11]) for path in self.folder.glob("block??????.json")}

    def write(self, block: int, rows: list[dict]) -> None:
        failed = any(row.get("error") for row in rows)
        write_text(self._path(block, failed), json.dumps(json_safe(rows)))
        self._path(block, not failed).unlink(missing_ok=True)

    def rows(self, block: int) -> list[dict]:
        """The rows of ``block``; [] when it was not written."""
        for failed in (False, True):
            if self._path(block, failed).is_file():
                return json.loads(self._path(block, failed).read_text())
        return []

    def has(self, block: int) -> bool:
        return self._path(block, False).is_file() or self._path(block, True).is_file()


def _resumed_blocks(
    out: Path, settings: dict, n_blocks: int, written: Sequence[Path] = ()
) -> tuple[_Blocks, list[int]]:
    """The finished blocks of ``out`` and this rank's blocks still to compute.

    ``settings`` describe the work (JSON); when ``out/blocks/settings.json`` holds other ones,
    the blocks kept there are removed and everything is computed again. Rank 0 also removes the
    temporary files a killed run left in ``out/blocks`` and the ``written`` folders."""
    blocks = _Blocks(out / BLOCKS_FOLDER)
    record = blocks.folder / "settings.json"
    described = json.dumps(json_safe(settings), sort_keys=True, default=str)
    if distributed.is_main():
        for folder in (blocks.folder, *written):
            remove_stale_temporaries(folder)
        if record.is_file() and record.read_text() != described:
            for old in blocks.folder.glob("block*.json"):
                old.unlink()
        write_text(record, described)
    distributed.barrier()
    finished = blocks.finished()
    return blocks, [block for block in distributed.shard(n_blocks) if block not in finished]


def _check_finished(blocks: _Blocks, n_blocks: int) -> None:
    missing = [block for block in range(n_blocks) if not blocks.has(block)]
    if missing:
        raise RuntimeError(f"{blocks.folder}: blocks {missing[:5]} were not computed by any rank")


def _finish(blocks: _Blocks, n_blocks: int, tables: Mapping[Path, Sequence[str]]) -> int:
    """Once every rank is done, rank 0 writes each of ``tables`` (path -> its columns) from the
    blocks' rows in block order, one block at a time; returns the number of rows with an error."""
    distributed.barrier()
    _check_finished(blocks, n_blocks)
    failed = 0
    if distributed.is_main():
        with ExitStack() as stack:
            writers = []
            for path, columns in tables.items():
                handle = stack.enter_context(
                    open(stack.enter_context(atomic_path(path)), "w", newline="", encoding="utf-8")
                )
                writers.append(csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore"))
                writers[-1].writeheader()
            for block in range(n_blocks):
                for row in blocks.rows(block):
                    failed += bool(row.get("error"))
                    for writer in writers:
                        writer.writerow(row)
    distributed.barrier()
    return distributed.broadcast(failed)


def _error_last(rows: list[dict]) -> list[dict]:
    """``rows`` with the same keys, ``error`` last, whether or not the first row has an error."""
    keys = [key for key in dict.fromkeys(k for row in rows for k in row) if key != "error"] + ["error"]
    return [{key: row.get(key) for key in keys} for row in rows]


def _described(params: Mapping[str, Mapping[str, Any]]) -> dict:
    """Methods' parameters as JSON: a network among them (a trained explainer) by its weights."""
    return {
        method: {
            name: {"weights": weights_fingerprint(value)} if isinstance(value, torch.nn.Module) else value
            for name, value in values.items()
        }
        for method, values in params.items()
    }


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def mean_mask_rows(train_items: list[dict], test_items: list[dict]) -> list[dict]:
    """Per-image metrics of the baseline map 'mean training mask' (METHODS.md) on the test masks."""
    baseline = mean_training_mask(train_items)
    if baseline is None:
        return []
    rows = []
    for item in test_items:
        if item.get("mask"):
            mask = read_image(item["mask"], allow_constant=True)[0] > 0.5
            row = {"id": item["id"], "method": "baseline_mean_mask", "subtype": item.get("subtype", "")}
            row.update(localization_metrics(baseline, mask))
            rows.append(row)
    return rows
