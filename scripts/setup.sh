#!/usr/bin/env bash
# Installs the pinned dependencies and builds acq_kernels (+ its C++/CUDA extension) in place.
# Usage: bash scripts/setup.sh [requirements file]   (default: requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
REQ="${1:-requirements-dev.txt}"
"$PY" -m pip install --quiet --disable-pip-version-check -r "$REQ"
# --no-build-isolation: compile against the torch just installed instead of fetching another.
"$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PY" -m acq_kernels
