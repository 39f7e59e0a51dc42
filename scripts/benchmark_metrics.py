"""Time ``localization_metrics`` on one volume against sklearn's ROC AUC + average precision.

    .venv/bin/python scripts/benchmark_metrics.py [--size 128] [--repeats 3]

(from the repository root, after ``bash scripts/install.sh --test``.)

The map is a smooth random field (float32, quantised to 256 levels so ties occur, as in maps
saved as 8-bit images) plus a signal inside a sphere mask. Prints the best of ``repeats``
wall-clock times in seconds, the ratio, and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from monai_sal_app.allocator import restart_with_batch_allocator
from monai_sal_app.metrics import localization_metrics


def make_case(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ``(size,)*3`` float32 map and the boolean sphere mask it partly highlights."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3, dtype=np.float32) - size / 2
    mask = (grid**2).sum(0) < (size / 6) ** 2
    noise = ndimage.gaussian_filter(rng.standard_normal((size,) * 3).astype(np.float32), sigma=2)
    saliency = noise / noise.std() + 1.5 * mask
    saliency = np.round((saliency - saliency.min()) / np.ptp(saliency) * 255) / 255
    return saliency.astype(np.float32), mask


def best_time(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="edge of the cubic volume in voxels")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the best is reported")
    args = parser.parse_args()

    saliency, mask = make_case(args.size)
    ours_s, ours = best_time(lambda: localization_metrics(saliency, mask), args.repeats)
    labels, scores = mask.ravel(), saliency.ravel()
    sklearn_s, (sk_auc, sk_ap) = best_time(
        lambda: (roc_auc_score(labels, scores), average_precision_score(labels, scores)), args.repeats
    )
    print(f"volume {args.size}^3 = {saliency.size} voxels, mask fraction {mask.mean():.4f}, best of {args.repeats}")
    print(f"localization_metrics (all {len(ours)} metrics): {ours_s:.3f} s")
    print(f"sklearn roc_auc_score + average_precision_score: {sklearn_s:.3f} s")
    print(f"ratio sklearn / ours: {sklearn_s / ours_s:.1f}x")
    print(
        f"|roc_auc - sklearn| = {abs(ours['roc_auc'] - sk_auc):.2e}, |auprc - sklearn| = {abs(ours['auprc'] - sk_ap):.2e}"
    )


if __name__ == "__main__":
    restart_with_batch_allocator()  # the memory allocator of batch work, as `monai-sal` uses it
    main()
