"""What a study is written against: its :class:`Recipe` (settings, inputs, the function that runs
it), the :class:`Run` it works through (settings, folders, cached steps, tables, figures, report
sections) and the checks of its settings. The runner (``experiments.runner``) reads the recipe files
and runs a study; a study never imports the runner.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from monai_sal_app import arguments, distributed
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.files import json_safe, write_text
from monai_sal_app.metrics.stats import summarize, write_csv

__all__ = ["ExperimentError", "Recipe", "Run", "Section", "check_integer", "check_names"]


class ExperimentError(ValueError):
    """A recipe, a config, a manifest or a checkpoint that cannot be run; raised before any work."""


def check_integer(settings: dict, key: str, minimum: int = 1) -> int:
    """For a recipe's ``validate``: ``settings[key]`` as an int, or ValueError unless it is an
    integer (not a bool) of at least ``minimum``."""
    return arguments.check_integer(settings[key], key, minimum)


def check_names(settings: dict, key: str) -> list:
    """For a recipe's ``validate``: ``settings[key]``, or ValueError unless it is a non-empty list of
    distinct names."""
    names = settings[key]
    if not isinstance(names, list) or not names or len(set(names)) != len(names):
        raise ValueError(f"{key} must be a non-empty list of distinct names, got {names!r}")
    return names


@dataclass(frozen=True)
class Recipe:
    """A study's code. ``run(run)`` does the work through the :class:`Run` it is given.

    ``settings``: every setting the study reads, with its default (a config may set only these);
    ``data_columns``: the manifest columns ``--data`` must have (``()``: the recipe makes its own
    data and takes no ``--data``); ``models``: whether ``--model`` checkpoints are accepted;
    ``validate(settings)``: raises ValueError for a value the study cannot use;
    ``check_inputs(data, models)``: raises ValueError for a combination of the ``--data`` manifest
    (a Path or None) and the ``--model`` checkpoints (a list of Paths) the study cannot use. Both
    run before anything is written.
    """

    name: str
    run: Callable[[Run], None]
    settings: dict[str, Any]
    data_columns: tuple[str, ...] = ()
    models: bool = False
    validate: Callable[[dict], None] | None = None
    check_inputs: Callable[[Path | None, list[Path]], None] | None = None


@dataclass
class Section:
    """One part of the report: the question its table answers, the table and its figures."""

    title: str
    question: str
    rows: list[dict]
    figures: list[Path] = field(default_factory=list)
    verdict: str | None = None  # the column holding the answers (yes / no / unclear), coloured in the report
    note: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Run:
    """What a recipe works with: its settings, its folders, cached steps, tables and report sections.

    ``out``: the run's folder; ``settings``/``seed``/``scale``: from the resolved config;
    ``data``: the ``--data`` manifest or None; ``models``: the ``--model`` checkpoints;
    ``device``: this rank's device; ``progress``: show progress bars; ``log``: one-line messages.
    """

    def __init__(
        self,
        config: dict,
        out: Path,
        *,
        data: Path | None,
        models: Sequence[Path],
        progress: bool,
        log: Callable[[str], object],
    ) -> None:
        self.config = config
        self.settings = config["settings"]
        self.seed = int(config["seed"])
        self.scale = config["scale"]
        self.out = out
        self.data = data
        self.models = list(models)
        self.progress = progress
        self.device = distributed.device()
        self._log = log
        self.sections: list[Section] = []
        self.data_hashes: dict[str, dict] = {}
        self.step_seconds: dict[str, float] = {}
        self._main = distributed.is_main()  # fixed here: inside a block every rank works alone
        self.resumed = False  # True once a step or block is read back from an earlier invocation

    # -- folders --------------------------------------------------------------------------
    @property
    def results(self) -> Path:
        return self.out / "results"

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    @property
    def work(self) -> Path:
        """Where steps keep their intermediate files (data, checkpoints, maps)."""
        return self.out / "work"

    @property
    def is_main(self) -> bool:
        """True on the process that writes the tables, the figures and the report (rank 0)."""
        return self._main

    def log(self, message: str) -> None:
        if self._main:
            self._log(message)

    # -- steps ----------------------------------------------------------------------------
    def _step_file(self, name: str) -> Path:
        safe = name.replace("/", "__")
        if not safe or safe.startswith(".") or any(c in safe for c in '\\:*?"<>|'):
            raise ValueError(f"bad step name {name!r}")
        return self.out / "steps" / f"{safe}.json"

    def step(self, name: str, compute: Callable[[], Any]) -> Any:
        """The result of ``compute()`` (JSON-safe), computed once on rank 0 and kept in
        ``steps/<name>.json``: a rerun or a resumed run reads it instead of computing again."""
        path = self._step_file(name)
        if path.is_file():
            self.resumed = True
            return json.loads(path.read_text())
        result = None
        if distributed.is_main():
            start = time.perf_counter()
            self.log(f"step {name}")
            result = json_safe(compute())
            write_text(path, json.dumps(result))
            self.step_seconds[name] = time.perf_counter() - start
        return distributed.broadcast(result)

    def map_blocks(
        self,
        name: str,
        items: Sequence[Any],
        compute: Callable[[list[int], list[Any]], list[dict]],
        block_size: int = 1,
    ) -> list[dict]:
        """Rows of every item, computed block by block and kept on disk as they finish.

        ``compute(indices, items)`` returns the rows (dicts) of one block of consecutive items; it
        runs inside ``distributed.local()``, so what it calls works whole in this process.
        Blocks are dealt to the ranks (``distributed.shard``), each finished block is appended to
        ``steps/<name>/rank<r>.jsonl``, and an interrupted run computes only the blocks missing
        from those files. Returns every block's rows in item order, on every rank.
        """
        folder = self._step_file(name).with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        n_blocks = (len(items) + block_size - 1) // block_size
        done = self._finished_blocks(folder)
        self.resumed = self.resumed or bool(done)
        todo = [b for b in distributed.shard(n_blocks) if b not in done]
        start = time.perf_counter()
        if todo:
            part = folder / f"rank{distributed.rank()}.jsonl"
            with open(part, "a+", encoding="utf-8") as f:
                if f.tell() > 0:  # a line cut short by an interruption is ended, then ignored on reading
                    f.seek(f.tell() - 1)
                    if f.read(1) != "\n":
                        f.write("\n")
                bar = tqdm(todo, desc=name, disable=not self.progress or not self._main, leave=False)
                for block in bar:
                    indices = list(range(block * block_size, min(len(items), (block + 1) * block_size)))
                    with distributed.local():
                        rows = json_safe(compute(indices, [items[i] for i in indices]))
                    f.write(json.dumps({"block": block, "rows": rows}) + "\n")
                    f.flush()
        distributed.barrier()
        if todo:
            self.step_seconds[name] = time.perf_counter() - start
        done = self._finished_blocks(folder)
        missing = [b for b in range(n_blocks) if b not in done]
        if missing:
            raise RuntimeError(f"step {name}: blocks {missing[:5]} were not computed by any rank")
        return [row for b in range(n_blocks) for row in done[b]]

    @staticmethod
    def _finished_blocks(folder: Path) -> dict[int, list[dict]]:
        done: dict[int, list[dict]] = {}
        for part in sorted(folder.glob("rank*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interruption
                    continue
                done[int(record["block"])] = record["rows"]
        return done

    # -- outputs --------------------------------------------------------------------------
    def record_data(self, name: str, manifest: str | os.PathLike) -> None:
        """SHA-256 of ``manifest`` and of every image and mask it lists, for ``data.json``."""

        manifest = Path(manifest)
        files = sorted(
            {
                str(value)
                for item in read_manifest(manifest)
                for key, value in item.items()
                if value and (key in ("image", "mask") or key.startswith("mask_"))
            }
        )
        combined = hashlib.sha256()
        for path in files:
            combined.update(_sha256(Path(path)).encode())
        self.data_hashes[name] = {
            "manifest": manifest.name,
            "manifest_sha256": _sha256(manifest),
            "files": len(files),
            "files_sha256": combined.hexdigest(),
        }

    def table(
        self,
        name: str,
        rows: list[dict],
        group_by: str | tuple[str, ...] | None = None,
        metrics: Sequence[str] | None = None,
    ) -> list[dict]:
        """Write ``results/<name>.csv`` and, with ``group_by``, ``results/<name>_summary.csv`` (mean
        and 95% CI of ``metrics`` per group, ``metrics.stats.summarize``); returns the summary
        (or the rows). Only rank 0 writes."""

        summary = summarize(rows, group_by, metrics) if group_by else rows
        if distributed.is_main():
            write_csv(rows, self.results / f"{name}.csv")
            if group_by:
                write_csv(summary, self.results / f"{name}_summary.csv")
        return summary

    def figure(self, name: str) -> Path:
        """The path of figure ``name`` (``figures/<name>.png``)."""
        return self.figures / f"{name}.png"

    def section(self, section: Section) -> None:
        """Add a section to the report (in the order the recipe adds them)."""
        self.sections.append(section)
