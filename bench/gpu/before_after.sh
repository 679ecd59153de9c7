#!/usr/bin/env bash
# Before/after timing of the CUDA kernels in one run (a refactor must not slow them): builds the kernel-only
# `ksa` of this tree and of another checkout (BEFORE, e.g. `git archive REV | tar -x -C .before`, carried
# along), then alternates the two binaries, ROUNDS times each, on the same shapes: forward and backward
# (`ksa bench attn --device cuda`, B=1, 32/8 heads, D=128, bf16, k=8, S=1, W=128) at T=8K, 32K, 128K, and one
# decode step (`ksa bench-decode`: B=1 at 16K and 128K, B=64 mixed), and packed documents (`ksa bench attn
# --docs`: the 7 documents of bench_varlen.py's default, 131,072 text tokens, forward and backward, and one
# stream of the same visible pairs). Logs and a table (before_after.md) in $OUT.
#   bench/gpu/before_after.sh BEFORE_DIR [ROUNDS]
# BA_STEPS (default "attn decode docs") picks the steps; BA_T (default "8192 32768 131072") the attn lengths.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BEFORE=$(realpath "$1")
ROUNDS="${2:-3}"
OUT=$(realpath "$OUT")
# Both builds at once (each is bound by its few largest files; the sm_90a ones take minutes).
gpu_configure build-after after_
(cd "$BEFORE" && gpu_configure build-before before_)
gpu_build build-after after_ --target ksa &
pid_after=$!
(cd "$BEFORE" && gpu_build build-before before_ --target ksa) &
pid_before=$!
wait "$pid_after"
wait "$pid_before"
bin_after=build-after/bin/ksa bin_before="$BEFORE/build-before/bin/ksa"
attn() {  # attn <bin> <T> [--bwd]: prints "fwd_ms [fwd_bwd_ms]"
  "$1" bench attn --device cuda --dtype bf16 --heads 32/8 --dim 128 -T "$2" --reps 10 "${@:3}"
}
STEPS=" ${BA_STEPS:-attn decode docs} "
DOCS=29718,14671,26884,31219,15829,3374,9377  # bench_varlen.py --seed 0: 2K-32K tokens, 128K in all
: >"$OUT/before_after.log"
for r in $(seq "$ROUNDS"); do
  for which in before after; do
    bin=bin_$which
    if [[ $STEPS == *" attn "* ]]; then
      for T in ${BA_T:-8192 32768 131072}; do
        echo "== round $r $which attn T=$T" >>"$OUT/before_after.log"
        attn "${!bin}" "$T" --bwd >>"$OUT/before_after.log" 2>&1
      done
    fi
    if [[ $STEPS == *" decode "* ]]; then
      echo "== round $r $which decode" >>"$OUT/before_after.log"
      "${!bin}" bench-decode >>"$OUT/before_after.log" 2>&1
    fi
    if [[ $STEPS == *" docs "* ]]; then
      echo "== round $r $which docs" >>"$OUT/before_after.log"
      attn "${!bin}" 8192 --bwd --docs "$DOCS" >>"$OUT/before_after.log" 2>&1  # -T is ignored with --docs
    fi
  done
done
python3 "$(dirname "$0")/before_after_table.py" "$OUT/before_after.log" | tee "$OUT/before_after.md"
