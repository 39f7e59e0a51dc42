"""Every built-in study run twice at ``smoke`` with the same seed gives the same CSVs, byte for byte.

The first run is the session's (``conftest.smoke_runs``), the one the study's own tests read; the
second runs here into a folder of its own. Only files that hold wall times are left out.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import run_smoke

from monai_sal_app.experiments.runner import experiment_names

# The CSVs of a recipe that hold wall times, which differ between any two runs.
WALL_TIMES = {"explainers": {"timing.csv", "timing_summary.csv"}}
# Recipes whose second run starts from the first run's generated images (the generator gives the
# same files for the same seed, tested in test_generators.py, and takes most of the run's time).
DATA_REUSED = {"trust"}


def test_every_study_is_checked():
    """The studies the test below runs: all of them, so that none drops out unseen."""
    assert set(experiment_names()) == {
        "ct_importance",
        "demo",
        "explainers",
        "subtypes",
        "trainable_vs_posthoc",
        "trust",
    }


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", experiment_names())
def test_a_rerun_with_the_same_seed_gives_the_same_csvs(recipe, smoke_runs, tmp_path):
    first = smoke_runs(recipe)
    again = tmp_path / "again"
    if recipe in DATA_REUSED:
        shutil.copytree(first / "work" / "data", again / "work" / "data")
    run_smoke(recipe, again)
    tables = sorted(set(csv_names(first)) - WALL_TIMES.get(recipe, set()))
    assert tables and csv_names(again) == csv_names(first)
    for name in tables:
        assert (again / "results" / name).read_bytes() == (first / "results" / name).read_bytes(), name


def csv_names(run) -> list[str]:
    return sorted(path.name for path in (run / "results").glob("*.csv"))
