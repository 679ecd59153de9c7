#!/usr/bin/env bash
# CUDA backward on a GPU machine: the C++ backward tests, then `ksa bench attn --device cuda --bwd` (B=1,
# 32/8 heads, D=128, bf16, k=8, S=1, W=128; CUDA events, median of 5) at T = 8K/32K/128K for the default
# backward (on sm_90a: the fused dQ) and each variant named in $KSA_BWD_VARIANTS (default: "dqpass" =
# KSA_CUDA_BWD_FUSED_DQ=0, the separate dQ pass; "portable" = KSA_CUDA_BWD_SM90A=0). A table of backward ms
# is printed last.
#   bench/gpu/bwd.sh        (KSA_CUDA_ARCH=90 by default; KSA_GTEST_SRC=<googletest src> if no libgtest)
# Logs go to $OUT (or bench/gpu/out).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gpu_configure build-bwd-gpu bwd_
gpu_build build-bwd-gpu bwd_ --target ksa_cuda_tests ksa
BIN=build-bwd-gpu/bin
echo "== GPU backward tests"
if ! $BIN/ksa_cuda_tests --gtest_filter='CudaBackward*' >"$OUT/bwd_tests.log" 2>&1; then
  echo "FAILED"; grep -E "Failure|Expected|Which is|worst|differ" -A2 "$OUT/bwd_tests.log" | head -40; exit 1
fi
grep -E '^\[  PASSED|SKIPPED' "$OUT/bwd_tests.log"
variant_env() {
  case "$1" in
    default) echo "" ;;
    dqpass) echo "KSA_CUDA_BWD_FUSED_DQ=0" ;;
    portable) echo "KSA_CUDA_BWD_SM90A=0" ;;
    *) echo "unknown variant $1 (default, dqpass, portable)" >&2; exit 2 ;;
  esac
}
declare -A MS
VARIANTS=(default ${KSA_BWD_VARIANTS:-dqpass portable})
for v in "${VARIANTS[@]}"; do
  for T in 8192 32768 131072; do
    log="$OUT/bwd_bench_${v}_$T.txt"
    env $(variant_env "$v") $BIN/ksa bench attn --device cuda --bwd -T "$T" --heads 32/8 --dtype bf16 --no-ceiling >"$log" 2>&1 ||
      { echo "bench $v T=$T failed:"; tail -5 "$log"; exit 1; }
    MS[$v,$T]=$(awk '/^backward:/ {print $3}' "$log")
    MS[$v,f$T]=$(awk '/^forward:/ {print $3}' "$log")
  done
done
echo "== backward ms (forward ms in brackets), B=1, 32/8 heads, D=128, bf16"
printf "%-10s %22s %22s %22s\n" variant T=8K T=32K T=128K
for v in "${VARIANTS[@]}"; do
  printf "%-10s %22s %22s %22s\n" "$v" "${MS[$v,8192]} (${MS[$v,f8192]})" "${MS[$v,32768]} (${MS[$v,f32768]})" \
    "${MS[$v,131072]} (${MS[$v,f131072]})"
done
