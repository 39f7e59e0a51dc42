#!/usr/bin/env bash
# Install (scripts/install.sh) and run the whole test suite. Extra arguments go to pytest.
# pytest's exit code 5 ("no tests collected") is turned into a failure: an empty run is never green.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || { echo "error: install failed" >&2; exit 1; }
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
