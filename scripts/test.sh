#!/usr/bin/env bash
# Install (scripts/install.sh --test), lint (ruff check + ruff format --check) and run the whole test
# suite. Extra arguments go to pytest. A lint error fails the run; so does pytest's exit code 5
# ("no tests collected"): an empty run is never green.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test || { echo "error: install failed" >&2; exit 1; }
.venv/bin/ruff check . && .venv/bin/ruff format --check . || { echo "error: ruff found lint or format errors" >&2; exit 1; }
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
