#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: the CPU build of torch (a plain `torch` requirement would
# pull a multi-GB CUDA build), then gcflows in editable mode with its test/plot/triton extras.
# Re-running it installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
if ! "$PY" -c "import gcflows, ot, torchdiffeq, sklearn, hypothesis, pytest, matplotlib, seaborn, lion_pytorch, triton" >/dev/null 2>&1 \
   || [ "$("$PY" -c 'import gcflows, os; print(os.path.dirname(os.path.dirname(gcflows.__file__)))')" != "$PWD" ]; then
  "$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
fi
