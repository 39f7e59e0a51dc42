#!/usr/bin/env bash
# Install the real-anatomy bases of monai-sal's "real data" generators (docs/DATA_REAL.md). Safe to re-run.
#
#   <repo>/.data/mricron/usr/share/mricron/templates/   Colin27 T1 (ch2*.nii.gz) + AAL atlas   (Debian mricron-data)
#   <repo>/.venv  pydicom-data (RG1_UNCR.dcm chest radiograph), nilearn (MNI152 fallback)  (PyPI)
#   <repo>/.data/pyradiomics/data/                       lung1/lung2 CT + tumour masks (NRRD)   (PyPI sdist pyradiomics==3.0.1)
#
# Only this script touches a package registry; generation and tests run offline afterwards. A base that
# cannot be installed prints a warning and the script goes on (the tests that need it then skip, naming it).
# Requires .venv (scripts/install.sh). Root is not needed: `apt-get download` + `dpkg-deb -x` unpack as a user.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DATA="$REPO/.data"
PY="$REPO/.venv/bin/python"
status=0
warn() { echo "install_data: warning: $*" >&2; }

if [ ! -x "$PY" ]; then
  echo "install_data: error: $PY missing; run scripts/install.sh first" >&2
  exit 1
fi
mkdir -p "$DATA"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 1. Colin27 + AAL (Debian mricron-data), unpacked without root.
TEMPLATES="$DATA/mricron/usr/share/mricron/templates"
if [ -f "$TEMPLATES/ch2.nii.gz" ] && [ -f "$TEMPLATES/aal.nii.gz" ]; then
  echo "install_data: mricron-data already in $DATA/mricron"
else
  (
    cd "$TMP" || exit 1
    apt-get download mricron-data >/dev/null 2>&1 || {
      # the package lists may be missing on a fresh machine: refresh them once (needs root), then retry
      if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; fi
      apt-get download mricron-data >/dev/null 2>&1
    } && dpkg-deb -x mricron-data_*.deb "$DATA/mricron"
  ) && [ -f "$TEMPLATES/ch2.nii.gz" ] && echo "install_data: mricron-data -> $DATA/mricron" \
    || { warn "could not get Debian package mricron-data (apt-get download mricron-data); brain-atrophy falls back to nilearn's MNI152"; status=1; }
fi

# 2. PyPI packages into the venv, never moving the pinned numpy/torch stack.
CONSTRAINTS="$TMP/constraints.txt"
"$PY" -m pip freeze --disable-pip-version-check 2>/dev/null | grep -iE '^(numpy|torch|torchvision|scipy|scikit-learn|pandas|pydicom|nibabel)==' >"$CONSTRAINTS"
if "$PY" -c "import data_store, nilearn" >/dev/null 2>&1; then  # pydicom-data installs as data_store
  echo "install_data: pydicom-data and nilearn already installed"
elif "$PY" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" pydicom-data nilearn; then
  echo "install_data: pydicom-data and nilearn installed"
else
  warn "pip install pydicom-data nilearn failed; chest-xray (and the MNI152 fallback) will be unavailable"
  status=1
fi

# 3. pyradiomics 3.0.1 sample CT volumes: the source archive's data/ folder (no build, no install).
if [ -f "$DATA/pyradiomics/data/lung1_image.nrrd" ] && [ -f "$DATA/pyradiomics/data/lung2_label.nrrd" ]; then
  echo "install_data: pyradiomics data already in $DATA/pyradiomics"
else
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" setuptools wheel versioneer numpy >/dev/null 2>&1 || true
  if "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-build-isolation --no-binary :all: \
      -d "$TMP/sdist" pyradiomics==3.0.1 >/dev/null 2>&1 \
     && archive=$(ls "$TMP"/sdist/pyradiomics-3.0.1.* 2>/dev/null | head -n 1) && [ -n "$archive" ]; then
    mkdir -p "$TMP/unpacked" "$DATA/pyradiomics"
    case "$archive" in
      *.zip) "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$archive" "$TMP/unpacked" ;;
      *) tar -xf "$archive" -C "$TMP/unpacked" ;;
    esac
    rm -rf "$DATA/pyradiomics/data"
    cp -r "$TMP"/unpacked/pyradiomics-3.0.1/data "$DATA/pyradiomics/data" \
      && echo "install_data: pyradiomics data -> $DATA/pyradiomics/data" \
      || { warn "pyradiomics-3.0.1 archive has no data/ folder"; status=1; }
  else
    warn "pip download pyradiomics==3.0.1 failed; ct-lesions will be unavailable"
    status=1
  fi
fi

[ "$status" = 0 ] && echo "install_data: all bases installed" || warn "some bases are missing (see above); the rest work"
exit 0
