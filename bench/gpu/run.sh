#!/usr/bin/env bash
# GPU benchmark and checks, run on a CUDA machine with torch (e.g. the H200 machine):
#   bench/gpu/run.sh [quick]
# Builds the CUDA kernels (CMake, engine layers off), runs the C++ GPU tests, builds the PyTorch op and
# times ksa against FlexAttention (interleaved stream; summaries gathered into a K/V prefix) and SDPA dense
# causal attention over the text, on the same shapes, in the same process. Logs go to $OUT (or bench/gpu/out).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/gpu/out}"
mkdir -p "$OUT"
ARCH="${KSA_CUDA_ARCH:-90}"
GTEST_ARGS=()
if [ -n "${KSA_GTEST_SRC:-}" ]; then GTEST_ARGS=(-DKSA_GTEST_SRC="$KSA_GTEST_SRC"); fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DKSA_ENGINE=OFF -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
  "${GTEST_ARGS[@]}" >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build build -j "$(nproc)" >"$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "== C++ GPU tests"
if [ -x build/bin/ksa_cuda_tests ]; then
  build/bin/ksa_cuda_tests 2>&1 | tee "$OUT/cuda_tests.log" | grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|error|device:" | head -40 || true
fi
echo "== benchmark"
PYTHONPATH=python PYTHONUNBUFFERED=1 python3 bench/gpu/bench_attention.py "$@" 2>&1 | tee "$OUT/bench.log"
