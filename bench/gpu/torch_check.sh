#!/usr/bin/env bash
# ksa_torch on a CUDA machine (the H200): builds the CUDA kernels (CMake, engine off), installs ksa_torch against
# them (a venv with the machine's torch) and runs python/tests with the CUDA tests: gradients vs float64 and
# FlexAttention, packed sequences == one call per stream, torch.library.opcheck on CUDA, torch.compile
# fullgraph (inductor) of a small model with KSA layers; then a few training steps, and (unless --no-bench) the
# packed-sequence benchmark next to FlexAttention with a document mask (bench_varlen.py; its flags follow).
#   bench/gpu/torch_check.sh [--no-bench] [bench_varlen.py flags...]       logs in $OUT (bench/gpu/out)
# Without Debian's libhwy-dev (the lent GPU machine): KSA_DEPS=<the .gpu-deps of pack_deps.sh> (lib.sh).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
# Its own build folder, kernels only (no C++ tests, so no GoogleTest needed): run.sh's build/ stays as it is.
gpu_configure build-torch torch_ -G Ninja -DKSA_BUILD_TESTS=OFF
gpu_build build-torch torch_ --target ksa_core ksa_cpu ksa_cuda
echo "== ksa_torch: pip install ./python against build-torch/, python/tests (CUDA included)"
gpu_torch build-torch
echo "== train_tiny (CUDA, bf16 autocast)"
if ! "${KSA_PY[@]}" python/examples/train_tiny.py --steps 20 >"$OUT/train_tiny.log" 2>&1; then
  echo "train_tiny: FAILED"; tail -20 "$OUT/train_tiny.log"; exit 1
fi
tail -1 "$OUT/train_tiny.log"
echo "== context parallel over NCCL, one rank (what one GPU allows; python/tests ran test_one_rank_cuda_nccl)"
if ! "${KSA_PY[@]}" -m torch.distributed.run --nproc_per_node 1 python/examples/train_cp.py --device cuda --seq 8192 \
  --steps 5 --check >"$OUT/train_cp_1gpu.log" 2>&1; then
  echo "train_cp (1 GPU): FAILED"; tail -20 "$OUT/train_cp_1gpu.log"; exit 1
fi
tail -3 "$OUT/train_cp_1gpu.log"
if [ "${1:-}" = "--no-bench" ]; then exit 0; fi
echo "== packed sequences: varlen vs single stream vs FlexAttention (document mask)"
PYTHONUNBUFFERED=1 "${KSA_PY[@]}" bench/gpu/bench_varlen.py "$@" 2>&1 | tee "$OUT/bench_varlen.log"
