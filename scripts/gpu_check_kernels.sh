#!/usr/bin/env bash
# GPU check for issue 3 (Triton kernels): the gpu-marked kernel tests and the kernel benchmark,
# results under $OUT. Run from the repository root on the device machine. The device tool copies
# only the working tree, so put this file in it first (e.g. scripts/gpu_check_kernels.sh), then
# run `bash scripts/gpu_check_kernels.sh` with timeout_s of about 330.
# It takes about 3 to 4 minutes (a hard cap of 270 s over both steps, see the timeouts) and needs
# no network: torch, triton, pytest and hypothesis come with the GPU image; POT is optional (the
# ot.dist column is skipped without it) and can be carried as a wheel in .whl/ (see the device
# README). Outputs (at most 6 files): env.txt, pytest_gpu.log, bench.log, config.json,
# results.json, status.txt.
set -euo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
START=$(date +%s)
status() { echo "$*" | tee -a "$OUT/status.txt"; }

# 0. environment (the report needs the card's name)
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("triton", "hypothesis", "pytest", "ot", "numpy"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except ImportError as err:
        print(name, "MISSING", err)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. optional wheels carried in .whl/ (e.g. POT): install to a private folder, no network
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. make `import gcflows.kernels` work: kernels/ is mapped to gcflows.kernels by the package
#    metadata, so an editable install (no deps, no network) or, failing that, a folder of links
if ! "$PY" -c "import gcflows.kernels" >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
     || ! "$PY" -c "import gcflows.kernels" >/dev/null 2>&1; then
    SHIM=$(mktemp -d)/shim
    mkdir -p "$SHIM/gcflows"
    for f in "$PWD"/gcflows/*; do ln -s "$f" "$SHIM/gcflows/"; done
    ln -s "$PWD/kernels" "$SHIM/gcflows/kernels"
    export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
"$PY" -c "import gcflows.kernels as K; print('gcflows.kernels from', K.__file__, 'triton', K.triton_available())" \
  >>"$OUT/env.txt" 2>&1 || status "import gcflows.kernels FAILED (see env.txt)"
tail -n 1 "$OUT/env.txt"
unset TRITON_INTERPRET  # the gpu tests compile the real kernels

# 3. gpu-marked tests of the kernels (float64 references on the host)
set +e
timeout 150 "$PY" -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider -x -rs \
  >"$OUT/pytest_gpu.log" 2>&1
RC_TEST=$?
tail -n 15 "$OUT/pytest_gpu.log"
status "pytest -m gpu: rc=$RC_TEST after $(( $(date +%s) - START )) s"

# 4. the benchmark (full grid; --quick if little time is left)
LEFT=$(( 270 - ($(date +%s) - START) ))
QUICK=""
if [ "$LEFT" -lt 150 ]; then QUICK="--quick"; fi
timeout "$LEFT" "$PY" experiments/bench_kernels.py $QUICK --out "$OUT/bench" >"$OUT/bench.log" 2>&1
RC_BENCH=$?
set -e
tail -n 80 "$OUT/bench.log"
for f in config.json results.json; do
  if [ -f "$OUT/bench/$f" ]; then mv "$OUT/bench/$f" "$OUT/$f"; fi
done
rmdir "$OUT/bench" 2>/dev/null || true
status "bench_kernels ${QUICK:-full}: rc=$RC_BENCH; total $(( $(date +%s) - START )) s"
exit $(( RC_TEST != 0 || RC_BENCH != 0 ))
