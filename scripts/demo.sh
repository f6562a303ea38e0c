#!/usr/bin/env bash
# Sets up (idempotent) and runs the main job on the embedded default: data-free ACQ
# quantization of a digits classifier (scikit-learn's bundled data). Extra args go to `acq demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
exec "${PYTHON:-python3}" -m acqtrain demo "$@"
