"""The batch workflows behind the CLI: train, explain and evaluate over a manifest, and the demo.

Each step reads and writes files a user can open (NIfTI maps on the input grid, CSV tables,
Markdown, PNG overlays), so the steps can also be run one by one from the command line.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from monai_sal_app import distributed
from monai_sal_app.data.io import read_image, write_nifti
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.experiments.report import save_overlay, write_table
from monai_sal_app.inference import preprocess, resize_to
from monai_sal_app.metrics.localization import localization_metrics
from monai_sal_app.metrics.stats import summarize, write_csv
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.checkpoint import save_classifier
from monai_sal_app.models.device import default_device
from monai_sal_app.models.factory import build_classifier
from monai_sal_app.models.train import (
    choose_decision_threshold,
    evaluate_classifier,
    predict_probabilities,
    train_classifier,
)
from monai_sal_app.saliency import explain
from monai_sal_app.saliency.postprocess import postprocess

__all__ = ["evaluate_maps", "explain_items", "load_inputs", "read_items", "train_from_manifest"]

Log = Callable[[str], None]


def read_items(source: str | Path | Sequence[str | Path]) -> list[dict]:
    """Items from a manifest CSV, or from image files given one by one (no labels, no masks)."""
    if isinstance(source, (str, Path)) and str(source).endswith(".csv"):
        return read_manifest(source)
    paths = [source] if isinstance(source, (str, Path)) else list(source)
    items = []
    for p in paths:
        p = Path(p)
        name = p.name
        for suffix in (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".dcm"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        items.append({"id": name, "image": str(p.resolve()), "label": None, "subtype": "", "mask": None})
    return items


def load_inputs(
    items: list[dict], input_size: Sequence[int] | None = None, progress: bool = True
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Model inputs (N, 1, *input_size) for ``items`` via :func:`preprocess`.

    ``input_size`` defaults to the first image's shape. Errors name the offending item.
    """
    tensors = []
    for item in tqdm(items, desc="loading", disable=not progress, leave=False):
        try:
            array, _ = read_image(item["image"])
            if input_size is None:
                input_size = tuple(array.shape)
            tensors.append(preprocess(array, input_size))
        except ValueError as err:
            raise ValueError(f"{item['id']}: {err}") from err
    if not tensors:
        raise ValueError("no images to load")
    return torch.cat(tensors), tuple(int(s) for s in input_size)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(len(idx) * val_fraction)))
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train)), np.sort(np.array(val))


def train_from_manifest(
    manifest: str | Path,
    out: str | Path,
    *,
    arch: str = "conv5fc3",
    arch_kwargs: dict | None = None,
    loss: str = "ce",
    augmentations: Sequence[str] = (),
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    patience: int = 5,
    val_fraction: float = 0.2,
    labels: Sequence[str] | None = None,
    test_manifest: str | Path | None = None,
    input_size: int | Sequence[int] | None = None,
    head: dict | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    log: Log = print,
) -> tuple[torch.nn.Module, ModelCard]:
    """Train a classifier on a manifest and save ``out`` (state_dict) + its model card (``.json``).

    A stratified ``val_fraction`` of the manifest is held out for validation AUC, balanced
    accuracy and early stopping. For two classes the decision threshold on P(class 1) that
    maximises validation balanced accuracy is recorded in the card (``decision_threshold``) and
    used for every prediction. ``test_manifest``, when given, is scored once at the end (AUC,
    balanced accuracy and accuracy at that threshold, ``n_test``).
    ``input_size``: the network's input grid in pixels/voxels (one int for every axis, or one per
    axis); images are resized to it (:func:`preprocess`). Default: the first image's shape.
    ``arch_kwargs``: the network's own options (``build_classifier``'s keywords, e.g. a ResNet's
    ``block_inplanes``), kept in the card. ``head``: None for the architecture's own classifier, or
    ``{"name": "wildcat", ...options}`` for a WILDCAT head (``models.wildcat``; options not given
    take their defaults, all in the card).
    """
    items = read_manifest(manifest)
    if isinstance(input_size, int):
        input_size = (input_size,) * read_image(items[0]["image"])[0].ndim
    if input_size is not None and (len(input_size) not in (2, 3) or min(input_size) < 1):
        raise ValueError(f"input_size must give 2 or 3 positive sides, got {input_size!r}")
    x, input_size = load_inputs(items, input_size, progress=progress)
    y = torch.tensor([int(i["label"]) for i in items])
    num_classes = int(y.max()) + 1
    if num_classes < 2:
        raise ValueError(f"{manifest}: a classifier needs at least two classes, found labels {sorted(set(y.tolist()))}")
    train_idx, val_idx = stratified_split(y.numpy(), val_fraction, seed)
    card = ModelCard(  # validated before the training, completed after it
        architecture=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        spatial_dims=len(input_size),
        in_channels=1,
        num_classes=num_classes,
        labels=tuple(labels) if labels else tuple(f"class_{c}" for c in range(num_classes)),
        input_size=tuple(input_size),
        head=head,
        loss=loss,
        augmentations=tuple(augmentations),
        data={
            "manifest": str(Path(manifest).resolve()),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            **({"test_manifest": str(Path(test_manifest).resolve())} if test_manifest is not None else {}),
        },
    )
    torch.manual_seed(seed)
    model = build_classifier(
        arch, spatial_dims=len(input_size), in_channels=1, num_classes=num_classes, head=card.head, **card.arch_kwargs
    )
    dev = torch.device(device) if device else default_device()
    model, history = train_classifier(
        model,
        x[train_idx],
        y[train_idx],
        x[val_idx],
        y[val_idx],
        loss=loss,
        augmentations=tuple(augmentations),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        seed=seed,
        device=dev,
        progress=progress,
        log=log,
    )
    best = max(history, key=lambda h: (np.nan_to_num(h["val_auc"], nan=-1.0), -h["epoch"]))
    threshold = choose_decision_threshold(predict_probabilities(model, x[val_idx]), y[val_idx])
    val = evaluate_classifier(model, x[val_idx], y[val_idx], decision_threshold=threshold)
    metrics: dict[str, Any] = {
        "val_auc": val["auc"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "best_epoch": best["epoch"],
    }
    if test_manifest is not None:
        test_items = read_manifest(test_manifest)
        tx, _ = load_inputs(test_items, input_size, progress=progress)
        ty = torch.tensor([int(i["label"]) for i in test_items])
        test = evaluate_classifier(model, tx, ty, decision_threshold=threshold)
        metrics.update({f"test_{k}": v for k, v in test.items()})
        metrics["n_test"] = len(test_items)
    card = card.replace(
        decision_threshold=threshold,
        training={"epochs_run": len(history), "batch_size": batch_size, "lr": lr, "seed": seed},
        metrics=metrics,
        history=tuple(history),
    )
    save_classifier(model, out, card)
    log(
        f"saved {out} ({arch}{' + WILDCAT head' if card.head else ''}, {len(input_size)}D, input {input_size}); "
        + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    )
    return model, card


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
    model: torch.nn.Module,
    card: ModelCard,
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
        arrays, metas = [], []
        for item in chunk:
            array, meta = read_image(item["image"])
            arrays.append(array)
            metas.append(meta)
        x = torch.cat([preprocess(a, card.input_size) for a in arrays])
        probabilities = predict_probabilities(model, x)
        predicted = torch.from_numpy(card.predict(probabilities))
        targets = predicted if target is None else torch.full_like(predicted, int(target))
        for method in methods:
            t0 = time.perf_counter()
            maps = postprocess(
                explain(model, x, method, target=targets, **params.get(method, {})), postprocess_steps
            ).cpu()
            per_image = (time.perf_counter() - t0) / len(chunk)
            for k, item in enumerate(chunk):
                saliency = resize_to(maps[k : k + 1], arrays[k].shape)[0, 0].numpy()
                map_path = write_nifti(
                    saliency, out / "maps" / method / f"{item['id']}.nii.gz", affine=metas[k]["affine"]
                )
                overlay = ""
                if start + k < overlays:
                    mask = read_image(item["mask"], allow_constant=True)[0] > 0.5 if item.get("mask") else None
                    title = (
                        f"{item['id']} {method} target={int(targets[k])} p={float(probabilities[k, targets[k]]):.2f}"
                    )
                    overlay = str(
                        save_overlay(arrays[k], saliency, out / "overlays" / method / f"{item['id']}.png", mask, title)
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


def mean_training_mask(train_items: list[dict]) -> np.ndarray | None:
    """The baseline map 'mean training mask' (METHODS.md): the fraction of the items' masks that
    cover each pixel/voxel, in [0, 1], on the masks' grid ((H, W) or (D, H, W)); None when no item
    has a mask."""
    from monai_sal_app.metrics.localization import mean_mask_baseline

    masks = [read_image(i["mask"], allow_constant=True)[0] > 0.5 for i in train_items if i.get("mask")]
    return mean_mask_baseline(masks) if masks else None


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


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)
    return path
