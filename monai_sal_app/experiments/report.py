"""Report pieces shared by every experiment: overlay figures and result tables."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["representative_slice", "save_figure", "save_overlay", "write_table"]


def representative_slice(volume: np.ndarray, mask: np.ndarray | None = None, axis: int = 0) -> int:
    """Index along ``axis`` of a 3D array to show: the mask's largest cross-section, else the middle."""
    if mask is not None and mask.any():
        other = tuple(a for a in range(3) if a != axis)
        return int(np.argmax(mask.sum(axis=other)))
    return volume.shape[axis] // 2


def save_overlay(
    image: np.ndarray, saliency: np.ndarray, path: str | Path, mask: np.ndarray | None = None, title: str = ""
) -> Path:
    """PNG with the image in grey, the min-max map as a translucent heat layer and the mask outlined.

    2D arrays are drawn as they are; a 3D array is cut at :func:`representative_slice`.
    Written atomically (temporary file, then rename).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, saliency = np.asarray(image, dtype=np.float32), np.asarray(saliency, dtype=np.float32)
    if image.ndim == 3:
        k = representative_slice(image, mask)
        image, saliency = image[k], saliency[k]
        mask = None if mask is None else np.asarray(mask)[k]
    span = float(saliency.max() - saliency.min())
    heat = (saliency - saliency.min()) / span if span > 0 else np.zeros_like(saliency)
    fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=100)
    ax.imshow(image, cmap="gray")
    ax.imshow(heat, cmap="inferno", alpha=0.45, vmin=0, vmax=1)
    if mask is not None and np.asarray(mask).any():
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_table(rows: list[dict], folder: str | Path, name: str, floatfmt: str = ".3f") -> tuple[Path, Path]:
    """``name.csv`` and ``name.md`` in ``folder`` from a list of row dicts."""
    from monai_sal_app.metrics.stats import to_markdown, write_csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, folder / f"{name}.csv")
    md_path = folder / f"{name}.md"
    fd, tmp = tempfile.mkstemp(suffix=".md", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(to_markdown(rows, floatfmt=floatfmt) + "\n")
    os.replace(tmp, md_path)
    return Path(csv_path), md_path
