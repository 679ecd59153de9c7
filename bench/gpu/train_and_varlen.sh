#!/usr/bin/env bash
# One device command for a warm or cold H200 (issues #22 and #23): the three training runs of train.sh in the
# foreground and, beside them on the same GPU, the C++ packed-sequence (varlen) kernel tests of a kernel-only
# build plus the forward/backward regression tests; their logs joined into $OUT/varlen.log (the training runs
# fit their step count to the time left, so the tests running beside the first run cost it steps, not
# correctness; the other two runs take the same step count). Needs KSA_DEPS (bench/gpu/pack_deps.sh) where
# the machine lacks Highway or GoogleTest.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/gpu/out}"; mkdir -p "$OUT"
VL=/tmp/ksa-varlen; mkdir -p $VL
(
  export OUT=$VL  # the logs of this part stay out of $OUT (8 files come back) until joined below
  source bench/gpu/lib.sh
  gpu_configure build-gpu vl_ -G Ninja -DKSA_GTEST_SRC="$(realpath "$KSA_DEPS")/googletest" >$VL/fail.log 2>&1 && rm -f $VL/fail.log
  nice cmake --build build-gpu -j 8 --target ksa_cuda_tests ksa_cuda_host_tests >$VL/build.log 2>&1 ||
    { grep -E "error" -A3 $VL/build.log | head -40 >$VL/fail.log; exit 1; }
  build-gpu/bin/ksa_cuda_host_tests >$VL/host.log 2>&1; echo "host tests rc=$?" >>$VL/host.log
  build-gpu/bin/ksa_cuda_tests --gtest_filter='CudaVarlen.*:CudaForward*:CudaBackward*' >$VL/tests.log 2>&1
  echo "cuda tests rc=$?" >>$VL/tests.log
) &
VPID=$!
TOTAL_SECONDS="${TOTAL_SECONDS:-540}" bash bench/gpu/train.sh
wait $VPID
for f in fail build host tests; do [ -f $VL/$f.log ] && { echo "==== $f"; if [ $f = build ]; then tail -5 $VL/$f.log; else cat $VL/$f.log; fi; }; done >"$OUT/varlen.log"
grep -E "^\[  PASSED|^\[  FAILED|rc=|error" "$OUT/varlen.log" | head -30
