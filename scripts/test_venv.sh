#!/usr/bin/env bash
# Runs the whole test suite on another torch, in its own cached virtual environment: an extra
# CI leg of scripts/test.sh (.ci/run runs one per file in .ci/legs/).
# Usage: bash scripts/test_venv.sh .ci/legs/torch2.11.txt [pytest args]
#
# The leg file is a pip requirements file; a line "# python: 3.12" picks the interpreter
# (default python3). The venv is kept under ${ACQ_CI_CACHE:-~/.cache/acq-ci}/venv-<leg>-<hash>,
# the hash covering the leg file and the interpreter's version, so a rerun installs nothing; a
# venv whose build was interrupted (no .complete marker) is rebuilt. The package is copied into
# <venv>/work (so the checkout's own extension is not overwritten) and its C++ extension built
# CPU-only (ACQ_KERNELS_CUDA=0), cached by a hash of csrc/ and setup.py. Prints a header, the
# pytest summary line, and exits with pytest's status.
set -euo pipefail
# (All in one function: bash reads it whole, so editing this file mid-run is harmless.)
main() {
cd "$(dirname "$0")/.."
ROOT=$PWD
local REQ=${1:?usage: scripts/test_venv.sh LEG_REQUIREMENTS_FILE [pytest args]}
shift
LEG=$(basename "$REQ" .txt)
CACHE=${ACQ_CI_CACHE:-$HOME/.cache/acq-ci}

# The interpreter named in the leg file: on PATH, else a pyenv install of that version.
find_python() {
  local want=$1 cand
  for cand in "python$want" "$(pyenv root 2>/dev/null)/versions/$want"*/bin/"python$want"; do
    if "$cand" -c "import sys, venv" >/dev/null 2>&1; then command -v "$cand"; return 0; fi
  done
  return 1
}
WANT_PY=$(sed -n 's/^# *python: *\([0-9.]*\).*/\1/p' "$REQ" | head -1)
BASE_PY=python3
if [ -n "$WANT_PY" ]; then
  BASE_PY=$(find_python "$WANT_PY") || { echo "test_venv: python$WANT_PY not found (wanted by $REQ)"; exit 2; }
fi

KEY=$( { cat "$REQ"; "$BASE_PY" -VV; uname -m; } | sha256sum | cut -c1-12)
VENV="$CACHE/venv-$LEG-$KEY"
PY="$VENV/bin/python"
T0=$(date +%s)
echo "################ CI leg $LEG: $REQ on $("$BASE_PY" -V 2>&1), venv $VENV ################"
if [ ! -f "$VENV/.complete" ]; then
  echo "test_venv: building the venv (torch wheels are several GB; minutes on a fresh machine)"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$BASE_PY" -m venv "$VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQ" >"$VENV/pip.log" 2>&1 || {
    grep -v "^WARNING: Location" "$VENV/pip.log" | tail -30; echo "test_venv: pip install failed"; exit 1; }
  touch "$VENV/.complete"
fi
T1=$(date +%s)

# A copy of the checkout (tracked and untracked-but-not-ignored files), with this leg's extension.
WORK="$VENV/work"
rm -rf "$WORK"
mkdir -p "$WORK"
if git rev-parse --git-dir >/dev/null 2>&1; then
  git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar -c --null -T - -f - | tar -x -C "$WORK"
else
  tar -c --exclude=./build --exclude='*.so' -f - . | tar -x -C "$WORK"
fi
EXT_KEY=$( { find csrc setup.py -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.cu' -o -name setup.py \) \
               -not -path 'csrc/generated/*' -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-12)
EXT_DIR="$VENV/ext-$EXT_KEY"
if ! ls "$EXT_DIR"/_C*.so >/dev/null 2>&1; then
  echo "test_venv: building the C++ extension (CPU only)"
  ( cd "$WORK" && ACQ_KERNELS_CUDA=0 "$PY" setup.py -q build_ext --inplace >"$VENV/ext-build.log" 2>&1 ) || {
    tail -40 "$VENV/ext-build.log"; echo "test_venv: extension build failed (log: $VENV/ext-build.log)"; exit 1; }
  rm -rf "$VENV"/ext-*/
  mkdir -p "$EXT_DIR"
  cp "$WORK"/acq_kernels/_C*.so "$EXT_DIR"/
fi
cp "$EXT_DIR"/_C*.so "$WORK"/acq_kernels/
T2=$(date +%s)

cd "$WORK"
export PYTHONPATH="$WORK:$WORK/python"
"$PY" -m acq_kernels | sed 's/^/  /'
set +e
"$PY" -m pytest tests -p no:cacheprovider "$@"
RC=$?
set -e
T3=$(date +%s)
echo "test_venv $LEG: rc=$RC; venv $((T1 - T0))s, copy+extension $((T2 - T1))s, tests $((T3 - T2))s"
exit $RC
}
main "$@"
