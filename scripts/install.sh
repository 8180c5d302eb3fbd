#!/usr/bin/env bash
# Installs vitlab (and, with --test, its test extras) into the current Python.
# Where no torch is importable, the CPU wheel torch==2.13.0 goes in first, so that
# resolving vitlab's `torch>=2.4` never pulls the CUDA build. A GPU box keeps its torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
"$PY" -m pip install --quiet -e ".${extras}"
