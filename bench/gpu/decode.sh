#!/usr/bin/env bash
# GPU decode through the compressed cache: the C++ GPU decode tests, then `ksa bench-decode` (one decode step,
# CUDA events; B=1 T=16K/128K and B=64 mixed 4K..128K; 32/8 heads, D=128, bf16, k=8, S=1, W=128), then the
# PyTorch references over the same key rows, timed the same way (decode_ref.py; skipped without torch), and
# bench/gpu/stream_floor.cu: what merely reading those bytes costs under that timing.
#   bench/gpu/decode.sh            (KSA_CUDA_ARCH=90 by default; KSA_GTEST_SRC=<googletest src> if no libgtest)
# Logs go to $OUT (or bench/gpu/out).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gpu_configure build-decode-gpu decode_
gpu_build build-decode-gpu decode_ --target ksa_cuda_tests ksa_cache_tests ksa
echo "== CPU cache tests"
build-decode-gpu/bin/ksa_cache_tests >"$OUT/decode_cache_tests.log" 2>&1 || { tail -40 "$OUT/decode_cache_tests.log"; exit 1; }
grep -E '^\[  PASSED' "$OUT/decode_cache_tests.log"
echo "== GPU decode tests"
if ! build-decode-gpu/bin/ksa_cuda_tests --gtest_filter='CudaDecode.*' >"$OUT/decode_tests.log" 2>&1; then
  echo "FAILED"; grep -E "Failure|mismatch|error|Expected|Which is|k=" -A2 "$OUT/decode_tests.log" | head -60; exit 1
fi
grep -E "worst err/tol" "$OUT/decode_tests.log" | sort -t' ' -k1 | tail -5
grep -E '^\[  PASSED|SKIPPED' "$OUT/decode_tests.log"
echo "== ksa bench-decode"
build-decode-gpu/bin/ksa bench-decode "$@" | tee "$OUT/bench_decode.txt"
echo "== bare reads of the same bytes, same timing (bench/gpu/stream_floor.cu)"
if nvcc -O3 -std=c++17 -arch=native bench/gpu/stream_floor.cu -o "$OUT/stream_floor" 2>"$OUT/stream_floor_nvcc.log"; then
  "$OUT/stream_floor" | tee "$OUT/stream_floor.txt"
else
  echo "skipped: stream_floor.cu did not build for this GPU (it needs sm_90+): $(head -1 "$OUT/stream_floor_nvcc.log")"
fi
echo "== PyTorch references (same key rows, same timing)"
if python3 -c "import torch" 2>/dev/null; then
  rows=$(awk '/^B=1 T=/ {print $NF}' "$OUT/bench_decode.txt" | paste -sd, -)
  python3 "$(dirname "$0")/decode_ref.py" --rows "$rows" | tee "$OUT/decode_ref.txt"
else
  echo "skipped: no python3 with torch"
fi
