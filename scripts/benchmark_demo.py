"""``monai-sal demo`` before and after: wall, CPU, system time, page faults and peak memory of the
same demo run by an earlier revision of the code and by this one, in pairs, in one run.

    .venv/bin/python scripts/benchmark_demo.py --before REV              # 2 pairs: about 7 min on 2 cores
    .venv/bin/python scripts/benchmark_demo.py --before REV --pairs 3 --out FILE

(from the repository root, after ``bash scripts/install.sh --test``; REV is any revision of this
repository, e.g. the last one before a change whose speed is in question.)

REV is checked out into a temporary git worktree and its demo runs with this environment's Python
and packages, its own code first on the import path, as a user of that revision ran it:
``python -m monai_sal_app --quiet demo --out DIR`` when the revision has that entry point (it
then chooses its own allocator), else its command's function (``monai_sal_app.cli.main``) on the
allocator this script was started with. This revision's demo runs with ``python -m
monai_sal_app``.
Each pair runs the earlier revision, then this one, each into a fresh folder; the pairs take
turns so that a drift of the machine's speed shows in both columns. The times and counts are the
child's own from ``wait4`` (as ``/usr/bin/time`` reports them): wall, user and system CPU seconds,
minor page faults and peak resident memory. Every CSV the two demos both write is compared byte for
byte, and a CSV only one of them writes is named: the table says whether the results are identical.

Run it on an otherwise idle machine: a second job on the same cores changes the wall times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
OLD_ENTRY = ["-c", "import sys; from monai_sal_app.cli import main; sys.exit(main())"]


@dataclasses.dataclass(frozen=True)
class Run:
    """One demo: wall and CPU seconds, minor page faults, peak resident bytes, its CSVs' bytes."""

    wall: float
    user: float
    system: float
    faults: int
    peak_bytes: int
    csvs: dict[str, bytes]

    @property
    def system_share(self) -> float:
        return self.system / self.user


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="the earlier revision (a commit, tag or branch of this repository)")
    p.add_argument("--pairs", type=int, default=2, help="before/after pairs (default %(default)s)")
    p.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    return args


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """A temporary checkout of ``revision``, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="monai-sal-before-"))
    path = parent / "checkout"
    subprocess.run(
        ["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", str(path), revision],
        check=True,
        capture_output=True,
        text=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(parent, ignore_errors=True)


def run_demo(command: list[str], cwd: Path, env: dict[str, str], out: Path) -> Run:
    """Run ``command`` (a demo writing into ``out``) and measure it with ``wait4``."""
    start = time.perf_counter()
    child = subprocess.Popen([*command, "--quiet", "demo", "--out", str(out)], cwd=cwd, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} demo exited with {child.returncode}")
    csvs = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.csv"))}
    if not csvs:
        raise SystemExit(f"error: the demo in {out} wrote no CSV")
    return Run(wall, usage.ru_utime, usage.ru_stime, usage.ru_minflt, usage.ru_maxrss * 1024, csvs)


def entry_point(checkout: Path) -> list[str]:
    """How a user of the revision in ``checkout`` started the command: Python's arguments."""
    return ["-m", "monai_sal_app"] if (checkout / "monai_sal_app" / "__main__.py").is_file() else OLD_ENTRY


def compare_csvs(before: Run, after: Run) -> str:
    """ "identical", or which CSVs differ and which only one run wrote."""
    both = sorted(set(before.csvs) & set(after.csvs))
    differ = [name for name in both if before.csvs[name] != after.csvs[name]]
    only = sorted(set(before.csvs) ^ set(after.csvs))
    if not differ and not only:
        return f"{len(both)} identical"
    parts = [f"{len(both) - len(differ)} of {len(both)} identical"]
    if differ:
        parts.append("differ: " + ", ".join(differ))
    if only:
        parts.append("in one run only: " + ", ".join(only))
    return "; ".join(parts)


def describe(run: Run) -> str:
    return (
        f"{run.wall:.1f} s | {run.user:.1f} s | {run.system:.1f} s ({100 * run.system_share:.1f} %) | "
        f"{run.faults / 1e6:.2f} M | {run.peak_bytes / 2**30:.2f} GiB"
    )


def report(args, revision_before: str, revision_after: str, pairs: list[tuple[Run, Run]]) -> str:
    lines = [
        "# `monai-sal demo`: before and after",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} logical cores; Python {platform.python_version()}",
        f"- before: {revision_before}; after: {revision_after}; this script's LD_PRELOAD: "
        f"{os.environ.get('LD_PRELOAD', '') or 'unset'}",
        f"- command: `scripts/benchmark_demo.py --before {args.before} --pairs {args.pairs}`",
        "",
        "| pair | run | wall | user | system (of user) | minor faults | peak RSS | speed-up | CSVs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, (before, after) in enumerate(pairs, 1):
        lines.append(f"| {i} | before | {describe(before)} | | |")
        lines.append(
            f"| {i} | after | {describe(after)} | {before.wall / after.wall:.2f}x | {compare_csvs(before, after)} |"
        )
    speedups = [b.wall / a.wall for b, a in pairs]
    shares = [a.system_share for _, a in pairs]
    lines += [
        "",
        f"Speed-up of the wall time: median {statistics.median(speedups):.2f}x, lowest {min(speedups):.2f}x, "
        f"highest {max(speedups):.2f}x over {len(pairs)} pair(s). System time after: "
        f"{100 * max(shares):.1f} % of the user time at most. All CSVs identical in "
        f"{sum(b.csvs == a.csvs for b, a in pairs)} of {len(pairs)} pair(s).",
    ]
    return "\n".join(lines) + "\n"


def revision_name(revision: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), "log", "-1", "--format=%h %s", revision],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def main(argv=None) -> None:
    args = parse_args(argv)
    before_name, after_name = revision_name(args.before), revision_name("HEAD")
    pairs = []
    with worktree(args.before) as checkout, tempfile.TemporaryDirectory(prefix="monai-sal-demo-") as scratch:
        before_env = {**os.environ, "PYTHONPATH": str(checkout)}
        after_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        for i in range(1, args.pairs + 1):
            before_command = [sys.executable, *entry_point(checkout)]
            before = run_demo(before_command, checkout, before_env, Path(scratch) / f"before{i}")
            after = run_demo(
                [sys.executable, "-m", "monai_sal_app"], REPOSITORY, after_env, Path(scratch) / f"after{i}"
            )
            print(
                f"pair {i}: before {before.wall:.1f} s, after {after.wall:.1f} s ({before.wall / after.wall:.2f}x)",
                file=sys.stderr,
            )
            pairs.append((before, after))
            for folder in (f"before{i}", f"after{i}"):
                shutil.rmtree(Path(scratch) / folder)
    text = report(args, before_name, after_name, pairs)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
