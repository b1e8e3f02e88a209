#!/usr/bin/env bash
# Everything GPU-side in one command, on one GPU (compare/gpu_check.py says what it runs):
#   scripts/gpu_check.sh              results in compare/results/gpu-<device>-<date>/, summary.md first
#   scripts/gpu_check.sh --dry-run    the same steps on a CPU at stand-in sizes (the test suite runs this)
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
cd "$ROOT"
exec "$PYTHON" -m archlab.compare.gpu_check "$@"
