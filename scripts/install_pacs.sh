#!/usr/bin/env bash
# Install the DICOM tools the PACS tests use (docs/DEVELOPMENT.md): Orthanc with its DICOMweb plugin
# (Debian packages orthanc, orthanc-dicomweb), the store the DICOMweb tests start on 127.0.0.1, and
# dciodvfy (Debian dicom3tools), which validates every DICOM object monai-sal writes. Safe to re-run.
# As root it installs them with apt-get (the packages' own service is not started); otherwise it warns,
# naming the command, and the tests that need them skip (or fail under CI=1).
set -uo pipefail
missing=""
command -v Orthanc >/dev/null 2>&1 || missing="$missing orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
command -v dciodvfy >/dev/null 2>&1 || missing="$missing dicom3tools"
if [ -z "$missing" ]; then
  echo "install_pacs: orthanc, orthanc-dicomweb and dicom3tools already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_pacs: warning: missing Debian package(s)$missing; install them with: sudo apt-get install$missing" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The orthanc package would start its own service on ports 8042 and 4242: the tests start their own Orthanc.
policy=/usr/sbin/policy-rc.d
added_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
fi
# shellcheck disable=SC2086  # one word per package
{ apt-get install -y -q $missing || { apt-get update -q && apt-get install -y -q $missing; }; } >/dev/null
status=$?
[ -n "$added_policy" ] && rm -f "$policy"
if [ "$status" -ne 0 ]; then
  echo "install_pacs: warning: apt-get could not install$missing" >&2
  exit 1
fi
echo "install_pacs: installed$missing"
