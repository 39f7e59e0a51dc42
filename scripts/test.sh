#!/usr/bin/env bash
# Install (scripts/install.sh --test), lint (ruff check + ruff format --check), check the import
# contracts of pyproject.toml (lint-imports), check that the Slicer module runs on Slicer's Python 3.9
# (vermin), install Chromium and CMake for the tests when they are
# missing, and run the whole test suite. Extra arguments go to pytest.
# A lint error fails the run; so does pytest's exit code 5 ("no tests collected"): an empty run is
# never green.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test || { echo "error: install failed" >&2; exit 1; }
.venv/bin/ruff check . && .venv/bin/ruff format --check . || { echo "error: ruff found lint or format errors" >&2; exit 1; }
# The layers, the server's independence from the studies, no cycles (pyproject.toml, docs/DESIGN.md).
.venv/bin/lint-imports --no-cache || { echo "error: an import breaks the contracts above (docs/DESIGN.md, Layers)" >&2; exit 1; }
# Slicer 5.6 and 5.8 run the module on Python 3.9, 5.10 on 3.12: nothing newer than 3.9 in it
# (annotations included: Slicer's parameterNodeWrapper evaluates them).
.venv/bin/vermin -q --target=3.9- --no-tips --violations --eval-annotations slicer_module/ \
  || { echo "error: slicer_module/ must run on Python 3.9 (Slicer 5.6, 5.8): vermin found the lines above" >&2; exit 1; }
# Debian packages the tests use, installed when missing: Chromium (the report tests open report.html
# in it headless) and CMake (the Slicer extension's metadata is computed by its CMakeLists.txt).
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086  # one word per package
    { apt-get install -y -q $missing || { apt-get update -q && apt-get install -y -q $missing; }; } >/dev/null \
      || { echo "error: could not install$missing with apt-get" >&2; exit 1; }
  else
    echo "error: the tests need$missing: install it (sudo apt-get install$missing) and run again" >&2
    exit 1
  fi
fi
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
