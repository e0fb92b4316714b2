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
# Checked from / so that the current folder on sys.path cannot pass for the installed package: the
# editable install must point at this checkout, for gcflows and for gcflows.kernels (kernels/).
here=$(pwd -P)
where=$(cd / && "$PY" -c 'import os, gcflows, gcflows.kernels as k
print(*(os.path.realpath(os.path.dirname(os.path.dirname(m.__file__))) for m in (gcflows, k)))' 2>/dev/null || true)
if ! (cd / && "$PY" -c "import ot, torchdiffeq, sklearn, tqdm, hypothesis, pytest, matplotlib, seaborn, lion_pytorch, triton") >/dev/null 2>&1 \
   || [ "$where" != "$here $here" ]; then
  "$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
fi
