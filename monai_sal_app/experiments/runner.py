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
  time of this invocation and of each step it computed (``resumed``: some were read back), the
  memory allocator and the peak resident memory of (rank 0's) process in MiB;
  ``data.json``: SHA-256 of every manifest and of the files it lists;
- ``steps/``: each finished step's result, so that an interrupted run resumes where it stopped;
- ``results/*.csv`` (one row per image x method x condition) and ``results/*_summary.csv`` (mean
  and 95% CI), ``figures/*.png`` and ``report.html``.

Under ``torchrun`` the per-item steps are dealt to the ranks (``distributed.shard``) and gathered;
rank 0 writes the tables, the figures and the report.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import yaml

from monai_sal_app import distributed
from monai_sal_app.allocator import allocator_in_use, peak_resident_memory_mb
from monai_sal_app.data.io import read_image
from monai_sal_app.data.manifest import read_manifest
from monai_sal_app.experiments.html_report import write_report
from monai_sal_app.experiments.studies import get_recipe
from monai_sal_app.experiments.study import ExperimentError, Run
from monai_sal_app.files import write_text
from monai_sal_app.models.checkpoint import read_card
from monai_sal_app.models.sources import load_model_source, source_kind

__all__ = [
    "SCALES",
    "ExperimentError",
    "config_folder",
    "experiment_names",
    "resolve_config",
    "run_experiment",
]

SCALES = ("smoke", "default", "paper")
CONFIG_KEYS = ("recipe", "title", "question", "seed", "settings", "scales")


def config_folder() -> Path:
    """The folder of the study recipe files that come with the package: ``configs/experiments``, installed with the package as
    ``monai_sal_app.experiment_configs`` (an editable install of a checkout cannot import that
    folder as a package, so there it is the checkout's own)."""
    try:
        return Path(str(importlib.resources.files("monai_sal_app.experiment_configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs" / "experiments"


def experiment_names() -> list[str]:
    """The names of the study recipes that come with the package."""
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


def resolve_config(
    source: str | os.PathLike, scale: str = "default", seed: int | None = None, overrides: dict | None = None
) -> dict:
    """The settings a run uses: the recipe's defaults, then the file's ``settings``, then its
    ``scales[scale]``, then ``overrides`` (``experiment run --set KEY=VALUE``). ``source``: a built-in
    name or a YAML path. ExperimentError for anything unknown or malformed (every scale of the file
    is checked, not only the one asked for)."""
    if scale not in SCALES:
        raise ExperimentError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    path = _config_path(source)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ExperimentError(f"{path}: not a readable YAML file ({err})") from err
    raw = _mapping(raw, str(path))
    _unknown(raw, CONFIG_KEYS, str(path))
    try:
        recipe = get_recipe(raw.get("recipe"))
    except ValueError as err:
        raise ExperimentError(f"{path}: {err}") from err
    settings = _mapping(raw.get("settings"), f"{path}: settings")
    _unknown(settings, recipe.settings, f"{path}: settings")
    scales = _mapping(raw.get("scales"), f"{path}: scales")
    _unknown(scales, SCALES, f"{path}: scales")
    for name, changes in scales.items():
        _unknown(_mapping(changes, f"{path}: scales.{name}"), recipe.settings, f"{path}: scales.{name}")
    overrides = _mapping(overrides, "--set")
    _unknown(overrides, recipe.settings, f"{recipe.name}: --set")
    resolved = {**recipe.settings, **settings, **_mapping(scales.get(scale), ""), **overrides}
    if recipe.validate is not None:
        try:
            recipe.validate(resolved)
        except ValueError as err:
            where = f"{scale}, --set {', '.join(overrides)}" if overrides else scale
            raise ExperimentError(f"{path} ({where}): {err}") from err
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

    items = read_manifest(manifest) if manifest is not None else []
    labels = sorted({int(i["label"]) for i in items if i.get("label") is not None})
    for model in models:
        if not model.exists():
            raise ExperimentError(f"no checkpoint {model}")
        try:  # any model source (models.sources): a checkpoint's card is read without its network
            card = read_card(model) if source_kind(model) == "checkpoint" else load_model_source(model, "cpu").card
        except (OSError, ValueError) as err:
            raise ExperimentError(f"{model}: {err}") from err
        if labels and labels[-1] >= card.num_classes:
            raise ExperimentError(
                f"{model}: its card has {card.num_classes} classes ({', '.join(card.labels)}) but the data "
                f"has label {labels[-1]}"
            )
        if items:
            ndim = read_image(items[0]["image"])[0].ndim
            if ndim != card.spatial_dims:
                raise ExperimentError(f"{model}: a {card.spatial_dims}D model, but the data's images are {ndim}D")


def _versions() -> dict:
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


def run_experiment(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scale: str = "default",
    data: str | os.PathLike | None = None,
    models: Sequence[str | os.PathLike] = (),
    seed: int | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> Path:
    """Run a recipe (a built-in name or a YAML path) at ``scale`` into ``out``; returns the report's
    path. ``overrides``: settings that replace the scale's (setting -> value). Everything that can be
    checked is checked first (ExperimentError); a rerun into the same ``out`` resumes from the steps
    already on disk, and must use the same settings."""
    config = resolve_config(source, scale, seed, overrides)
    recipe = get_recipe(config["recipe"])
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
        environment = {
            **_versions(),
            "seconds": seconds,
            "resumed": run.resumed,
            "step_seconds": run.step_seconds,
            "allocator": allocator_in_use(),
            "peak_resident_memory_mb": round(peak_resident_memory_mb(), 1),
        }
        write_text(out / "environment.json", json.dumps(environment, indent=2))
        write_text(out / "data.json", json.dumps(run.data_hashes, indent=2))
        write_report(run, report, resolved, environment)
        log(f"wrote {report} ({seconds:.0f} s)")
    distributed.barrier()
    return report
