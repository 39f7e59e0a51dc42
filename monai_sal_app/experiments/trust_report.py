"""``monai-sal trust``: the trust card of one checkpoint on a manifest, and its report.

:func:`run_trust` loads the model and up to ``max_images`` images (with their labels and masks)
at the model's input size, runs ``evaluation.trust.trust_card``, writes ``<model>.trust.json``
beside the checkpoint and a report folder: ``trust.md`` (each method's answers in words, and one
table of answers and numbers), ``trust.json`` (a copy of the card) and ``figures/``: every
method's retention share per cascading-randomization state, the maps of two images at every
state, and the fidelity curves. Localization is scored on the model's input grid (masks resized to
it), against the mean training mask when training data with masks is given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_sal_app import distributed
from monai_sal_app.evaluation.inputs import mean_mask_on_grid, read_trust_inputs
from monai_sal_app.evaluation.randomization import RETENTION_CUT, randomized_models
from monai_sal_app.evaluation.trust import (
    DEFAULT_CHECKS,
    DEFAULT_TRUST_METHODS,
    SCHEMA_VERSION,
    check_lines,
    trust_card,
    write_trust_card,
)
from monai_sal_app.experiments.report import pyplot, save_figure
from monai_sal_app.files import json_digest, json_safe, remove_stale_temporaries, write_text
from monai_sal_app.metrics.stats import to_markdown
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.checkpoint import weights_fingerprint
from monai_sal_app.models.inputs import read_items
from monai_sal_app.models.sources import load_model_source
from monai_sal_app.models.train import predict_probabilities
from monai_sal_app.saliency import available_methods, explain
from monai_sal_app.version import __version__

__all__ = [
    "PARTS_FOLDER",
    "fidelity_figure",
    "merge_trust_cards",
    "randomization_figure",
    "run_trust",
    "summary_rows",
    "trust_card_part",
    "write_trust_outputs",
    "write_trust_report",
]

EXAMPLE_IMAGES = 2  # images whose maps are drawn at every randomization state
PARTS_FOLDER = "parts"  # under a report folder: each method's finished entry, kept for a rerun


def _check_comparable(card: ModelCard, other: ModelCard, path: str) -> None:
    for field in ("labels", "input_size", "spatial_dims", "in_channels"):
        if getattr(card, field) != getattr(other, field):
            raise ValueError(
                f"{path}: cannot compare with a model of other {field} ({getattr(other, field)} vs {getattr(card, field)})"
            )


def run_trust(
    model_path: str | Path,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    checks: Sequence[str] = DEFAULT_CHECKS,
    compare_with: Sequence[str | Path] = (),
    max_images: int | None = 32,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
    train_data: str | Path | None = None,
    fidelity_replacement: str = "zero",
    workers: int = 2,
) -> dict:
    """Trust card of the model at ``model_path`` (any ``models.sources`` source: our checkpoint, a
    bundle folder, TorchScript, a factory) on ``data`` (a manifest, image files or a folder of
    them); returns it.

    Writes ``<model>.trust.json`` beside the model and the report under ``out``
    (:func:`write_trust_report`). ``compare_with``: checkpoints of other trained models of the same
    labels and input size (repeatability; compared by their cards' test ROC AUCs when every card has
    one). ``train_data``: the training manifest; its masks'
    mean, on the model's input grid, is the map localization is judged against (chance without
    it). The class explained is the model's prediction with its card's decision threshold. The
    images are read by ``workers`` processes (``evaluation.inputs.read_trust_inputs``); those
    that cannot be read are left out and listed in the card's ``data.unreadable``. Under
    ``torchrun`` the methods are shared out among the ranks and rank 0 writes the card and the
    report. Resumable: each method's entry is kept in ``out/parts/`` as soon as it is computed,
    and a rerun with the same model weights, data and settings computes only the methods missing
    there (with other ones it starts again); the card's ``kept_methods`` lists those it took from
    there. :func:`trust_card_part`, :func:`merge_trust_cards` and :func:`write_trust_outputs` do
    the same in pieces, some of the methods in each process.
    """
    result, model, images, targets = _computed_card(
        model_path, data, methods, checks, compare_with, max_images, seed, device, progress, train_data,
        fidelity_replacement, workers, kept=Path(out) / PARTS_FOLDER,
    )  # fmt: skip
    if distributed.is_main():
        write_trust_card(result, model_path)
        write_trust_report(result, out, model=model, images=images[:EXAMPLE_IMAGES], targets=targets[:EXAMPLE_IMAGES])
    distributed.barrier()
    return result


def trust_card_part(
    model_path: str | Path,
    data: str | Path | Sequence[str | Path],
    methods: Sequence[str],
    *,
    checks: Sequence[str] = DEFAULT_CHECKS,
    compare_with: Sequence[str | Path] = (),
    max_images: int | None = 32,
    seed: int = 0,
    device: str | None = None,
    train_data: str | Path | None = None,
    fidelity_replacement: str = "zero",
    workers: int = 2,
) -> dict:
    """The trust card :func:`run_trust` computes with the same arguments, for ``methods`` only and
    written nowhere: parts computed apart (e.g. in two processes) give the whole card through
    :func:`merge_trust_cards`."""
    return _computed_card(
        model_path, data, methods, checks, compare_with, max_images, seed, device, False, train_data,
        fidelity_replacement, workers,
    )[0]  # fmt: skip


def merge_trust_cards(parts: Sequence[dict], order: Sequence[str] = ()) -> dict:
    """One card from parts of the same model, images and settings that explain different methods
    (:func:`trust_card_part`), the methods in ``order`` (those it does not name after, in the
    parts' order); ``seconds`` is their sum (the time spent on the card) and ``created`` the
    latest. ``ValueError`` for parts that do not fit."""
    if not parts:
        raise ValueError("no trust card parts to merge")
    merged = {key: value for key, value in parts[0].items() if key != "methods"}
    merged["methods"] = {}
    for part in parts:
        for key in ("schema", "data", "reading"):
            if part[key] != merged[key]:
                raise ValueError(f"trust card parts differ in {key!r}: they are not parts of one card")
        if {k: v for k, v in part["settings"].items() if k != "methods"} != {
            k: v for k, v in merged["settings"].items() if k != "methods"
        }:
            raise ValueError("trust card parts differ in their settings: they are not parts of one card")
        twice = set(part["methods"]) & set(merged["methods"])
        if twice:
            raise ValueError(f"methods {sorted(twice)} are in more than one trust card part")
        merged["methods"].update(part["methods"])
    rank = {method: k for k, method in enumerate(order)}
    ordered = sorted(merged["methods"], key=lambda method: rank.get(method, len(rank)))  # stable: parts' order
    merged["methods"] = {method: merged["methods"][method] for method in ordered}
    merged["settings"] = {**merged["settings"], "methods": ordered}
    merged["seconds"] = sum(part["seconds"] for part in parts)
    merged["created"] = max(part["created"] for part in parts)
    return merged


def write_trust_outputs(
    card: dict,
    model_path: str | Path,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    device: str | None = None,
) -> None:
    """Write ``card`` (of the model at ``model_path`` on ``data``, e.g. :func:`merge_trust_cards`'s)
    beside the model and its report under ``out``, as :func:`run_trust` does; the report's example
    maps are drawn again from the card's first images, read from ``data``."""
    source = load_model_source(model_path, device=device)
    wanted = card["data"]["images"][:EXAMPLE_IMAGES]
    items = [item for item in read_items(data) if item["id"] in wanted]
    inputs = read_trust_inputs(items, source.card, source=source)
    targets = torch.from_numpy(source.card.predict(predict_probabilities(source.network, inputs.images)))
    write_trust_card(card, model_path)
    write_trust_report(card, out, model=source.network, images=inputs.images, targets=targets)


class _KeptEntries:
    """Each finished method's card entry in ``folder`` (``<method>.json``, written whole), for the
    work ``settings`` describe (recorded in ``settings.json``; entries of other work are removed)."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder = folder
        record = folder / "settings.json"
        described = json.dumps(json_safe(settings), sort_keys=True, default=str)
        if distributed.is_main():
            remove_stale_temporaries(folder)
            if record.is_file() and record.read_text() != described:
                for old in folder.glob("*.json"):
                    old.unlink()
            write_text(record, described)
        distributed.barrier()

    def _path(self, method: str) -> Path:
        if method not in available_methods():  # a name from the command line never becomes a path
            raise ValueError(f"unknown method {method!r}")
        return self.folder / f"{method}.json"

    def entries(self, methods: Sequence[str]) -> dict[str, dict]:
        """``{method: entry}`` of ``methods`` kept here (an unreadable file counts as missing)."""
        kept = {}
        for method in methods:
            try:
                kept[method] = json.loads(self._path(method).read_text())
            except (OSError, ValueError):
                continue
        return kept

    def keep(self, method: str, entry: dict) -> None:
        write_text(self._path(method), json.dumps(json_safe(entry)))


def _computed_card(
    model_path, data, methods, checks, compare_with, max_images, seed, device, progress, train_data,
    fidelity_replacement, workers, kept: Path | None = None,
) -> tuple[dict, torch.nn.Module, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(card, model, images, targets) for :func:`run_trust` and :func:`trust_card_part`; with
    ``kept``, the folder of the entries kept for a rerun (:class:`_KeptEntries`)."""
    source = load_model_source(model_path, device=device)
    model, card = source.network, source.card
    if isinstance(model, torch.jit.ScriptModule) and "randomization" in checks:
        raise ValueError(
            "the randomization check re-initialises the network's layers, which a TorchScript module does not "
            "expose: run it on the eager model, or choose --checks fidelity,localization"
        )
    others, aucs = {}, {"model": card.metrics.get("test_auc")}
    for path in compare_with:
        other = load_model_source(path, device=device)
        _check_comparable(card, other.card, str(path))
        others[Path(path).stem] = other.network
        aucs[Path(path).stem] = other.card.metrics.get("test_auc")
    items = read_items(data)
    inputs = read_trust_inputs(items, card, max_images, progress=progress, source=source, workers=workers)
    images, labels, masks = inputs.images, inputs.labels, inputs.masks
    prior = None if train_data is None else mean_mask_on_grid(read_items(train_data), card.input_size)
    targets = torch.from_numpy(card.predict(predict_probabilities(model, images)))
    described = {
        "source": str(Path(data).resolve()) if isinstance(data, (str, Path)) else f"{len(items)} image files",
        "first_images": len(images) + len(inputs.unreadable),
        "images": inputs.ids,
        "checkpoint": Path(model_path).name,
    }
    if inputs.unreadable:
        described["unreadable"] = inputs.unreadable
    if train_data is not None:
        described["train_masks"] = str(Path(train_data).resolve())
    methods = list(methods or DEFAULT_TRUST_METHODS)
    store, done = None, {}
    if kept is not None:
        store = _KeptEntries(
            kept,
            {
                "schema": SCHEMA_VERSION,
                "monai_sal_version": __version__,
                "model": {"kind": source.kind, "path": str(source.path), "weights": weights_fingerprint(model)},
                "compare_with": {name: weights_fingerprint(network) for name, network in others.items()},
                "items": json_digest(items[:max_images] if max_images else items),
                "data": described,
                "checks": list(checks),
                "seed": seed,
                "fidelity_replacement": fidelity_replacement,
            },
        )
        done = store.entries(methods)
    result = trust_card(
        model,
        images,
        labels=labels,
        masks=masks,
        methods=methods,
        checks=checks,
        seed=seed,
        targets=targets,
        compare_with=others or None,
        data=described,
        mask_prior=prior,
        fidelity_replacement=fidelity_replacement,
        aucs=aucs if all(auc is not None for auc in aucs.values()) else None,
        done=done,
        on_entry=None if store is None else store.keep,
    )
    if done:
        result["kept_methods"] = [method for method in methods if method in done]
    return result, model, images, targets


def summary_rows(card: dict) -> list[dict]:
    """One row per method: each check's answer and its headline number."""
    rows = []
    for method, entry in card["methods"].items():
        row = {"method": method}
        if "randomization" in entry:
            retention = entry["randomization"]["retention"]
            row["depends on what the model learned"] = entry["randomization"]["verdict"]
            row["retention share"] = retention["mean"]
            row["retention CI"] = _ci_text(retention)
        if "fidelity" in entry:
            f = entry["fidelity"]
            row["tracks what the model uses"] = f["verdict"]
            row["fidelity"] = f["mean"]
        localization = entry.get("localization", {})
        if "roc_auc" in localization:
            row["localizes beyond usual places"] = localization["verdict"]
            row["ROC AUC"] = localization["roc_auc"]["mean"]
            row["ROC AUC gain"] = localization["roc_auc_gain"]["mean"]
        if "repeatability" in entry:
            row["comes back"] = entry["repeatability"]["verdict"]
        row["ms per map"] = 1000 * entry["seconds_per_map"]
        rows.append(row)
    return rows


def _ci_text(interval: dict) -> str:
    low, high = interval.get("ci_low"), interval.get("ci_high")
    return "" if low is None or high is None else f"[{low:.2f}, {high:.2f}]"


def write_trust_report(
    card: dict,
    out: str | Path,
    model: torch.nn.Module | None = None,
    images: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> Path:
    """``trust.md``, ``trust.json`` and ``figures/`` under ``out``; returns the path of ``trust.md``.

    With ``model`` and ``images`` (a few images, (K, C, *spatial)), also draws each method's maps at
    every cascading-randomization state (:func:`evaluation.randomization.randomized_models`).
    """

    out = Path(out)
    figures = out / "figures"
    (out / "trust.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "trust.json").write_text(json.dumps(card, indent=2))
    settings = card["settings"]
    lines = [
        f"# Trust card: {card['data'].get('checkpoint', 'model')}",
        "",
        f"{card['data']['n_images']} images ({card['data'].get('source', '')}), {card['data']['n_masks']} with a mask; "
        f"checks {', '.join(settings['checks'])}; fidelity replacement {settings['fidelity_replacement']}, "
        f"batch-norm statistics {settings['batch_norm_statistics']}, localization against "
        f"{settings['localization_reference']}; computed {card['created']} in {card['seconds']:.0f} s.",
        "",
        f"How to read it: {card['reading']}.",
        "",
    ]
    for method, entry in card["methods"].items():
        lines += [f"**{method}**", ""]
        lines += [f"- {line}" for line in check_lines(entry["checks"])]
        lines += [f"  - why ({check}): {answer['why']}" for check, answer in entry["checks"].items()]
        lines.append("")
    lines += [to_markdown(summary_rows(card)), ""]
    methods = card["methods"]
    entries = {m: e["randomization"] for m, e in methods.items() if "randomization" in e}
    if entries:
        lines += [
            "## Randomization",
            "",
            f"![randomization]({randomization_figure(entries, figures / 'randomization.png').relative_to(out)})",
            "",
        ]
        if model is not None and images is not None:
            reset = settings["batch_norm_statistics"] == "reset"
            for method in methods:
                path = _state_maps_figure(
                    method, methods[method], model, images, targets, settings["seed"], reset, figures
                )
                lines += [f"![{method} states]({path.relative_to(out)})", ""]
    if any("fidelity" in e for e in methods.values()):
        figure = fidelity_figure(methods, figures / "fidelity.png")
        lines += ["## Fidelity", "", f"![fidelity]({figure.relative_to(out)})", ""]
    report = out / "trust.md"
    report.write_text("\n".join(lines))
    return report


def randomization_figure(entries: dict[str, dict], path: Path) -> Path:
    """One panel per method: its retention share per randomized state (mean over images), the
    judged states shaded, the cut between "yes" and "no" dashed, the answer in the title; the PNG
    ``path``. ``entries``: method -> ``RandomizationResult.to_dict()``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(entries), figsize=(3.2 * len(entries), 3.0), squeeze=False)
    for ax, (method, r) in zip(axes[0], entries.items()):
        x = np.arange(len(r["states"]))
        judged = [k for k, name in enumerate(r["states"]) if name in r["judged_states"]]
        ax.axvspan(min(judged) - 0.5, max(judged) + 0.5, color="grey", alpha=0.2, label="judged states")
        ax.axhline(RETENTION_CUT, color="grey", linestyle="--", linewidth=0.8)
        values = [np.nan if v is None else v for v in r["retention"]["per_state"]]
        ax.plot(x, values, marker="o", label="retention share")
        ax.set_xticks(x, r["states"], rotation=60, fontsize=6)
        ax.set_ylim(-0.3, 1.05)
        ax.set_title(f"{method}: depends on the model: {r['verdict']}", fontsize=7)
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def fidelity_figure(methods: dict, path: Path) -> Path:
    """PNG at ``path`` of every method's mean MIF (solid) and LIF (dashed) curve over its images.

    ``methods``: ``{method: {"fidelity": {"fractions": (F,), "mif": (N, F), "lif": (N, F), "score":
    str}}}`` (a trust card's methods; entries without ``"fidelity"`` are skipped); the score is
    dimensionless (``evaluation.fidelity``) and the fractions are of the image's pixels/voxels."""
    plt = pyplot()
    entries = {method: entry["fidelity"] for method, entry in methods.items() if "fidelity" in entry}
    tab20 = plt.get_cmap("tab20").colors  # ten hues, dark then light: one colour per method up to 20
    colours = tab20[::2] + tab20[1::2]
    fig, ax = plt.subplots(figsize=(6.0, 3.2 + 0.1 * max(0, len(entries) - 5)))
    for (method, f), colour in zip(entries.items(), colours):
        ax.plot(f["fractions"], _mean_curve(f["mif"]), color=colour, label=f"{method} MIF")
        ax.plot(f["fractions"], _mean_curve(f["lif"]), linestyle="--", color=colour, label=f"{method} LIF")
    ax.set_xlabel("fraction of pixels/voxels perturbed")
    score = next(iter(entries.values()))["score"]
    ax.set_ylabel(
        {
            "margin": "decision margin / unperturbed",
            "logit_ratio": "target logit / unperturbed",
            "probability": "target probability",
        }.get(score, score)
        + " (mean)"
    )
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, path)


def _mean_curve(curves) -> np.ndarray:
    """Mean over images of (N, F) curves, images without a score (None rows) left out."""
    array = np.asarray([[np.nan if v is None else v for v in row] for row in curves], dtype=float)
    scored = array[np.isfinite(array).all(axis=1)]
    return scored.mean(axis=0) if len(scored) else np.full(array.shape[1], np.nan)


def _middle_slice(map_: np.ndarray) -> np.ndarray:
    return map_[map_.shape[0] // 2] if map_.ndim == 3 else map_


def _state_maps_figure(
    method: str, entry: dict, model, images, targets, seed: int, reset_batch_norm: bool, figures: Path
) -> Path:
    """The maps of the example images for the trained model and every cascading state."""
    plt = pyplot()
    states = [("trained", explain(model, images, method, target=targets))]
    blocks = entry["randomization"]["states"]
    for name, network in randomized_models(model, blocks, seed=seed, reset_batch_norm=reset_batch_norm):
        states.append((name, explain(network, images, method, target=targets)))
    fig, axes = plt.subplots(len(images), len(states), figsize=(1.3 * len(states), 1.4 * len(images)), squeeze=False)
    for column, (name, maps) in enumerate(states):
        for row in range(len(images)):
            ax = axes[row][column]
            ax.imshow(np.abs(_middle_slice(maps[row, 0].cpu().numpy())), cmap="inferno")
            ax.axis("off")
            if row == 0:
                ax.set_title(name, fontsize=5)
    return save_figure(fig, figures / f"states_{method}.png")
