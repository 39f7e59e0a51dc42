"""The batch workflows behind the CLI: explain and evaluate over a manifest.

Each step reads and writes files a user can open (NIfTI maps on the input grid, CSV tables,
Markdown, PNG overlays), so the steps can also be run one by one from the command line.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_sal_app import distributed
from monai_sal_app.data.io import read_image, write_nifti
from monai_sal_app.evaluation.inputs import mean_training_mask
from monai_sal_app.experiments.report import save_overlay, write_table
from monai_sal_app.metrics.localization import localization_metrics
from monai_sal_app.metrics.stats import summarize, write_csv
from monai_sal_app.models.sources import LoadedModel
from monai_sal_app.models.train import (
    predict_probabilities,
)
from monai_sal_app.saliency import explain
from monai_sal_app.saliency.postprocess import postprocess

__all__ = ["evaluate_maps", "explain_items", "mean_mask_rows"]

Log = Callable[[str], None]


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
    "seconds_per_image",
]


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
    progress: bool = True,
) -> Path:
    """Explain every item with every method; write maps, overlays and ``maps.csv`` under ``out``.

    ``source``: the classifier (``models.sources.load_model_source`` for any source, ``in_memory``
    for a network at hand); each image becomes its input as the source takes it
    (``LoadedModel.prepare``: a bundle's own preprocessing, or min-max and resize) and each map
    returns to the image's grid the same way.

    ``postprocess_steps`` (e.g. ``("abs",)``, see ``saliency.postprocess``) are applied to the raw
    maps before they are written, and recorded in the ``postprocess`` column.

    Maps are NIfTI float32 on each input's own grid and affine: ``out/maps/<method>/<id>.nii.gz``.
    The first ``overlays`` items of each method also get ``out/overlays/<method>/<id>.png``.
    Returns the path of ``maps.csv`` (columns :data:`MAPS_COLUMNS`), the input of ``evaluate``.
    Under ``torchrun`` the blocks of ``batch_size`` items are dealt to the ranks
    (``distributed.gather_blocks``) and rank 0 writes ``maps.csv``: the rows and the maps are those
    of one process (``seconds_per_image`` aside).
    """
    out = Path(out)
    params = params or {}

    def explain_block(start: int, stop: int) -> list[dict]:
        rows: list[dict] = []
        chunk = items[start:stop]
        prepared = [source.prepare(item["image"]) for item in chunk]
        x = torch.cat([p.input for p in prepared])
        model = source.network
        probabilities = predict_probabilities(model, x)
        predicted = torch.from_numpy(source.card.predict(probabilities))
        targets = predicted if target is None else torch.full_like(predicted, int(target))
        for method in methods:
            t0 = time.perf_counter()
            maps = postprocess(
                explain(model, x, method, target=targets, **params.get(method, {})), postprocess_steps
            ).cpu()
            per_image = (time.perf_counter() - t0) / len(chunk)
            for k, item in enumerate(chunk):
                saliency = prepared[k].restore(maps[k : k + 1])
                map_path = write_nifti(
                    saliency, out / "maps" / method / f"{item['id']}.nii.gz", affine=prepared[k].affine
                )
                overlay = ""
                if start + k < overlays:
                    mask = read_image(item["mask"], allow_constant=True)[0] > 0.5 if item.get("mask") else None
                    title = (
                        f"{item['id']} {method} target={int(targets[k])} p={float(probabilities[k, targets[k]]):.2f}"
                    )
                    image = read_image(item["image"])[0]
                    overlay = str(
                        save_overlay(image, saliency, out / "overlays" / method / f"{item['id']}.png", mask, title)
                    )
                rows.append(
                    {
                        "id": item["id"],
                        "image": item["image"],
                        "mask": item.get("mask") or "",
                        "label": "" if item.get("label") is None else item["label"],
                        "subtype": item.get("subtype", ""),
                        "method": method,
                        "postprocess": "+".join(postprocess_steps),
                        "target": int(targets[k]),
                        "predicted": int(predicted[k]),
                        "probability": float(probabilities[k, targets[k]]),
                        "map": str(map_path),
                        "overlay": overlay,
                        "seconds_per_image": per_image,
                    }
                )
        return rows

    rows = distributed.gather_blocks(len(items), batch_size, explain_block, "explaining", progress)
    path = out / "maps.csv"
    if distributed.is_main():
        write_csv(rows, path)
    distributed.barrier()
    return path


def evaluate_maps(
    maps_csv: str | Path,
    out: str | Path,
    *,
    extra_rows: Sequence[dict] = (),
    log: Log = print,
) -> tuple[list[dict], list[dict]]:
    """Localization metrics of every map that has a mask; per-image CSV and summary tables.

    Writes ``per_image.csv`` and ``summary.{csv,md}`` (mean and 95% CI per method) under ``out``.
    ``extra_rows`` are per-image rows computed elsewhere (e.g. a baseline map) added as they are.
    Under ``torchrun`` the maps are scored in blocks dealt to the ranks and rank 0 writes the tables.
    """
    with open(maps_csv, newline="") as f:
        entries = list(csv.DictReader(f))
    if not entries:
        raise ValueError(f"{maps_csv}: no maps listed")
    missing = {"id", "map", "mask", "method"} - set(entries[0])
    if missing:
        raise ValueError(f"{maps_csv}: missing column(s) {sorted(missing)}")
    masked = [e for e in entries if e["mask"]]

    def evaluate_block(start: int, stop: int) -> list[dict]:
        rows = []
        for e in masked[start:stop]:
            saliency, _ = read_image(e["map"], allow_constant=True)
            mask = read_image(e["mask"], allow_constant=True)[0] > 0.5
            rows.append({"id": e["id"], "method": e["method"], "subtype": e.get("subtype", "")})
            rows[-1].update(localization_metrics(saliency, mask))
        return rows

    rows = distributed.gather_blocks(len(masked), 16, evaluate_block) + list(extra_rows)
    if not rows:
        raise ValueError(f"{maps_csv}: no map has a mask to compare with")
    out = Path(out)
    summary = summarize(rows, group_by="method")
    if distributed.is_main():
        write_csv(rows, out / "per_image.csv")
        write_table(summary, out, "summary")
        log(f"evaluated {len(rows)} maps -> {out / 'summary.md'}")
    distributed.barrier()
    return rows, summary


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
