"""The import contracts of pyproject.toml (layers, the server apart from the studies, no cycles),
checked by import-linter on the package as it is and on a copy that breaks one of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` run on the package under ``root`` with the contracts of its pyproject.toml."""
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=environment, capture_output=True, text=True, timeout=300
    )


def test_the_package_keeps_its_import_contracts():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_an_import_of_the_studies_from_the_server_breaks_a_contract(tmp_path):
    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "monai_sal_app", copy / "monai_sal_app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO / "pyproject.toml", copy / "pyproject.toml")
    probe = copy / "monai_sal_app" / "lib" / "errors.py"
    probe.write_text(probe.read_text() + "\nfrom monai_sal_app.experiments import runner  # noqa: E402, F401\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "The server never imports the studies BROKEN" in result.stdout
    assert "monai_sal_app.lib.errors -> monai_sal_app.experiments.runner" in result.stdout
