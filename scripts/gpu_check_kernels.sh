#!/usr/bin/env bash
# GPU check of the kernels and of the training step, for an H100 / H200 machine with no network.
#
# Runs from the repository root, in under 8 minutes (a hard deadline of 450 s over all steps):
#   1. environment: GPU, driver, python, torch, CUDA, triton and the Python packages gcflows needs
#      (printed and written to env.txt);
#   2. wheels carried in .whl/ (none can be downloaded there) installed into /tmp/site;
#   3. `pytest -m gpu tests/test_kernels.py`: the Triton kernels compiled, against float64;
#   4. experiments/bench_gpu_step.py: CT, batch-OT and GC steps/s of the CIFAR-10 U-Net preset
#      on synthetic 32x32 data, batch 128, 50 timed steps each, GC / CT ratio, peak memory;
#   5. experiments/bench_kernels.py: interpolate_pair (Triton, naive eager, torch backend,
#      torch.compile of the specification; fraction of a measured device-to-device copy) and
#      pairwise_sqdist (ieee / tf32x3 / tf32 against torch.cdist**2 and ot.dist); the full grid,
#      or --quick when less than 150 s are left.
# Everything lands in $OUT (default ./gpu_out), one folder of 8 files: env.txt, status.txt,
# pytest_gpu.log, bench.log, step_config.json, step_results.json, kernels_config.json,
# kernels_results.json.
#
# Expected on the machine: torch with CUDA, triton, pytest, hypothesis, numpy, scipy, tqdm (the
# GPU image has them). Missing there: POT (gcflows.couplings imports it) and lion-pytorch (the
# CIFAR-10 presets' optimizer; Adam stands in without it, said in the results). Fetch their wheels
# here once, into a git-ignored .whl/ of the repository root, and carry it (device tool: carry
# [".whl"]), about 33 MB:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl POT==0.9.7.post1 lion-pytorch==0.2.5
# Then: run `bash scripts/gpu_check_kernels.sh` with timeout_s 540.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
START=$(date +%s)
DEADLINE=$((START + 450))
export PYTHONUNBUFFERED=1
status() { echo "$*" | tee -a "$OUT/status.txt"; }
left() { echo $((DEADLINE - $(date +%s))); }
# min(step cap, time left), at least 1 (`timeout 0` would mean no limit)
cap() { local l; l=$(left); l=$(( l < $1 ? l : $1 )); echo $(( l > 1 ? l : 1 )); }

# 1-2. environment, carried wheels, `import gcflows.kernels`
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    || status "installing .whl/*.whl FAILED"
fi
# kernels/ is mapped to gcflows.kernels by the package metadata: an editable install (no deps,
# no network), or else a folder of links
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
unset TRITON_INTERPRET  # the gpu tests and benchmarks compile the real kernels
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("triton", "numpy", "scipy", "ot", "tqdm", "lion_pytorch", "pytest", "hypothesis"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as err:
        print(name, "MISSING", err)
try:
    import gcflows.kernels as K
    print("gcflows.kernels from", K.__file__, "triton available", K.triton_available())
    import gcflows.consistency  # noqa: F401  (needs POT)
    print("gcflows.consistency imports")
except Exception as err:  # reported, the steps below say what failed
    print("gcflows import FAILED:", repr(err))
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status "environment: $(( $(date +%s) - START )) s"

# 3. gpu-marked tests of the kernels (float64 references on the host)
timeout "$(cap 150)" "$PY" -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider -x -rs \
  >"$OUT/pytest_gpu.log" 2>&1
RC_TEST=$?
tail -n 15 "$OUT/pytest_gpu.log"
status "pytest -m gpu tests/test_kernels.py: rc=$RC_TEST at $(( $(date +%s) - START )) s"

# 4. training step of the CIFAR-10 U-Net preset
timeout "$(cap 120)" "$PY" experiments/bench_gpu_step.py --device cuda --batch 128 --steps 50 \
  --warmup 5 --out "$OUT/step" >"$OUT/bench.log" 2>&1
RC_STEP=$?
for f in config.json results.json; do
  [ -f "$OUT/step/$f" ] && mv "$OUT/step/$f" "$OUT/step_$f"
done
rmdir "$OUT/step" 2>/dev/null || true
tail -n 8 "$OUT/bench.log"
status "bench_gpu_step: rc=$RC_STEP at $(( $(date +%s) - START )) s"

# 5. kernel benchmark (full grid; --quick if little time is left)
QUICK=""
if [ "$(left)" -lt 150 ]; then QUICK="--quick"; fi
echo "=== bench_kernels ${QUICK:-full}" >>"$OUT/bench.log"
timeout "$(cap 300)" "$PY" experiments/bench_kernels.py --device cuda $QUICK \
  --out "$OUT/kernels" >>"$OUT/bench.log" 2>&1
RC_BENCH=$?
for f in config.json results.json; do
  [ -f "$OUT/kernels/$f" ] && mv "$OUT/kernels/$f" "$OUT/kernels_$f"
done
rmdir "$OUT/kernels" 2>/dev/null || true
tail -n 70 "$OUT/bench.log"
status "bench_kernels ${QUICK:-full}: rc=$RC_BENCH; total $(( $(date +%s) - START )) s"
exit $(( RC_TEST != 0 || RC_STEP != 0 || RC_BENCH != 0 ))
