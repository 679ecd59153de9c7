#!/usr/bin/env bash
# GPU benchmark and checks, run on a CUDA machine with torch (e.g. the H200 machine):
#   bench/gpu/run.sh [quick] [--no-bwd]
# Builds the CUDA kernels (CMake, engine layers off), runs the C++ GPU tests (forward and backward), installs
# ksa_torch against that build and runs its tests (scripts/test_python.sh) and a tiny training run, and
# times ksa against FlexAttention (interleaved stream; summaries gathered into a K/V prefix) and SDPA dense
# causal attention over the text, on the same shapes, in the same process. Logs go to $OUT (or bench/gpu/out).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gpu_configure build "" -G Ninja
gpu_build build ""
echo "== C++ GPU tests (every forward configuration and backward variant; stops here on a failure)"
if [ -x build/bin/ksa_cuda_tests ]; then
  if ! build/bin/ksa_cuda_tests >"$OUT/cuda_tests.log" 2>&1; then
    echo "ksa_cuda_tests: FAILED"; grep -E "Failure|error|Expected|Which is|worst" -A2 "$OUT/cuda_tests.log" | head -40; exit 1
  fi
  grep -E '^\[  PASSED' "$OUT/cuda_tests.log"
fi
echo "== ksa_torch: pip install ./python against build/, python/tests (CUDA included), a tiny training run"
gpu_torch build
if ! "${KSA_PY[@]}" python/examples/train_tiny.py >"$OUT/train_tiny.log" 2>&1; then
  echo "train_tiny: FAILED"; tail -20 "$OUT/train_tiny.log"; exit 1
fi
tail -1 "$OUT/train_tiny.log"
echo "== benchmark"
PYTHONUNBUFFERED=1 "${KSA_PY[@]}" bench/gpu/bench_attention.py "$@" 2>&1 | tee "$OUT/bench.log"
