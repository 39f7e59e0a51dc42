#!/usr/bin/env python
"""Overlays of a few generated real-anatomy cases for the README (docs/images/*.png).

    .venv/bin/python scripts/make_data_overlays.py [--out docs/images] [--seed 0]

Writes brain_atrophy.png, chest_xray.png and ct_lesions.png: images in grey, ground-truth masks as red
contours, RSNA boxes in yellow. Needs the bases of scripts/install_data.sh; a missing base is reported
and its figure skipped. Deterministic from the seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from monai_sal_app.data.bases import BaseNotInstalled


def _show(ax, image, mask=None, title="", vmin=None, vmax=None):
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors="r", linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def brain_figure(out: Path, seed: int) -> Path:
    from monai_sal_app.data.brain_atrophy import brain_atrophy_subject, load_brain_base

    base = load_brain_base()
    fig, axes = plt.subplots(2, 3, figsize=(10, 7))
    for row, (dim, size) in enumerate(((2, 128), (3, 64))):
        for col, subtype in enumerate(("control", "typical", "atypical")):
            image, mask = brain_atrophy_subject(
                subtype, size, dim, np.random.default_rng(seed), base, shrink_mm=3.0, intensity_loss=0.25
            )
            if dim == 3:  # axial slice through the atrophy (or the middle)
                k = int(np.argmax(mask.sum((0, 1)))) if mask.any() else size // 2 - 4
                image, mask = image[:, :, k], mask[:, :, k]
            # arrays are (left->right, posterior->anterior): rotate so anterior is up
            _show(
                axes[row, col],
                np.rot90(image),
                np.rot90(mask),
                f"{subtype} ({dim}D {size}{'^3' if dim == 3 else '^2'})",
            )
    fig.suptitle(f"Brain atrophy on {base.name}: red = voxels the atrophy changed", fontsize=11)
    return _save(fig, out / "brain_atrophy.png")


def chest_figure(out: Path, seed: int) -> Path:
    from monai_sal_app.data.chest_xray import chest_xray_subject

    fig, axes = plt.subplots(1, 4, figsize=(14, 4))
    for col in range(4):
        opacity = col > 0
        image, mask, boxes, lungs = chest_xray_subject(opacity, np.random.default_rng(seed + col))
        _show(axes[col], image, mask, "Lung Opacity" if opacity else "Normal (lung fields in cyan)", 0, 1)
        if not opacity:
            axes[col].contour(lungs.astype(float), levels=[0.5], colors="c", linewidths=0.8)
        for x, y, w, h in boxes:
            axes[col].add_patch(plt.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="y", linewidth=1))
    fig.suptitle("Chest X-ray opacities on RG1_UNCR (1024^2): red = changed pixels, yellow = RSNA boxes", fontsize=11)
    return _save(fig, out / "chest_xray.png")


def ct_figure(out: Path, seed: int) -> Path:
    from monai_sal_app.data.ct_lesions import WINDOW_HU, ct_lesion_subject

    fig, axes = plt.subplots(2, 3, figsize=(10, 7))
    for col, subtype in enumerate(("control", "real", "synthetic")):
        image, mask, _ = ct_lesion_subject(subtype, 64, 3, np.random.default_rng(seed + col))
        centre = np.argwhere(mask).mean(0).round().astype(int) if mask.any() else np.array(image.shape) // 2
        _show(axes[0, col], image[centre[0]], mask[centre[0]], f"{subtype}: axial", *WINDOW_HU)
        _show(axes[1, col], image[:, centre[1]][::-1], mask[:, centre[1]][::-1], f"{subtype}: coronal", *WINDOW_HU)
    fig.suptitle("CT lesions on pyradiomics lung CTs (64^3 at 1.5 mm): red = lesion mask", fontsize=11)
    return _save(fig, out / "ct_lesions.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    status = 0
    for figure in (brain_figure, chest_figure, ct_figure):
        try:
            print(f"wrote {figure(Path(args.out), args.seed)}")
        except BaseNotInstalled as err:
            print(f"skipped {figure.__name__}: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
