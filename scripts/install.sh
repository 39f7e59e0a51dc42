#!/usr/bin/env bash
# Create .venv (if missing) and install monai-sal with its test extras into it. Safe to re-run.
# pip is deliberately NOT upgraded: pip >= 26.2 ignores this machine's torch cap inside build
# environments, and monailabel's sam2 dependency builds from source with torch in its build env.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The real-anatomy bases (docs/DATA_REAL.md); warns and goes on when one cannot be had.
bash scripts/install_data.sh || echo "install: warning: some real-anatomy bases are missing (see above)" >&2
