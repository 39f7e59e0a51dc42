"""Batch work over a manifest (``monai-sal explain`` / ``evaluate``): does reading overlap the
computation, and does resident memory stay flat in the number of images?

    .venv/bin/python scripts/benchmark_batch.py                # both parts: about 10 min on 2 cores
    .venv/bin/python scripts/benchmark_batch.py --quick        # 40 volumes and 1,000 small ones

(from the repository root, after ``bash scripts/install.sh --test``.)

**Overlap.** ``--volumes`` (200) compressed NIfTI volumes of ``--side``^3 voxels and the work
on them: a conv5-fc3 at 32^3, Grad-CAM and integrated gradients of ``--steps`` steps, the maps
returned to the file's grid and written. Reading a file (gunzip, min-max, resize) is made to cost
about as much as that work by a fixed wait per file on top of the real reading, as a network file
system's or an archive's latency would add; the wait is calibrated on a first block (the work per
image minus the real reading). The same ``workflows.explain_items`` call runs with the files read
in turn in this process (``workers=0``: before) and read ahead by one and by two DataLoader
workers (after), in one run. Reading alone is timed on its own, and the work alone is the inline
run minus it; the table gives each wall time against their sum and against their maximum. The
network computes on ``--threads`` (1) torch threads.

**Memory.** ``--small`` (10,000) 16^3 volumes, each with a mask, through ``explain_items`` then
``evaluate_maps`` with the default read-ahead. A thread samples every 0.2 s the resident set size
(RSS) of this process and of each worker process, and the sum of their proportional set sizes
(PSS: the pages the forked workers share with this process counted once); the table gives the
peak of each so far when 1,000, 5,000 and all images (or maps) are done, from the blocks written
to ``<out>/blocks``. When the workers end, the pages they shared become this process's own: its
PSS rises to its RSS at the very end without any new memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from scipy import ndimage

from monai_sal_app.data.io import write_nifti
from monai_sal_app.experiments.workflows import BLOCKS_FOLDER, EVALUATE_BLOCK, evaluate_maps, explain_items
from monai_sal_app.models.card import ModelCard
from monai_sal_app.models.checkpoint import build_network
from monai_sal_app.models.inputs import read_items
from monai_sal_app.models.sources import in_memory

DISTINCT = 20  # distinct random volumes; the files cycle over them (each file is still read whole)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volumes", type=int, default=200, help="volumes of the overlap part (default %(default)s)")
    p.add_argument("--side", type=int, default=64, help="their side in voxels (default %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="integrated gradients' steps (default %(default)s)")
    p.add_argument("--small", type=int, default=10_000, help="16^3 volumes of the memory part (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the computing process (default 1)")
    p.add_argument("--quick", action="store_true", help="40 volumes and 1,000 small ones")
    p.add_argument("--parts", default="overlap,memory", help="comma list of overlap, memory")
    p.add_argument("--workdir", default=None, help="keep the data and outputs here (default: a temporary folder)")
    return p.parse_args(argv)


def smooth_volume(side: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((side,) * 3), sigma=2.0)
    return ((field - field.min()) / (field.max() - field.min())).astype(np.float32)


def write_manifest(folder: Path, n: int, side: int, with_masks: bool) -> Path:
    """``n`` gzip NIfTI volumes of ``side``^3 (cycling over :data:`DISTINCT` random fields) and
    their ``manifest.csv``; with ``with_masks``, one mask (the brightest tenth) per distinct field."""
    volumes = [smooth_volume(side, seed) for seed in range(min(n, DISTINCT))]
    lines = ["id,image,label,mask"]
    for k in range(n):
        volume = volumes[k % len(volumes)]
        image = write_nifti(volume, folder / "images" / f"case{k:05d}.nii.gz")
        mask = ""
        if with_masks:
            mask = folder / "masks" / f"field{k % len(volumes):02d}.nii.gz"
            if not mask.exists():
                write_nifti(volume > np.quantile(volume, 0.9), mask)
        lines.append(f"case{k:05d},{image},{k % 2},{mask}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def classifier(side: int):
    """An untrained conv5-fc3 on ``side``^3 inputs (the weights do not change the time)."""
    card = ModelCard(
        architecture="conv5fc3", spatial_dims=3, in_channels=1, num_classes=2, labels=["control", "patient"],
        input_size=[side] * 3, arch_kwargs={"channels": [8, 16, 16, 32, 32]},
    )  # fmt: skip
    torch.manual_seed(0)
    return in_memory(build_network(card).eval(), card)


def with_latency(source, seconds: float):
    """``source`` whose reading of a file first waits ``seconds`` (a slow store's latency)."""
    read = source.read_input

    def slow_read(path, array, meta):
        time.sleep(seconds)
        return read(path, array, meta)

    return dataclasses.replace(source, _read=slow_read)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def overlap(args, work: Path) -> None:
    manifest = write_manifest(work / "volumes", args.volumes, args.side, with_masks=False)
    items = read_items(manifest)
    source = classifier(32)
    options = {
        "methods": ("gradcam", "integrated_gradients"),
        "params": {"integrated_gradients": {"steps": args.steps}},
        "overlays": 0,
        "progress": False,
    }
    explain_items(source, items[:4], work / "warm-up", workers=0, **options)  # first passes, imports
    first = items[:16]
    real_read = timed(lambda: [source.read_input(item["image"]) for item in first]) / len(first)
    work_per_image = timed(lambda: explain_items(source, first, work / "calibration", workers=0, **options))
    latency = max(0.0, work_per_image / len(first) - 2 * real_read)
    source = with_latency(source, latency)
    read_alone = timed(lambda: [source.read_input(item["image"]) for item in items])
    runs = {}
    for workers in (0, 1, 2):
        out = work / f"workers{workers}"
        runs[workers] = timed(
            lambda out=out, workers=workers: explain_items(source, items, out, workers=workers, **options)
        )
        shutil.rmtree(out)
    compute = max(runs[0] - read_alone, 1e-9)
    both, longer = read_alone + compute, max(read_alone, compute)
    print(
        f"\n## Overlap: {args.volumes} volumes of {args.side}^3 (gzip NIfTI) -> conv5-fc3 at 32^3, Grad-CAM + "
        f"IG-{args.steps}, maps written on the files' grid; {torch.get_num_threads()} torch thread(s)\n"
    )
    print(
        f"reading alone: {read_alone:.1f} s ({1000 * real_read:.0f} ms a file + a wait of {1000 * latency:.0f} ms); "
        f"the work alone (inline run minus reading): {compute:.1f} s\n"
    )
    print("| files read | wall s | / (read + work) | / max(read, work) | speed-up over inline |")
    print("|---|---|---|---|---|")
    for workers, label in (
        (0, "in turn, in this process (before)"),
        (1, "ahead by 1 worker"),
        (2, "ahead by 2 workers"),
    ):
        print(
            f"| {label} | {runs[workers]:.1f} | {runs[workers] / both:.2f} | {runs[workers] / longer:.2f} | "
            f"{runs[0] / runs[workers]:.2f}x |"
        )


class MemorySampler:
    """Resident memory sampled every ``period`` s in a thread, with the number of items whose
    block is written (``count()``): the RSS of this process, the largest RSS among its worker
    processes, and the sum of the PSS of all of them (pages shared after the fork counted once)."""

    KINDS = ("this process's RSS", "a worker's RSS", "PSS of all")

    def __init__(self, count, period: float = 0.2) -> None:
        self.count, self.period = count, period
        self.samples: list[tuple[int, tuple[float, float, float]]] = []  # (items done, MiB of each kind)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            done = self.count()
            main = me.memory_full_info()
            workers = []
            for worker in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a worker that ended meanwhile
                    workers.append(worker.memory_full_info())
            worker_rss = max((w.rss for w in workers), default=0)
            pss = main.pss + sum(w.pss for w in workers)
            self.samples.append((done, (main.rss / 2**20, worker_rss / 2**20, pss / 2**20)))
            self._stop.wait(self.period)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_until(self, done: int, kind: int) -> float | None:
        """The peak (MiB) of the ``kind``-th measure (:data:`KINDS`) over the samples taken
        before more than ``done`` items were done."""
        shown = [values[kind] for count, values in self.samples if count <= done]
        return max(shown) if shown else None


def blocks_done(folder: Path, block: int, total: int):
    return lambda: min(total, block * len(list(folder.glob("block*.json"))))


def memory(args, work: Path) -> None:
    n = args.small
    manifest = write_manifest(work / "small", n, 16, with_masks=True)
    items = read_items(manifest)
    source = classifier(16)
    out = work / "small-out"
    with MemorySampler(blocks_done(out / BLOCKS_FOLDER, 16, n)) as explained:
        explain_seconds = timed(lambda: explain_items(source, items, out, methods=("gradcam",), progress=False))
    with MemorySampler(blocks_done(out / "evaluation" / BLOCKS_FOLDER, EVALUATE_BLOCK, n)) as evaluated:
        evaluate_seconds = timed(lambda: evaluate_maps(out / "maps.csv", out / "evaluation", log=lambda _: None))
    marks = [m for m in (1_000, 5_000, 10_000) if m < n] + [n]
    print(f"\n## Memory: {n} volumes of 16^3 end to end (explain Grad-CAM, then evaluate), 2 workers\n")
    print(f"explain: {explain_seconds:.0f} s; evaluate: {evaluate_seconds:.0f} s\n")
    print("| step | memory | " + " | ".join(f"peak up to {m:,} (MiB)" for m in marks) + " | first to last mark |")
    print("|---|---|" + "---|" * (len(marks) + 1))
    for name, sampler in (("explain", explained), ("evaluate", evaluated)):
        for kind, measure in enumerate(MemorySampler.KINDS):
            peaks = [sampler.peak_until(m, kind) for m in marks]
            cells = " | ".join("-" if p is None else f"{p:.0f}" for p in peaks)
            growth = "-" if None in (peaks[0], peaks[-1]) else f"{peaks[-1] - peaks[0]:+.0f} MiB"
            print(f"| {name} | {measure} | {cells} | {growth} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.volumes, args.small = 40, 1_000
    torch.set_num_threads(args.threads)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    print(
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.workdir or temporary)
        if "overlap" in parts:
            overlap(args, work)
        if "memory" in parts:
            memory(args, work)


if __name__ == "__main__":
    main()
