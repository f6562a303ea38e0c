#!/usr/bin/env bash
# One-call GPU check (H200 box with its own torch / Triton / Python, no network, 16 cores):
# build the extension in place, print the build/backends, run the CUDA-marked tests (including the
# backend-vs-backend comparison in tests/test_gpu.py), the benchmark report with achieved bandwidth
# against a device-to-device copy measured in the same run, then as much of the test suite as time
# allows. Every stage is time-boxed, and a failing stage never stops the later ones from writing.
#
# Writes (at most 8 files, at most $OUT/a/b/file):
#   $OUT/summary.txt              stage, exit status, seconds (read this first)
#   $OUT/build.log  $OUT/info.txt  $OUT/cuda_tests.log  $OUT/report.log  $OUT/suite.log
#   $OUT/results/<gpu>-<date>.json and .png   -> copy into bench/results/, then
#                                               `python -m bench.report --readme-only`
# Usage: OUT=/some/dir bash scripts/gpu_check.sh   (default OUT: ./gpu_check_out)
#   GPU_CHECK_BUDGET=seconds (default 470), GPU_CHECK_SKIP_BUILD=1 (extension already built)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT/results"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-470}"   # seconds for everything; the issue allows 8 minutes
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET ACQ_KERNELS_BACKEND
: >"$OUT/summary.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME MAX_SECONDS LOG CMD...: runs CMD under `timeout` (never more than the time left),
# appending output to LOG and one status line to summary.txt.
stage() {
  local name=$1 max=$2 log=$3; shift 3
  local t=$(( $(left) < max ? $(left) : max ))
  if (( t < 10 )); then echo "$name: skipped (time budget spent)" | tee -a "$OUT/summary.txt"; return 0; fi
  local s=$(date +%s)
  echo "== $name (limit ${t}s): $*" >>"$log"
  timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - s ))s (limit ${t}s)$([ $rc = 124 ] && echo ' TIMED OUT')" | tee -a "$OUT/summary.txt"
  return 0
}

{ echo "gpu_check $(date -u +%FT%TZ) host=$(hostname) commit=${ACQ_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} >>"$OUT/summary.txt"

# 1. Build acq_kernels._C in place (no pip, no network): CUDA kernels for sm_90.
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then echo "build: skipped (GPU_CHECK_SKIP_BUILD=1)" >>"$OUT/summary.txt"
else stage build 240 "$OUT/build.log" env ACQ_KERNELS_CUDA=1 "$PY" setup.py build_ext --inplace; fi
ls acq_kernels/_C*.so >>"$OUT/build.log" 2>&1

# 2. What got built and which backend each device uses.
stage info 60 "$OUT/info.txt" "$PY" -m acq_kernels

# 3. CUDA-marked tests: every backend usable on CUDA against the reference (tests/test_gpu.py)
#    and the families' own GPU tests.
#    TRITON_INTERPRET=0: tests/conftest.py would otherwise default it to 1 (interpreted kernels).
stage cuda_tests 150 "$OUT/cuda_tests.log" env TRITON_INTERPRET=0 "$PY" -m pytest tests -m cuda -q -ra -p no:cacheprovider \
  -o addopts="" --benchmark-disable

# 4. Benchmark report: kernels first, then torch.compile contenders while the budget lasts.
REPORT_T=$(( $(left) - 70 ))
stage report "$(( REPORT_T > 60 ? REPORT_T : 60 ))" "$OUT/report.log" "$PY" -m bench.report \
  --out "$OUT/results" --no-readme --time-budget "$(( REPORT_T > 80 ? REPORT_T - 40 : 40 ))"

# 5. The rest of the suite (CPU paths, Triton interpreter, AOT), with whatever time is left.
XDIST=$("$PY" -c "import xdist" >/dev/null 2>&1 && echo "-n 8")
stage suite 600 "$OUT/suite.log" "$PY" -m pytest tests -q -m "not cuda and not slow" -p no:cacheprovider \
  $XDIST -o addopts="" --benchmark-disable

echo "total: $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
ls -R "$OUT" >>"$OUT/summary.txt"
exit 0
