#!/usr/bin/env bash
# Install (scripts/install.sh --test), lint (ruff check + ruff format --check), install Chromium for
# the report tests when it is missing, and run the whole test suite. Extra arguments go to pytest.
# A lint error fails the run; so does pytest's exit code 5 ("no tests collected"): an empty run is
# never green.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test || { echo "error: install failed" >&2; exit 1; }
.venv/bin/ruff check . && .venv/bin/ruff format --check . || { echo "error: ruff found lint or format errors" >&2; exit 1; }
# The report tests open report.html in headless Chromium: Debian's package, installed when missing.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null \
      || { echo "error: could not install chromium with apt-get" >&2; exit 1; }
  else
    echo "error: the report tests need Chromium: install it (sudo apt-get install chromium) and run again" >&2
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
