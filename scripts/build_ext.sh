#!/usr/bin/env bash
# Incremental rebuild of acq_kernels._C for development (ninja recompiles only what changed).
# Serialised with a lock so that parallel builds do not collide, and the new .so is moved into
# place atomically so that running Python processes holding the old one do not crash.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
exec 9>/tmp/acq_kernels_build.lock
flock 9
"$PY" setup.py -q build_ext --build-lib build/stage >/tmp/acq_kernels_build.log 2>&1 || {
  grep -E "error|Error" -A3 /tmp/acq_kernels_build.log | head -60; echo "build failed: see /tmp/acq_kernels_build.log"; exit 1; }
so=$(ls build/stage/acq_kernels/_C*.so)
cp "$so" "acq_kernels/.$(basename "$so").tmp"
mv -f "acq_kernels/.$(basename "$so").tmp" "acq_kernels/$(basename "$so")"
echo "built $(basename "$so")"
