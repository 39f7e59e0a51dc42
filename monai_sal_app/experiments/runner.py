"""Experiment recipes: a YAML file names a study, its settings per scale, and the runner does the rest.

A recipe file (``configs/experiments/<name>.yaml``, installed with the package) holds::

    recipe: subtypes            # the study's code, a key of studies.RECIPES
    title: ...                  # the report's title
    question: ...               # the question the run answers, in one sentence
    seed: 0
    settings: {...}             # the study's settings shared by every scale
    scales:                     # what each scale changes: smoke (seconds), default (minutes on
      smoke: {...}              # 2 CPU cores), paper (the studies' sizes, for a GPU or a cluster)
      default: {...}
      paper: {...}

Every key is checked against the recipe's own settings (:class:`Recipe.settings`) before any work
starts, and so are ``--data`` (the manifest's columns) and ``--model`` (its card's labels and
dimensions against the data). :func:`run_experiment` then writes under ``out``:

- ``config.yaml``: the resolved settings; ``environment.json``: package versions, device, ranks,
  torch's threads per process (the numbers depend on it: see ``docs/EXPERIMENTS.md``), the wall
  time of this invocation and of each step it computed (``resumed``: some were read back);
  ``data.json``: SHA-256 of every manifest and of the files it lists;
- ``steps/``: each finished step's result, so that an interrupted run resumes where it stopped;
- ``results/*.csv`` (one row per image x method x condition) and ``results/*_summary.csv`` (mean
  and 95% CI), ``figures/*.png`` and ``report.html``.

Under ``torchrun`` the per-item steps are dealt to the ranks (``distributed.shard``) and gathered;
rank 0 writes the tables, the figures and the report.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_sal_app import distributed

__all__ = [
    "SCALES",
    "ExperimentError",
    "Recipe",
    "Run",
    "Section",
    "check_integer",
    "check_names",
    "config_folder",
    "experiment_names",
    "resolve_config",
    "run_experiment",
    "write_text",
]

SCALES = ("smoke", "default", "paper")
CONFIG_KEYS = ("recipe", "title", "question", "seed", "settings", "scales")


class ExperimentError(ValueError):
    """A recipe, a config, a manifest or a checkpoint that cannot be run; raised before any work."""


def check_integer(settings: dict, key: str, minimum: int = 1) -> None:
    """For a recipe's ``validate``: ValueError unless ``settings[key]`` is an integer (not a bool)
    of at least ``minimum``."""
    value = settings[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


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
    verdict: str | None = None  # the column holding pass/fail, highlighted in the report
    note: str = ""


def config_folder() -> Path:
    """The folder of the built-in recipe files: ``configs/experiments``, installed with the package as
    ``monai_sal_app.experiment_configs`` (an editable install of a checkout cannot import that
    folder as a package, so there it is the checkout's own)."""
    try:
        return Path(str(importlib.resources.files("monai_sal_app.experiment_configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs" / "experiments"


def experiment_names() -> list[str]:
    """The built-in recipes' names."""
    return sorted(p.stem for p in config_folder().glob("*.yaml"))


def _config_path(source: str | os.PathLike) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ExperimentError(f"no recipe file {path}")
        return path
    builtin = config_folder() / f"{source}.yaml"
    if not builtin.is_file():
        raise ExperimentError(f"unknown experiment {str(source)!r}; choose one of {', '.join(experiment_names())}")
    return builtin


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ExperimentError(f"{where} must be a mapping of keys to values, got {type(value).__name__}")
    return value


def _unknown(keys: Iterable[str], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")


def resolve_config(source: str | os.PathLike, scale: str = "default", seed: int | None = None) -> dict:
    """The settings a run uses: the recipe's defaults, then the file's ``settings``, then its
    ``scales[scale]``. ``source``: a built-in name or a YAML path. ExperimentError for anything
    unknown or malformed (every scale of the file is checked, not only the one asked for)."""
    import yaml

    from monai_sal_app.experiments.studies import RECIPES

    if scale not in SCALES:
        raise ExperimentError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    path = _config_path(source)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ExperimentError(f"{path}: not a readable YAML file ({err})") from err
    raw = _mapping(raw, str(path))
    _unknown(raw, CONFIG_KEYS, str(path))
    if raw.get("recipe") not in RECIPES:
        raise ExperimentError(f"{path}: unknown recipe {raw.get('recipe')!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[raw["recipe"]]
    settings = _mapping(raw.get("settings"), f"{path}: settings")
    _unknown(settings, recipe.settings, f"{path}: settings")
    scales = _mapping(raw.get("scales"), f"{path}: scales")
    _unknown(scales, SCALES, f"{path}: scales")
    for name, overrides in scales.items():
        _unknown(_mapping(overrides, f"{path}: scales.{name}"), recipe.settings, f"{path}: scales.{name}")
    resolved = {**recipe.settings, **settings, **_mapping(scales.get(scale), "")}
    if recipe.validate is not None:
        try:
            recipe.validate(resolved)
        except ValueError as err:
            raise ExperimentError(f"{path} ({scale}): {err}") from err
    run_seed = raw.get("seed", 0) if seed is None else seed
    if not isinstance(run_seed, int) or isinstance(run_seed, bool):
        raise ExperimentError(f"{path}: seed must be an integer, got {run_seed!r}")
    return {
        "name": path.stem,
        "recipe": recipe.name,
        "title": str(raw.get("title") or path.stem),
        "question": str(raw.get("question") or ""),
        "scale": scale,
        "seed": run_seed,
        "settings": resolved,
    }


def _check_manifest(manifest: Path, columns: Sequence[str]) -> None:
    import csv

    if not manifest.is_file():
        raise ExperimentError(f"no manifest {manifest}")
    with open(manifest, newline="") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise ExperimentError(
            f"{manifest}: missing column(s) {missing} that this recipe needs (it has {', '.join(header) or 'none'})"
        )


def _check_models(models: Sequence[Path], manifest: Path | None) -> None:
    from monai_sal_app.data.manifest import read_manifest
    from monai_sal_app.models.checkpoint import read_card

    items = read_manifest(manifest) if manifest is not None else []
    labels = sorted({int(i["label"]) for i in items if i.get("label") is not None})
    for model in models:
        if not model.is_file():
            raise ExperimentError(f"no checkpoint {model}")
        try:
            card = read_card(model)
        except (OSError, ValueError) as err:
            raise ExperimentError(f"{model}: {err}") from err
        if labels and labels[-1] >= card.num_classes:
            raise ExperimentError(
                f"{model}: its card has {card.num_classes} classes ({', '.join(card.labels)}) but the data "
                f"has label {labels[-1]}"
            )
        if items:
            from monai_sal_app.data.io import read_image

            ndim = read_image(items[0]["image"])[0].ndim
            if ndim != card.spatial_dims:
                raise ExperimentError(f"{model}: a {card.spatial_dims}D model, but the data's images are {ndim}D")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("monai-sal", "torch", "monai", "numpy", "scipy", "scikit-learn", "scikit-image", "captum"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "device": str(distributed.device()),
        "world_size": distributed.world_size(),
        "torch_threads": torch.get_num_threads(),
    }


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


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
            result = _json_safe(compute())
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
            from tqdm.auto import tqdm

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
                        rows = _json_safe(compute(indices, [items[i] for i in indices]))
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
        from monai_sal_app.data.manifest import read_manifest

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
        from monai_sal_app.metrics.stats import summarize, write_csv

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


def run_experiment(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scale: str = "default",
    data: str | os.PathLike | None = None,
    models: Sequence[str | os.PathLike] = (),
    seed: int | None = None,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> Path:
    """Run a recipe (a built-in name or a YAML path) at ``scale`` into ``out``; returns the report's
    path. Everything that can be checked is checked first (ExperimentError); a rerun into the same
    ``out`` resumes from the steps already on disk, and must use the same settings."""
    from monai_sal_app.experiments.html_report import write_report
    from monai_sal_app.experiments.studies import RECIPES

    config = resolve_config(source, scale, seed)
    recipe = RECIPES[config["recipe"]]
    manifest = Path(data).resolve() if data is not None else None
    if manifest is not None:
        if not recipe.data_columns:
            raise ExperimentError(f"recipe {recipe.name} makes its own data and takes no --data")
        _check_manifest(manifest, recipe.data_columns)
    checkpoints = [Path(m).resolve() for m in models]
    if checkpoints and not recipe.models:
        raise ExperimentError(f"recipe {recipe.name} trains its own models and takes no --model")
    _check_models(checkpoints, manifest)
    if recipe.check_inputs is not None:
        try:
            recipe.check_inputs(manifest, checkpoints)
        except ValueError as err:
            raise ExperimentError(str(err)) from err

    distributed.setup()
    import yaml

    out = Path(out)
    resolved = {
        **config,
        "data": str(manifest) if manifest else None,
        "models": [str(c) for c in checkpoints],
    }
    config_file = out / "config.yaml"
    if config_file.is_file():
        previous = yaml.safe_load(config_file.read_text())
        if previous != resolved:
            raise ExperimentError(
                f"{out} holds a run with other settings ({config_file}); choose another --out or delete it"
            )
    start = time.perf_counter()
    if distributed.is_main():
        write_text(config_file, yaml.safe_dump(resolved, sort_keys=False))
    distributed.barrier()
    run = Run(config, out, data=manifest, models=checkpoints, progress=progress, log=log)
    run.log(f"{config['name']} ({config['scale']}) -> {out}")
    recipe.run(run)
    seconds = time.perf_counter() - start
    report = out / "report.html"
    if distributed.is_main():
        environment = {**_versions(), "seconds": seconds, "resumed": run.resumed, "step_seconds": run.step_seconds}
        write_text(out / "environment.json", json.dumps(environment, indent=2))
        write_text(out / "data.json", json.dumps(run.data_hashes, indent=2))
        write_report(run, report, resolved, environment)
        log(f"wrote {report} ({seconds:.0f} s)")
    distributed.barrier()
    return report
