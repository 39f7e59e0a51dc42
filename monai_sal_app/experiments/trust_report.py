"""``monai-sal trust``: the trust card of one checkpoint on a manifest, and its report.

:func:`run_trust` loads the model and up to ``max_images`` images (with their labels and masks)
at the model's input size, runs ``evaluation.trust.trust_card``, writes ``<model>.trust.json``
beside the checkpoint and a report folder: ``trust.md`` (one table of verdicts and numbers per
method), ``trust.json`` (a copy of the card) and ``figures/``: the cascading-randomization curve of
every method against its random-pair band, the maps of two images at every randomization state,
and the fidelity curves. Localization is scored on the model's input grid (masks resized to it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_sal_app import distributed
from monai_sal_app.data.io import read_image
from monai_sal_app.evaluation.randomization import randomized_models
from monai_sal_app.evaluation.trust import DEFAULT_CHECKS, DEFAULT_TRUST_METHODS, trust_card, write_trust_card
from monai_sal_app.experiments.report import pyplot, save_figure
from monai_sal_app.experiments.workflows import load_inputs, read_items
from monai_sal_app.inference import resize_to
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.models.train import predict_probabilities
from monai_sal_app.saliency import explain

__all__ = [
    "fidelity_figure",
    "load_trust_inputs",
    "mask_on_grid",
    "randomization_figure",
    "run_trust",
    "summary_rows",
    "write_trust_report",
]

EXAMPLE_IMAGES = 2  # images whose maps are drawn at every randomization state


def load_trust_inputs(
    items: list[dict], card: ModelCard, max_images: int | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, list[np.ndarray | None] | None]:
    """Images (N, 1, *input_size), labels (N,) when every item has one, and masks on the input grid.

    The first ``max_images`` items in manifest order are used. A mask is resized to the input grid
    (bi/trilinear, then ``> 0.5``); items without a mask get None; None when no item has one.
    """
    items = items[:max_images] if max_images else items
    images, _ = load_inputs(items, card.input_size, progress=progress)
    has_label = all(item.get("label") not in (None, "") for item in items)
    labels = torch.tensor([int(item["label"]) for item in items]) if has_label else None
    masks = [mask_on_grid(item, card.input_size) for item in items]
    return images, labels, (masks if any(m is not None for m in masks) else None)


def mask_on_grid(item: dict, input_size: Sequence[int]) -> np.ndarray | None:
    """The item's mask on the model's input grid, bool ``input_size``: resized bi/trilinearly, then
    ``> 0.5``; None when the item has no mask."""
    if not item.get("mask"):
        return None
    mask = read_image(item["mask"], allow_constant=True)[0] > 0.5
    resized = resize_to(torch.from_numpy(mask.astype(np.float32))[None, None], input_size)
    return resized[0, 0].numpy() > 0.5


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
) -> dict:
    """Trust card of the checkpoint ``model_path`` on ``data`` (a manifest or image files); returns it.

    Writes ``<model>.trust.json`` beside the checkpoint and the report under ``out``
    (:func:`write_trust_report`). ``compare_with``: checkpoints of other trained models of the same
    labels and input size (repeatability). The class explained is the model's prediction with
    its card's decision threshold. Under ``torchrun`` the methods are shared out among the ranks
    and rank 0 writes the card and the report.
    """
    model, card = load_classifier(model_path, device=device)
    others = {}
    for path in compare_with:
        other, other_card = load_classifier(path, device=device)
        _check_comparable(card, other_card, str(path))
        others[Path(path).stem] = other
    items = read_items(data)
    images, labels, masks = load_trust_inputs(items, card, max_images, progress=progress)
    targets = torch.from_numpy(card.predict(predict_probabilities(model, images)))
    source = str(Path(data).resolve()) if isinstance(data, (str, Path)) else f"{len(items)} image files"
    result = trust_card(
        model,
        images,
        labels=labels,
        masks=masks,
        methods=methods or DEFAULT_TRUST_METHODS,
        checks=checks,
        seed=seed,
        targets=targets,
        compare_with=others or None,
        data={"source": source, "first_images": len(images), "checkpoint": Path(model_path).name},
    )
    if distributed.is_main():
        write_trust_card(result, model_path)
        write_trust_report(result, out, model=model, images=images[:EXAMPLE_IMAGES], targets=targets[:EXAMPLE_IMAGES])
    distributed.barrier()
    return result


def summary_rows(card: dict) -> list[dict]:
    """One row per method: the verdicts and headline numbers of the card."""
    rows = []
    for method, entry in card["methods"].items():
        row = {"method": method}
        if "randomization" in entry:
            r = entry["randomization"]
            metric = r["verdict_metric"]
            row["randomization"] = r["verdict"]
            row[f"mean {metric} over states"] = r["statistic"][metric]
            row["random-pair band"] = f"{r['baseline'][metric]['ci_low']:.3f}-{r['baseline'][metric]['ci_high']:.3f}"
        if "fidelity" in entry:
            f = entry["fidelity"]
            row["fidelity"] = f["verdict"]
            row["fidelity mean"] = f["mean"]
        if "roc_auc" in entry.get("localization", {}):
            row["localization"] = entry["localization"]["verdict"]
            row["ROC AUC"] = entry["localization"]["roc_auc"]["mean"]
        if "repeatability" in entry:
            row["repeatability"] = entry["repeatability"]["verdict"]
        row["ms per map"] = 1000 * entry["seconds_per_map"]
        rows.append(row)
    return rows


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
    from monai_sal_app.metrics.stats import to_markdown

    out = Path(out)
    figures = out / "figures"
    (out / "trust.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "trust.json").write_text(json.dumps(card, indent=2))
    lines = [
        f"# Trust card: {card['data'].get('checkpoint', 'model')}",
        "",
        f"{card['data']['n_images']} images ({card['data'].get('source', '')}), {card['data']['n_masks']} with a mask; "
        f"checks {', '.join(card['settings']['checks'])}; computed {card['created']} in {card['seconds']:.0f} s.",
        "",
        to_markdown(summary_rows(card)),
        "",
    ]
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
            for method in methods:
                seed = card["settings"]["seed"]
                path = _state_maps_figure(method, methods[method], model, images, targets, seed, figures)
                lines += [f"![{method} states]({path.relative_to(out)})", ""]
    if any("fidelity" in e for e in methods.values()):
        figure = fidelity_figure(methods, figures / "fidelity.png")
        lines += ["## Fidelity", "", f"![fidelity]({figure.relative_to(out)})", ""]
    report = out / "trust.md"
    report.write_text("\n".join(lines))
    return report


def randomization_figure(entries: dict[str, dict], path: Path) -> Path:
    """One panel per method: its mean similarity per randomized state (in the verdict metric) over
    the random-pair baseline's 95% CI as a grey band; the PNG ``path``. ``entries``: method ->
    ``RandomizationResult.to_dict()``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(entries), figsize=(3.2 * len(entries), 3.0), squeeze=False)
    for ax, (method, r) in zip(axes[0], entries.items()):
        metric = r["verdict_metric"]
        band = r["baseline"][metric]
        x = np.arange(len(r["states"]))
        ax.axhspan(band["ci_low"], band["ci_high"], color="grey", alpha=0.3, label="random pairs (95% CI)")
        ax.plot(x, r["curve"][metric], marker="o", label=metric)
        ax.set_xticks(x, r["states"], rotation=60, fontsize=6)
        ax.set_ylim(-1, 1.05)
        ax.set_title(f"{method}: {r['verdict']}", fontsize=8)
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
        ax.plot(f["fractions"], np.mean(f["mif"], axis=0), color=colour, label=f"{method} MIF")
        ax.plot(f["fractions"], np.mean(f["lif"], axis=0), linestyle="--", color=colour, label=f"{method} LIF")
    ax.set_xlabel("fraction of pixels/voxels perturbed")
    score = next(iter(entries.values()))["score"]
    ax.set_ylabel(
        {"logit_ratio": "target logit / unperturbed", "probability": "target probability"}.get(score, score) + " (mean)"
    )
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, path)


def _middle_slice(map_: np.ndarray) -> np.ndarray:
    return map_[map_.shape[0] // 2] if map_.ndim == 3 else map_


def _state_maps_figure(method: str, entry: dict, model, images, targets, seed: int, figures: Path) -> Path:
    """The maps of the example images for the trained model and every cascading state."""
    plt = pyplot()
    states = [("trained", explain(model, images, method, target=targets))]
    for name, network in randomized_models(model, entry["randomization"]["states"], seed=seed):
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
