#!/usr/bin/env bash
# One-step set-up of a fresh Debian machine for bnnshift (idempotent, quick when done already).
#   bash scripts/setup.sh          # runtime: Fashion-MNIST, torch, bnnshift
#   bash scripts/setup.sh --test   # + test tools and PostgreSQL (for the distributed-search test)
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
apt_pkgs="dataset-fashion-mnist"
[ $want_test -eq 1 ] && apt_pkgs="$apt_pkgs postgresql"
# the packed runtime's C++ kernel (bnnshift pack) is built with torch's cpp_extension: a compiler and ninja
command -v g++ >/dev/null || command -v c++ >/dev/null || apt_pkgs="$apt_pkgs g++"
command -v ninja >/dev/null || apt_pkgs="$apt_pkgs ninja-build"
missing=""
for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ] && command -v apt-get >/dev/null; then
  echo "setup: apt-get install$missing" >&2
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
# torch first and pinned: this machine has these wheels on local disk (a bare 'torch' would download GBs)
$PY -c "import torch, torchvision" 2>/dev/null || $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
extras="."
[ $want_test -eq 1 ] && extras=".[dev,distributed]"
$PY -m pip install -q -e "$extras" 2>&1 | grep -v "Running pip as the 'root' user" || true
$PY -c "import bnnshift" >/dev/null
echo "setup: ok" >&2
