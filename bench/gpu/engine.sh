#!/usr/bin/env bash
# The CUDA engine on a GPU machine: builds ksa with the engine layers, runs the GPU tests (the CUDA engine
# against the CPU engine, and the kernels' tests), then `ksa bench model` on the GPU. Logs in $OUT.
#   bench/gpu/engine.sh [tests] [bench] [4b] [refs]
#     tests  the C++ GPU tests (ksa_cuda_tests, all of them; GTEST_FILTER=... narrows them). All 44 take ~9 min
#            on an H100 (the forward and backward tests against the CPU oracle ~8 of them); the engine and
#            decode tests alone, GTEST_FILTER='CudaEngine*:Contexts/*:CudaDecode*:DecodePlan*', ~20 s
#     bench  ksa bench model on a random `small` checkpoint
#     4b     ksa make-model --shape 4b, then the speed targets' shapes on it (decode at 16K and 128K, batch 64
#            at 4K, prefill 16K and 128K)
#     nographs  with 4b: batch-1 decode at 16K again with --no-cuda-graphs (every kernel launched per step)
#     ub4096    with 4b: the 128K prefill again in pieces of 4096 tokens (-ub 4096; the default is 2048), and
#            its peak device memory against issue #20's limit
#     nogemv    with 4b: batch-1 decode at 16K again with --no-cuda-gemv (cuBLASLt for the thin products)
#     autotune  with 4b: ksa bench-gemm at batch 64, 72 and 2,304 rows with cuBLASLt's first choices and with
#            --gemm-autotune, then the batch-64 decode and the 16K prefill with --gemm-autotune (compare the
#            default runs above)
#     ncu    with 4b: Nsight Compute durations of every kernel of one decode step (short context, no graphs),
#            summed per kernel (ncu_decode.csv, ncu_decode.txt)
#     ncu64  with 4b: the same at batch 64 (context 16: the products and small kernels of issue #20's batch-64
#            shape; ncu_decode64.csv, ncu_decode64.txt)
#     ncu_prefill  with 4b: the same for one 1024-token prefill piece (ncu_prefill.csv, ncu_prefill.txt): where
#            the prefill's time goes (issue #21's throughput at 64 streams is prefill-bound)
#     ncu_attn  Nsight Compute sections (speed of light, warp states, instructions, memory) of one prefill
#            attention forward launch and one fused backward launch (fwd_sm90a_kernel, dkdvdq_sm90a_kernel) at
#            B=1, 32/8 heads, D=128, bf16, k=8, S=1, W=128, T=NCU_T (131072): ncu_fwd.txt, ncu_bwd.txt
#     refs   with 4b: HuggingFace transformers' Qwen3 (SDPA, static cache) on the same checkpoint (model_ref.py)
#     serve  with 4b: `ksa serve --device cuda` on the 4B checkpoint driven by bench/serve/loadgen.js at 1, 8 and
#            64 concurrent streams (SERVE_LEVELS="1,8,64"; empty: skipped) with 4K-token prompts
#            (SERVE_MAX_TOKENS output tokens, 256), then issue #21's target shape: 64 streams, 128 requests of
#            4K-token prompts and 1,024 output tokens, with the server's step times and graph counters
#            (SERVE_CHUNKS="1024 2048": once per --prefill-chunk);
#            needs cpp-httplib (Debian's, or KSA_DEPS/serve with its pkg-config file), node (NODE=<path>) and a
#            tokenizer.json for the checkpoint (KSA_DEPS/tokenizer-qwen3)
#     compare  with 4b and KSA_BEFORE=<checkout> (e.g. `git archive REV | tar -x -C .before`, carried): that
#            checkout's ksa is built beside this one and both run the three decode shapes (batch 1 at 16K and
#            128K, batch 64 at 4K; COMPARE_SHAPES="16k 128k b64" picks some), alternating, COMPARE_ROUNDS
#            times (2); summary lines in compare_4b.log
#     release  with 4b: the KSA authors' HF code (their FlexAttention prefill, ring-buffer cache) on the same
#            checkpoint (release_ref.py; needs .ref/ksa-release from bench/gpu/fetch_release.sh, carried along)
# KSA_PREBUILT=<dir>: binaries built elsewhere (bench/gpu/pack_prebuilt.sh) instead of a build here.
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
  if [ -d "$DEPS/serve/lib/pkgconfig" ]; then  # cpp-httplib and what it links, for `ksa serve`
    export PKG_CONFIG_PATH="$DEPS/serve/lib/pkgconfig:${PKG_CONFIG_PATH:-}"
    export LD_LIBRARY_PATH="$DEPS/serve/lib:$LD_LIBRARY_PATH"
  fi
fi
want() { [[ " $* " == *" all "* ]] || [[ " ${STEPS} " == *" $1 "* ]]; }
STEPS="${*:-tests bench}"

# KSA_PREBUILT=<dir> (bench/gpu/pack_prebuilt.sh): its bin/ksa and bin/ksa_cuda_tests, and bin/ksa-before as
# `compare`'s before, instead of building, when its ksa runs here.
KSA=build-engine/bin/ksa TESTS_BIN=build-engine/bin/ksa_cuda_tests BEFORE_BIN=
# Their CUDA runtime and cuBLASLt are this machine's toolkit's (beside nvcc).
cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")")
pre_libs="$cuda_home/lib64:$cuda_home/lib:${LD_LIBRARY_PATH:-}"
if [ -n "${KSA_PREBUILT:-}" ] && PRE=$(realpath "$KSA_PREBUILT") &&
  LD_LIBRARY_PATH="$PRE/lib:$pre_libs" "$PRE/bin/ksa" info >/dev/null 2>&1; then
  export LD_LIBRARY_PATH="$PRE/lib:$pre_libs"
  KSA=$PRE/bin/ksa TESTS_BIN=$PRE/bin/ksa_cuda_tests
  [ -x "$PRE/bin/ksa-before" ] && BEFORE_BIN=$PRE/bin/ksa-before
  [ -z "${DEPS:-}" ] && [ -d "$PRE/tokenizer-qwen3" ] && DEPS=$PRE  # serve's tokenizer
  echo "prebuilt binaries: $PRE (before: ${BEFORE_BIN:-none})"
else
  [ -n "${KSA_PREBUILT:-}" ] && echo "KSA_PREBUILT=$KSA_PREBUILT: its ksa does not run here, building"
  cmake -S . -B build-engine -G Ninja -DCMAKE_BUILD_TYPE=Release -DKSA_ENGINE=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    "${ARGS[@]}" >"$OUT/engine_cmake.log" 2>&1 || { tail -30 "$OUT/engine_cmake.log"; exit 1; }
  gpu_build build-engine engine_ --target ksa ksa_cuda_tests &
  pid_after=$!
fi
if want compare && [ -z "$BEFORE_BIN" ]; then
  [ -d "${KSA_BEFORE:-}" ] || { echo "compare: KSA_BEFORE=<checkout> or KSA_PREBUILT's bin/ksa-before"; exit 1; }
  KSA_BEFORE=$(realpath "$KSA_BEFORE")
  (cd "$KSA_BEFORE" && cmake -S . -B build-engine -G Ninja -DCMAKE_BUILD_TYPE=Release -DKSA_ENGINE=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" "${ARGS[@]}" >"$OUT/before_cmake.log" 2>&1 &&
    cmake --build build-engine -j "$(nproc)" --target ksa >"$OUT/before_build.log" 2>&1) || {
    echo "compare: the before build failed"; tail -20 "$OUT/before_build.log"; exit 1; } &
  pid_before=$!
  BEFORE_BIN=$KSA_BEFORE/build-engine/bin/ksa
fi
[ -n "${pid_after:-}" ] && { wait "$pid_after" || exit 1; }
[ -n "${pid_before:-}" ] && { wait "$pid_before" || exit 1; }
$KSA info | tee "$OUT/info.log"

if want tests; then
  echo "== C++ GPU tests"
  if $TESTS_BIN ${GTEST_FILTER:+--gtest_filter="$GTEST_FILTER"} >"$OUT/cuda_tests.log" 2>&1; then
    grep -E "^\[  PASSED|^\[cuda engine\]" "$OUT/cuda_tests.log"
  else
    echo "ksa_cuda_tests: FAILED"
    grep -E "^\[  FAILED|Failure|error|Expected|Which is|max \|" -A2 "$OUT/cuda_tests.log" | head -60
    grep -E "^\[cuda engine\]" "$OUT/cuda_tests.log" || true
  fi
fi

if want ncu_attn; then
  T=${NCU_T:-131072}
  gmma='sm__pipe_tensor_op_gmma_cycles_active\.avg\.pct_of_peak_sustained_active'  # the wgmma pipe's busy share
  for pass in fwd=fwd_sm90a_kernel bwd=dkdvdq_sm90a_kernel; do
    kern=${pass#*=} log="$OUT/ncu_${pass%%=*}.txt"
    echo "== ncu: $kern, T=$T, 32/8 heads, D=128, bf16 (one launch after the warm-up)"
    timeout 240 ncu --clock-control none --kernel-name "regex:$kern" --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section InstructionStats --section MemoryWorkloadAnalysis \
      --metrics "regex:^(smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio|$gmma)$" \
      $KSA bench attn --device cuda --dtype bf16 --heads 32/8 --dim 128 --T "$T" --bwd --reps 1 --no-ceiling \
      >"$log" 2>&1 || echo "ncu failed (log: $log)"
    keys="Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit Rate|Registers Per"
    keys+="|Achieved Occupancy|Issue Slots Busy|Executed Ipc Active|Warp Cycles Per Issued"
    grep -E "^ +($keys)" "$log" | head -20 || true
    grep -E "sm__pipe_tensor_op_gmma" "$log" || true
    # Stall reasons per issued instruction, largest first.
    grep -E "issue_stalled_.*per_issue_active" "$log" | sort -k3 -g -r | head -8 || true
  done
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
  bench4b() {  # bench4b <flags...>: one `ksa bench model` on the 4B checkpoint, its summary lines
    echo "== ksa bench model 4b $*"
    $KSA bench model -m $M --device cuda "$@" | tee -a "$OUT/bench_4b.log" |
      grep -E "^\| (pp|tg)|bound|KV cache|peak|graphs|replayed tg steps"
  }
  shape_flags() {  # shape_flags <name>: the `ksa bench model` flags of one of issue #20's decode shapes
    case $1 in
      # tg over 128 steps, llama-bench's default (64 and 32 before 2026-12-07's twelfth session): a shape's
      # eager first step and its capture weigh less against the replayed ones
      16k) echo "-p 16384 -n 128 -b 1" ;;
      128k) echo "-p 131072 -n 128 -b 1 -r 1" ;;
      b64) echo "-p 4096 -n 128 -b 64 -r 1" ;;
      *) echo "unknown shape $1 (16k, 128k, b64)" >&2; return 1 ;;
    esac
  }
  if want compare; then
    for r in $(seq "${COMPARE_ROUNDS:-2}"); do
      for which in before after; do
        bin=$KSA
        [ $which = before ] && bin=$BEFORE_BIN
        for name in ${COMPARE_SHAPES:-16k 128k b64}; do
          shape=$(shape_flags "$name") || exit 1
          echo "== round $r $which $shape" | tee -a "$OUT/compare_4b.log"
          # shellcheck disable=SC2086
          $bin bench model -m $M --device cuda $shape 2>&1 | tee -a "$OUT/compare_4b_full.log" |
            grep -E "^\| (pp|tg)|replayed tg steps" | tee -a "$OUT/compare_4b.log"
        done
      done
    done
  else
    # shellcheck disable=SC2046
    for name in 16k 128k b64; do bench4b $(shape_flags $name); done
  fi
  if want nographs; then bench4b -p 16384 -n 64 -b 1 --no-cuda-graphs; fi
  if want nogemv; then bench4b -p 16384 -n 64 -b 1 --no-cuda-gemv; fi
  if want autotune; then
    for t in "" --gemm-autotune; do
      echo "== ksa bench-gemm -b 64,72,2304 $t"
      # shellcheck disable=SC2086
      $KSA bench-gemm -b 64,72,2304 $t | tee -a "$OUT/gemm_autotune.log" | grep -E "^(qkv|o|gate|down|head|step) "
    done
    bench4b -p 4096 -n 64 -b 64 -r 1 --gemm-autotune
    bench4b -p 16384 -n 64 -b 1 --gemm-autotune
  fi
  if want ub4096; then bench4b -p 131072 -n 32 -b 1 -r 1 -ub 4096; fi
  if want ncu; then
    echo "== ncu: kernels of one decode step (4b, context 1, eager launches)"
    # 8 forwards of ~400 kernels (warm-up and timed run: a one-token prefill and 3 steps each): the last ~1000.
    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --launch-skip 2200 \
      --launch-count 1000 $KSA bench model -m $M --device cuda -p 0 -n 3 -r 1 --no-cuda-graphs --bw-mib 0 \
      >"$OUT/ncu_decode.csv" 2>"$OUT/ncu_decode.err" || { echo "ncu failed"; tail -5 "$OUT/ncu_decode.err"; }
    python3 bench/gpu/ncu_summary.py "$OUT/ncu_decode.csv" | tee "$OUT/ncu_decode.txt" | head -40
  fi
  if want ncu64; then
    echo "== ncu: kernels of one decode step at batch 64 (4b, context 16, eager launches)"
    # A 16-token prefill of 64 sequences, then 3 steps; the summary takes the last complete forward.
    timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      $KSA bench model -m $M --device cuda -p 16 -n 3 -b 64 -r 1 --no-cuda-graphs --bw-mib 0 \
      >"$OUT/ncu_decode64.csv" 2>"$OUT/ncu_decode64.err" || { echo "ncu failed"; tail -5 "$OUT/ncu_decode64.err"; }
    python3 bench/gpu/ncu_summary.py "$OUT/ncu_decode64.csv" | tee "$OUT/ncu_decode64.txt" | head -40
  fi
  if want ncu_prefill; then
    echo "== ncu: kernels of one 1024-token prefill piece (4b, a fresh sequence)"
    # Two forwards (warm-up and timed) of one piece each; ncu_summary.py reports the first complete one.
    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      $KSA bench model -m $M --device cuda -p 1024 -n 0 -r 1 --bw-mib 0 \
      >"$OUT/ncu_prefill.csv" 2>"$OUT/ncu_prefill.err" || { echo "ncu failed"; tail -5 "$OUT/ncu_prefill.err"; }
    python3 bench/gpu/ncu_summary.py "$OUT/ncu_prefill.csv" | tee "$OUT/ncu_prefill.txt" | head -40
  fi
  if want refs; then
    echo "== references (same checkpoint)"
    PYTHONUNBUFFERED=1 python3 bench/gpu/model_ref.py --model $M 2>&1 | tee "$OUT/model_ref.log" | tail -20
  fi
  if want serve; then
    echo "== ksa serve --device cuda, 4b, 4K-token prompts"
    if [ ! -f $M/tokenizer.json ] && [ -n "${DEPS:-}" ] && [ -f "$DEPS/tokenizer-qwen3/tokenizer.json" ]; then
      cp "$DEPS"/tokenizer-qwen3/tokenizer*.json $M/
    fi
    if ! $KSA serve --help >/dev/null 2>&1; then echo "skipped: ksa was built without cpp-httplib"
    elif ! command -v "${NODE:-node}" >/dev/null; then echo "skipped: no node (NODE=<path>)"
    else
      if [ -n "${SERVE_LEVELS-1,8,64}" ]; then
        PATH="$(dirname "$(command -v "${NODE:-node}")"):$PATH" KSA=$KSA \
          SERVE_ARGS="--device cuda --max-seqs 64 --ctx 8192" bench/serve/run.sh $M --prompt-tokens 4096 \
          --max-tokens "${SERVE_MAX_TOKENS:-256}" --concurrency "${SERVE_LEVELS-1,8,64}" \
          2>&1 | tee "$OUT/serve_4b.log" | tail -20 || echo "serve bench: FAILED (log: $OUT/serve_4b.log)"
      fi
      for chunk in ${SERVE_CHUNKS:-1024}; do
        echo "== ksa serve, 64 streams, 128 requests, 4K-token prompts, 1,024 output tokens, --prefill-chunk $chunk"
        PATH="$(dirname "$(command -v "${NODE:-node}")"):$PATH" KSA=$KSA \
          SERVE_ARGS="--device cuda --max-seqs 64 --ctx 8192 --prefill-chunk $chunk" bench/serve/run.sh $M \
          --prompt-tokens 4096 --max-tokens 1024 --concurrency 64 --requests 128 2>&1 |
          tee "$OUT/serve_4b_64x1024_$chunk.log" | tail -16 || echo "serve bench: FAILED"
      done
    fi
  fi
  if want release; then
    echo "== KSA release HF code (same checkpoint)"
    if [ -f .ref/ksa-release/modeling_qwen3sa.py ]; then
      PYTHONUNBUFFERED=1 python3 bench/gpu/release_ref.py --model $M --release .ref/ksa-release 2>&1 |
        tee "$OUT/release_ref.log" | tail -20 || echo "release_ref.py: FAILED (log: $OUT/release_ref.log)"
    else
      echo "skipped: no .ref/ksa-release (run bench/gpu/fetch_release.sh here and carry .ref)"
    fi
  fi
fi
