#!/usr/bin/env bash
# Create .venv (if missing) and install monai-sal into it with the MONAI Label server extra, on the
# stack the tests run on (torch 2.14.1, monai 1.6.1), then the real-anatomy bases. Safe to re-run.
#   bash scripts/install.sh          # the package + [server]
#   bash scripts/install.sh --test   # also [test]: pytest, the reference implementations, ruff, and the
#                                    # DICOM tools the tests use (scripts/install_pacs.sh: Orthanc, dciodvfy)
# pip is deliberately NOT upgraded: pip >= 26.2 ignores this machine's torch cap inside build
# environments, and monailabel's sam2 dependency builds from source with torch in its build env.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=server
case "${1:-}" in
  "") ;;
  --test) extras=server,test ;;
  *) echo "usage: scripts/install.sh [--test]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]" \
  torch==2.14.1 torchvision==0.29.1 monai==1.6.1
# The real-anatomy bases (docs/DATA_REAL.md); warns and goes on when one cannot be had.
bash scripts/install_data.sh || echo "install: warning: some real-anatomy bases are missing (see above)" >&2
# jemalloc for batch work (monai_sal_app/allocator.py, docs/BENCHMARKS.md "The memory allocator"):
# Debian's libjemalloc2 unpacked into .data/jemalloc without root; without it batch work runs on
# glibc with its tunables raised, a little slower and with a higher peak.
if ls .data/jemalloc/usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then
  echo "install: jemalloc already in .data/jemalloc"
elif command -v apt-get >/dev/null 2>&1 && (
  REPO=$(pwd) && TMP=$(mktemp -d) && trap 'rm -rf "$TMP"' EXIT && cd "$TMP" &&
    { apt-get download libjemalloc2 >/dev/null 2>&1 ||
      { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && apt-get download libjemalloc2 >/dev/null 2>&1; }; } &&
    mkdir -p "$REPO/.data/jemalloc" && dpkg-deb -x libjemalloc2_*.deb "$REPO/.data/jemalloc"
) && ls .data/jemalloc/usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then
  echo "install: jemalloc -> .data/jemalloc"
else
  echo "install: warning: could not get Debian's libjemalloc2; batch work uses glibc's allocator" >&2
fi
if [ "$extras" = server,test ]; then
  bash scripts/install_pacs.sh || echo "install: warning: the PACS tests' tools are missing (see above)" >&2
fi
