"""The core installs and runs without MONAI Label; its declared dependencies are what it imports."""

from __future__ import annotations

import ast
import importlib.metadata
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

import monai_sal_app

PACKAGE = Path(monai_sal_app.__file__).resolve().parent
# The server adapter: MONAI Label's app class and its task modules (the `server` extra).
SERVER_MODULES = ("monai_sal_app.main", "monai_sal_app.lib")
# What the `server` extra brings and the core must not need: MONAI Label and the web stack under it.
SERVER_ONLY = ("monailabel", "fastapi", "starlette", "uvicorn", "dicomweb_client", "pynetdicom")
# Runs Python with those modules made unimportable (``import monailabel`` raises ImportError).
WITHOUT_SERVER = f"import sys\nfor name in {SERVER_ONLY!r}:\n    sys.modules[name] = None\n"


def run_without_server(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVER + code, *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def cli_without_server(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    code = "from monai_sal_app.cli import main\nsys.exit(main(['--quiet', *sys.argv[1:]]))\n"
    return run_without_server(code, *args, cwd=cwd)


def core_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="monai_sal_app.")]
    return ["monai_sal_app", *sorted(n for n in names if not n.startswith(SERVER_MODULES))]


@pytest.mark.slow
def test_every_core_module_imports_without_monailabel():
    modules = core_modules()
    assert {"monai_sal_app.saliency.core", "monai_sal_app.cli", "monai_sal_app.serve"} <= set(modules)
    code = (
        "import importlib\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_ONLY!r} and sys.modules[m] is not None)\n"
        "print('loaded:', loaded)\n"
    )
    result = run_without_server(code, *modules)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded: []"


@pytest.mark.e2e
def test_data_train_explain_evaluate_run_without_monailabel(tmp_path):
    steps = [
        "data shepp-logan --size 32 --per-class 6 --out data",
        "data shepp-logan --preset test --size 32 --per-class 3 --seed 1 --out test",
        "train --data data/manifest.csv --test test/manifest.csv --epochs 1 --out model.pt",
        "explain --model model.pt test/manifest.csv --method gradient,gradcam --out maps",
        "evaluate maps --out evaluation",
    ]
    for step in steps:
        result = cli_without_server(*step.split(), cwd=tmp_path)
        assert result.returncode == 0, (step, result.stderr)
    assert (tmp_path / "model.json").is_file() and (tmp_path / "evaluation" / "summary.md").is_file()
    assert "gradcam" in (tmp_path / "evaluation" / "summary.md").read_text()


def test_serve_without_the_server_extra_names_the_install_command(tmp_path):
    result = cli_without_server("serve", "--data", "shepp-logan", "--workdir", str(tmp_path / "work"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert 'pip install "monai-sal[server]"' in result.stderr
    assert not (tmp_path / "work").exists()  # stopped before any data or training


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the non-standard-library modules ``path`` imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "monai_sal_app"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_core_dependencies_are_exactly_what_the_core_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    server = _requirement_names(project["optional-dependencies"]["server"])
    distributions = importlib.metadata.packages_distributions()

    imported: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module.startswith(SERVER_MODULES):
            continue
        for name in _third_party_imports(path):
            if module == "monai_sal_app.serve" and name == "monailabel":
                continue  # `serve` checks for the server extra first (test above)
            # the distribution that provides the module (itk's module comes from several: take the declared one)
            candidates = [d.lower().replace("_", "-") for d in [name, *distributions.get(name, [])]]
            dist = next((d for d in candidates if d in core), candidates[-1])
            imported.setdefault(dist, set()).add(module)
    imported.pop("nilearn", None)  # a real-anatomy base, installed by scripts/install_data.sh, imported lazily
    # the `dicom` extra (also in `server`): imported only when a map is written as DICOM (data.dicom_objects)
    for name in _requirement_names(project["optional-dependencies"]["dicom"]) - core:
        assert imported.pop(name, None) in (None, {"monai_sal_app.data.dicom_objects"}), name
        assert name in server, name
    assert set(imported) <= core, {d: sorted(m) for d, m in imported.items() if d not in core}
    assert core <= set(imported), f"declared but never imported by the core: {sorted(core - set(imported))}"
    assert not core & {"monailabel", "dicomweb-client", "pynetdicom"}
    assert not any(re.search(r"(numpy|pydicom)\s*<", r) for r in project["dependencies"])
    assert "monailabel" in server


def test_the_package_list_is_every_folder_and_the_wheel_carries_the_experiment_recipes(tmp_path):
    import shutil
    import zipfile

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {"monai_sal_app"} | {
        m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="monai_sal_app.") if m.ispkg
    }
    assert set(declared) == folders | {"monai_sal_app.experiment_configs"}

    # Built from a copy, so that setuptools' build folders stay out of the checkout.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("monai_sal_app", "configs"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("monai_sal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert f"monai_sal_app/experiment_configs/{recipe.name}" in names
    assert "monai_sal_app/experiments/studies/subtypes.py" in names
