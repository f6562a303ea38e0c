#!/usr/bin/env bash
# One-call GPU check (H200 box with its own torch / Triton / Python, no network, 16 cores):
# build the extension in place, print the build/backends, run tests/test_gpu.py (every backend
# usable on CUDA against the reference) FIRST with its own time budget, then the families' other
# CUDA-marked tests, the benchmark report with achieved bandwidth against a device-to-device copy
# measured in the same run, then as much of the rest of the suite as time allows. Every stage is
# time-boxed (never more than the budget left), and a failing stage never stops the later ones.
#
# Writes exactly these 8 files (the device tool returns at most 8, at most $OUT/a/b/file):
#   $OUT/summary.txt     versions, one line per stage (exit status, seconds, limit, test counts),
#                        the total by the script's own clock: read this first
#   $OUT/failures.txt    every failed / errored test of every pytest stage, with its first line
#   $OUT/junit_gpu.xml   junit XML of tests/test_gpu.py
#   $OUT/build.log       extension build + `python -m acq_kernels` (what got built, backends)
#   $OUT/tests.log       output of the pytest stages
#   $OUT/report.log      output of the benchmark report
#   $OUT/results/<gpu>-<date>.json and .png  -> copy into bench/results/, then
#                                               `python -m bench.report --readme-only`
# Usage: OUT=/some/dir bash scripts/gpu_check.sh   (default OUT: ./gpu_check_out)
#   GPU_CHECK_BUDGET=seconds (default 450: the device run allows 8 minutes, this leaves slack
#     for `timeout`'s kill grace), GPU_CHECK_SKIP_BUILD=1 (extension already built),
#   GPU_CHECK_GPU_WORKERS=N (pytest-xdist workers for test_gpu.py, default 4 where xdist is
#     installed; 0 = one process), GPU_CHECK_DRY_RUN=1 (print each stage's command and limit,
#     run nothing: checks the plan on any machine).
# On a machine without a GPU it still runs to the end (CUDA tests skip) and exits 0.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT/results"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET ACQ_KERNELS_BACKEND
JUNIT_TMP=$(mktemp -d)   # junit of the stages after test_gpu.py: parsed into failures.txt
: >"$OUT/summary.txt"; : >"$OUT/failures.txt"; : >"$OUT/build.log"; : >"$OUT/tests.log"; : >"$OUT/report.log"

DRY_SPENT=0   # a dry run charges each stage its whole limit: the worst case the budget allows
left() { echo $(( BUDGET - ($(date +%s) - START) - DRY_SPENT )); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# stage NAME MAX_SECONDS LOG CMD...: runs CMD under `timeout` (never more than the time left),
# appending output to LOG and one status line to summary.txt.
stage() {
  local name=$1 max=$2 log=$3; shift 3
  local avail=$(( $(left) - 5 ))   # 5 s: timeout's grace before it kills
  local t=$(( avail < max ? avail : max ))
  if (( t < 10 )); then note "$name: skipped (time budget spent)"; return 0; fi
  if [ "$DRY" = 1 ]; then note "$name: dry run (limit ${t}s): $*"; DRY_SPENT=$(( DRY_SPENT + t + 5 )); return 0; fi
  # pytest stages end themselves 15 s before the limit, so that their junit XML is written.
  local args=() a
  for a in "$@"; do
    if [ "$a" = "--session-timeout=AUTO" ]; then
      [ "$HAVE_SESSION_TIMEOUT" = 1 ] && args+=("--session-timeout=$(( t > 30 ? t - 15 : t ))")
    else args+=("$a"); fi
  done
  local s=$(date +%s)
  echo "== $name (limit ${t}s): ${args[*]}" >>"$log"
  timeout --kill-after=5 "$t" "${args[@]}" >>"$log" 2>&1
  local rc=$?
  note "$name: rc=$rc in $(( $(date +%s) - s ))s (limit ${t}s)$( (( rc == 124 || rc == 137 )) && echo ' TIMED OUT')"
  return 0
}

# junit_summary NAME XML...: pass/fail/skip counts to summary.txt, failures to failures.txt.
junit_summary() {
  local name=$1; shift
  [ "$DRY" = 1 ] && return 0
  "$PY" - "$name" "$OUT/failures.txt" "$@" <<'EOF' | tee -a "$OUT/summary.txt"
import os, sys
import xml.etree.ElementTree as ET
name, failures, files = sys.argv[1], sys.argv[2], [f for f in sys.argv[3:] if os.path.exists(f)]
if not files:
    line = f"{name}: no junit XML (stage skipped, timed out or crashed before writing it)"
    with open(failures, "a") as fh:
        fh.write(f"## {line}\n")
    print(line)
    sys.exit(0)
counts, bad = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}, []
for f in files:
    try:
        root = ET.parse(f).getroot()
    except ET.ParseError as exc:
        print(f"{name}: unreadable junit XML {f}: {exc}")
        continue
    for case in root.iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        counts["failed" if kind == "failure" else kind] += 1
        if kind in ("failure", "error"):
            el = case.find(kind)
            msg = (el.get("message") or el.text or "").strip().splitlines()
            bad.append(f"{case.get('classname')}::{case.get('name')} [{kind}] {msg[0][:300] if msg else ''}")
with open(failures, "a") as fh:
    fh.write(f"## {name}: {len(bad)} failed or errored\n" + "".join(b + "\n" for b in bad))
print(f"{name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
EOF
}

{ echo "gpu_check $(date -u +%FT%TZ) host=$(hostname) commit=${ACQ_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} budget=${BUDGET}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'gpu', torch.cuda.is_available())" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
} >>"$OUT/summary.txt"

# Test runner flags: no cache writes, none of pyproject's addopts (its 900 s timeout), one
# failure line per test; a per-test timeout where pytest-timeout is installed.
PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts="" --benchmark-disable -q -rfE)
HAVE_SESSION_TIMEOUT=0
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST+=(--timeout=90)
  "$PY" -c "import inspect, pytest_timeout, sys; sys.exit('session_timeout' not in inspect.getsource(pytest_timeout))" \
    >/dev/null 2>&1 && HAVE_SESSION_TIMEOUT=1 && PYTEST+=(--session-timeout=AUTO)
fi
HAVE_XDIST=$("$PY" -c "import xdist" >/dev/null 2>&1 && echo 1 || echo 0)

# 1. Build acq_kernels._C in place (no pip, no network): CUDA kernels for sm_90.
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then note "build: skipped (GPU_CHECK_SKIP_BUILD=1)"
else stage build 200 "$OUT/build.log" env ACQ_KERNELS_CUDA=1 "$PY" setup.py build_ext --inplace; fi
ls acq_kernels/_C*.so >>"$OUT/build.log" 2>&1

# 2. What got built and which backend each device uses.
stage info 30 "$OUT/build.log" "$PY" -m acq_kernels

# 3. tests/test_gpu.py first: every backend on CUDA against the reference.
#    TRITON_INTERPRET=0: tests/conftest.py would otherwise default it to 1 (interpreted kernels).
WORKERS="${GPU_CHECK_GPU_WORKERS:-4}"
XD=(); [ "$HAVE_XDIST" = 1 ] && [ "$WORKERS" != 0 ] && XD=(-n "$WORKERS")
rm -f "$OUT/junit_gpu.xml"
stage gpu_tests 150 "$OUT/tests.log" env TRITON_INTERPRET=0 "${PYTEST[@]}" "${XD[@]}" tests/test_gpu.py \
  --junitxml="$OUT/junit_gpu.xml"
junit_summary gpu_tests "$OUT/junit_gpu.xml"

# 4. The families' other CUDA-marked tests.
stage cuda_tests 90 "$OUT/tests.log" env TRITON_INTERPRET=0 "${PYTEST[@]}" tests -m cuda \
  --ignore=tests/test_gpu.py --junitxml="$JUNIT_TMP/cuda.xml"
junit_summary cuda_tests "$JUNIT_TMP/cuda.xml"

# 5. The rest of the suite (CPU paths, the Triton interpreter, AOT). Triton <= 3.6's interpreter
#    calls int() on 1-element numpy arrays, which numpy >= 2.4 refuses (hundreds of spurious
#    failures): then the stage is skipped, saying so. CI runs it on Triton 3.6 with numpy < 2.4.
INTERP_OK=$("$PY" - <<'EOF' 2>/dev/null
import numpy, triton
v = lambda s: tuple(int(p) for p in s.split("+")[0].split(".")[:2])
print(0 if v(triton.__version__) <= (3, 6) and v(numpy.__version__) >= (2, 4) else 1)
EOF
)
SUITE_RESERVE=0
[ "$INTERP_OK" = 1 ] && SUITE_RESERVE=120

# 6. Benchmark report: kernels first, then torch.compile contenders while the budget lasts.
REPORT_T=$(( $(left) - SUITE_RESERVE - 20 ))
if (( REPORT_T >= 30 )); then
  stage report "$REPORT_T" "$OUT/report.log" "$PY" -m bench.report \
    --out "$OUT/results" --no-readme --time-budget "$(( REPORT_T > 60 ? REPORT_T - 30 : REPORT_T / 2 ))"
else note "report: skipped (time budget spent)"; fi

if [ "$INTERP_OK" = 1 ]; then
  XDIST=(); [ "$HAVE_XDIST" = 1 ] && XDIST=(-n 8)
  stage suite 600 "$OUT/tests.log" "${PYTEST[@]}" "${XDIST[@]}" tests -m "not cuda and not slow" \
    --junitxml="$JUNIT_TMP/suite.xml"
  junit_summary suite "$JUNIT_TMP/suite.xml"
else
  note "suite: skipped (Triton <= 3.6 with numpy >= 2.4: its interpreter fails on numpy 2.4; CI covers this suite on Triton 3.6 with numpy < 2.4)"
fi

rm -rf "$JUNIT_TMP"
note "total: $(( $(date +%s) - START + DRY_SPENT ))s of a ${BUDGET}s budget$([ "$DRY" = 1 ] && echo ' (dry run: every stage charged its whole limit)')"
ls -R "$OUT" >>"$OUT/summary.txt"
exit 0
