#!/usr/bin/env bash
# The CUDA engine on a GPU machine: builds ksa with the engine layers, runs the GPU tests (the CUDA engine
# against the CPU engine, and the kernels' tests), then `ksa bench model` on the GPU. Logs in $OUT.
#   bench/gpu/engine.sh [tests] [bench] [4b] [refs]
#     tests  the C++ GPU tests (ksa_cuda_tests, all of them)
#     bench  ksa bench model on a random `small` checkpoint
#     4b     ksa make-model --shape 4b, then the speed targets' shapes on it (decode at 16K and 128K, batch 64
#            at 4K, prefill 16K and 128K)
#     refs   with 4b: HuggingFace transformers' Qwen3 (SDPA, static cache) on the same checkpoint (model_ref.py)
# A machine without the engine's Debian packages (nlohmann-json, ICU, GoogleTest) can be given them as a
# prefix: KSA_DEPS=<dir> with include/, lib/ (libicu*.so.72), share/cmake/ and googletest/.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ARGS=()
if [ -n "${KSA_DEPS:-}" ]; then
  DEPS=$(realpath "$KSA_DEPS")
  for l in icudata icui18n icuuc; do ln -sf "lib$l.so.72" "$DEPS/lib/lib$l.so"; done
  export LD_LIBRARY_PATH="$DEPS/lib:${LD_LIBRARY_PATH:-}"
  ARGS=(-DCMAKE_PREFIX_PATH="$DEPS" -DICU_ROOT="$DEPS" -DKSA_GTEST_SRC="$DEPS/googletest")
fi
want() { [[ " $* " == *" all "* ]] || [[ " ${STEPS} " == *" $1 "* ]]; }
STEPS="${*:-tests bench}"

cmake -S . -B build-engine -G Ninja -DCMAKE_BUILD_TYPE=Release -DKSA_ENGINE=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
  "${ARGS[@]}" >"$OUT/engine_cmake.log" 2>&1 || { tail -30 "$OUT/engine_cmake.log"; exit 1; }
gpu_build build-engine engine_ --target ksa ksa_cuda_tests
KSA=build-engine/bin/ksa
$KSA info | tee "$OUT/info.log"

if want tests; then
  echo "== C++ GPU tests"
  if build-engine/bin/ksa_cuda_tests >"$OUT/cuda_tests.log" 2>&1; then
    grep -E "^\[  PASSED|^\[cuda engine\]" "$OUT/cuda_tests.log"
  else
    echo "ksa_cuda_tests: FAILED"
    grep -E "^\[  FAILED|Failure|error|Expected|Which is|max \|" -A2 "$OUT/cuda_tests.log" | head -60
    grep -E "^\[cuda engine\]" "$OUT/cuda_tests.log" || true
  fi
fi

if want bench; then
  echo "== ksa bench model, small"
  $KSA make-model --shape small --out /tmp/ksa-small >/dev/null 2>&1
  $KSA bench model -m /tmp/ksa-small --device cuda -p 512 -n 128 -r 3 | tee "$OUT/bench_small.log" | tail -12
  $KSA bench model -m /tmp/ksa-small --device cuda -p 512 -n 64 -b 16 -r 2 | tee -a "$OUT/bench_small.log" | grep -E "^\| (pp|tg)|bound"
fi

if want 4b; then
  M=/tmp/ksa-4b
  [ -f $M/config.json ] || { echo "== make-model 4b"; time $KSA make-model --shape 4b --out $M >"$OUT/make4b.log" 2>&1; }
  for spec in "-p 16384 -n 64 -b 1" "-p 131072 -n 32 -b 1 -r 1" "-p 4096 -n 64 -b 64 -r 1"; do
    echo "== ksa bench model 4b $spec"
    $KSA bench model -m $M --device cuda $spec | tee -a "$OUT/bench_4b.log" | grep -E "^\| (pp|tg)|bound|KV cache|peak"
  done
  if want refs; then
    echo "== references (same checkpoint)"
    PYTHONUNBUFFERED=1 python3 bench/gpu/model_ref.py --model $M 2>&1 | tee "$OUT/model_ref.log" | tail -20
  fi
fi
