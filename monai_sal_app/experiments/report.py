"""Report pieces shared by every experiment: overlay figures and result tables.

One overlay renderer for every PNG of a map (``monai-sal explain``, the experiments' reports).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from monai_sal_app.files import atomic_path, write_text
from monai_sal_app.metrics.localization import roc_curve
from monai_sal_app.metrics.stats import to_markdown, write_csv

__all__ = [
    "CLIP_PERCENTILE",
    "draw_overlay",
    "overlay_layer",
    "pooled_roc_pr",
    "pyplot",
    "representative_slice",
    "roc_pr_figure",
    "save_figure",
    "save_overlay",
    "save_overlay_grid",
    "write_table",
]


def representative_slice(volume: np.ndarray, mask: np.ndarray | None = None, axis: int = 0) -> int:
    """Index along ``axis`` of a 3D array to show: the mask's largest cross-section, else the middle."""
    if mask is not None and mask.any():
        other = tuple(a for a in range(3) if a != axis)
        return int(np.argmax(mask.sum(axis=other)))
    return volume.shape[axis] // 2


CLIP_PERCENTILE = 99.0  # the overlay's colour scale ends at this percentile of |map|, as the studies show maps


def overlay_layer(saliency: np.ndarray, percentile: float = CLIP_PERCENTILE) -> tuple[np.ndarray, float]:
    """The heat layer of a map: ``(rgba, vmax)``.

    ``|map|`` divided by its ``percentile``-th percentile ``vmax`` and clipped to [0, 1] gives the
    colour (``inferno``) and the opacity (0.85 x the value): low values are transparent, so the
    image shows through where the map is weak, and one hot pixel cannot wash out the rest.
    A map that is zero everywhere is fully transparent (``vmax`` 0).
    """
    magnitude = np.abs(np.asarray(saliency, dtype=np.float64))
    vmax = float(np.percentile(magnitude, percentile)) if magnitude.size else 0.0
    if not vmax > 0:
        vmax = float(magnitude.max()) if magnitude.size else 0.0
    value = np.clip(magnitude / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(magnitude)
    rgba = matplotlib.colormaps["inferno"](value)
    rgba[..., 3] = 0.85 * value
    return rgba, vmax


def draw_overlay(ax, image: np.ndarray, saliency: np.ndarray, mask: np.ndarray | None = None, title: str = ""):
    """Draw one overlay on a matplotlib axis: the image in grey, the heat layer of
    :func:`overlay_layer` and the mask's contour in cyan. 3D arrays are cut at
    :func:`representative_slice`. Returns a ScalarMappable for a colour bar (0 to ``vmax``)."""
    image, saliency = np.asarray(image, dtype=np.float32), np.asarray(saliency, dtype=np.float32)
    if image.ndim == 3:
        k = representative_slice(image, mask)
        image, saliency = image[k], saliency[k]
        mask = None if mask is None else np.asarray(mask)[k]
    rgba, vmax = overlay_layer(saliency)
    ax.imshow(image, cmap="gray")
    ax.imshow(rgba)
    if mask is not None and np.asarray(mask).any():
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    norm = matplotlib.colors.Normalize(0.0, vmax if vmax > 0 else 1.0)
    return matplotlib.cm.ScalarMappable(norm=norm, cmap="inferno")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    matplotlib.use("Agg")
    # here, not at the top: the backend is chosen when a figure is drawn, so that importing the
    # package leaves the matplotlib backend of a user's session alone
    import matplotlib.pyplot as plt

    return plt


def save_overlay(
    image: np.ndarray, saliency: np.ndarray, path: str | Path, mask: np.ndarray | None = None, title: str = ""
) -> Path:
    """PNG of :func:`draw_overlay` with a colour bar of |map| (clipped at the
    :data:`CLIP_PERCENTILE`-th percentile). Written atomically (temporary file, then rename)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.8, 3.2), dpi=100)
    mappable = draw_overlay(ax, image, saliency, mask, title)
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(f"|map|, clipped at p{CLIP_PERCENTILE:g}", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return save_figure(fig, path)


def save_overlay_grid(cases: list[dict], methods: list[str], path: str | Path, title: str = "") -> Path:
    """PNG of the same cases' maps for every method: one row per case (``{"id", "image", "mask",
    "maps": {method: map}}``, arrays on one grid), the image alone first, then one column per method."""
    plt = pyplot()
    if not cases or not methods:
        raise ValueError("an overlay grid needs at least one case and one method")
    rows, cols = len(cases), len(methods) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + 0.3), dpi=100, squeeze=False)
    for r, case in enumerate(cases):
        image = np.asarray(case["image"], dtype=np.float32)
        draw_overlay(axes[r, 0], image, np.zeros_like(image), case.get("mask"), str(case["id"]))
        for c, method in enumerate(methods, start=1):
            draw_overlay(axes[r, c], image, case["maps"][method], case.get("mask"), method if r == 0 else "")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def pooled_roc_pr(values: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """ROC and precision-recall points of |map| as a score for the masks, over the pixels/voxels of
    N images pooled; each image's |map| is divided by its maximum first, so that no image's scale
    dominates. ``values``, ``masks``: (N, *spatial). Returns ``{"fpr", "tpr"}`` (from
    ``metrics.localization.roc_curve``, starting at (0, 0)) and ``{"recall", "precision"}`` at the
    same thresholds (without that first point). ValueError when the masks are all in or all out."""

    labels = np.asarray(masks).astype(bool).ravel()
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC and PR curves need masks with both inside and outside pixels/voxels")
    magnitude = np.abs(np.asarray(values, dtype=np.float64)).reshape(len(values), -1)
    peak = magnitude.max(axis=1, keepdims=True)
    scaled = np.divide(magnitude, peak, out=np.zeros_like(magnitude), where=peak > 0)
    fpr, tpr, _ = roc_curve(scaled.ravel(), labels)
    true_pos, false_pos = tpr[1:] * positives, fpr[1:] * negatives
    return {"fpr": fpr, "tpr": tpr, "recall": tpr[1:], "precision": true_pos / (true_pos + false_pos)}


def roc_pr_figure(maps: dict[str, np.ndarray], masks: np.ndarray, path: str | Path) -> Path:
    """PNG of every method's ROC (left) and precision-recall (right) curve from
    :func:`pooled_roc_pr`. ``maps``: method -> (N, *spatial); ``masks``: (N, *spatial)."""
    plt = pyplot()
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    prevalence = float(np.asarray(masks).astype(bool).mean())
    for method, values in maps.items():
        curve = pooled_roc_pr(values, masks)
        roc_ax.plot(curve["fpr"], curve["tpr"], lw=1.2, label=method)
        pr_ax.plot(curve["recall"], curve["precision"], lw=1.2, label=method)
    roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle="--", label="chance")
    pr_ax.axhline(prevalence, color="grey", lw=0.8, linestyle="--", label="prevalence")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (pooled pixels)")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall (pooled pixels)", ylim=(0, 1.02))
    pr_ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary file, then rename) and close it."""
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, ".png") as temporary:
            fig.savefig(temporary, format="png")
    finally:
        plt.close(fig)
    return path


def write_table(rows: list[dict], folder: str | Path, name: str, floatfmt: str = ".3f") -> tuple[Path, Path]:
    """``name.csv`` and ``name.md`` in ``folder`` from a list of row dicts."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, folder / f"{name}.csv")
    md_path = write_text(folder / f"{name}.md", to_markdown(rows, floatfmt=floatfmt) + "\n")
    return Path(csv_path), md_path
