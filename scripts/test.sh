#!/usr/bin/env bash
# Sets up (idempotent) and runs the whole test suite on this machine (CPU-only is fine:
# Triton runs under its interpreter, GPU tests are skipped). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
exec "${PYTHON:-python3}" -m pytest tests "$@"
