#!/usr/bin/env bash
# Profiles one ksa forward launch (T=32K, 32/8 heads, D=128, bf16) with Nsight Compute (clock control off).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gpu_configure build "" -G Ninja -DKSA_BUILD_TESTS=OFF
gpu_build build ""
cat > /tmp/one.py <<'PY'
import torch, ksa_torch
T, k, S = 32768, 8, 1
L = T + T // k * S
q = torch.randn(1, L, 32, 128, device="cuda", dtype=torch.bfloat16)
kv = [torch.randn(1, L, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
for _ in range(2):
    ksa_torch.attention(q, kv[0], kv[1], k, S, 128)
torch.cuda.synchronize()
PY
# ksa_torch against this build, into a folder of its own (tests: bench/gpu/torch_check.sh).
rm -rf build/python-site
KSA_BUILD_DIR="$PWD/build" python3 -m pip install --no-build-isolation --no-index --no-deps -q --target build/python-site \
  ./python >"$OUT/pip.log" 2>&1 || { tail -30 "$OUT/pip.log"; exit 1; }
PYTHONPATH=build/python-site python3 /tmp/one.py  # loads everything once outside the profiler
PYTHONPATH=build/python-site ncu --clock-control none --kernel-name regex:fwd_kernel --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy \
  --section LaunchStats --section InstructionStats python3 /tmp/one.py 2>&1 | tee "$OUT/ncu.txt"
