#!/usr/bin/env bash
# Issue #22 on a CUDA machine: trains the three models of the same shape on the same tokens with the same
# budget (python/ksa_train, docs/training.md) and writes their exported checkpoints, logs and loss CSVs:
#   full : plain causal attention (use_summary_attention false)
#   swa  : the KSA stream with content-free summaries (sliding window only: W*k = 128 tokens)
#   ksa  : KSA, k = 8, S = 1, W = 16 chunks (W*k = 128 tokens) in every layer
# The data folder (tokenizer + token files, made by `python3 -m ksa_train.prepare`, see docs/training.md) is
# prepared on the development machine and carried: DATA (default .cache/data/austen-kjv-4096: Austen + KJV).
#   bench/gpu/train.sh [--build-only]   outputs: $OUT/{ksa,swa,full}.safetensors and $OUT/train.tar.gz (the rest:
#   train/<attn>/{log.txt,loss.csv,summary.json,loss.png,model/}); bench/gpu/train_unpack.sh DIR DEST joins them
# --build-only: build the kernels and install ksa_torch (a second call on the same warm machine rebuilds nothing).
# Environment: TRAIN_SECONDS (the first run's time budget: its schedule is fitted to it; the other two take the
# same number of steps; default: what is left of TOTAL_SECONDS = 450 after the build, over 3.3), TRAIN_ARGS
# (extra ksa_train.train flags for all three), DATA, TRAIN_DRY=1 (no build: run with KSA_PYTHON's installed
# ksa_torch, e.g. on the CPU with TRAIN_ARGS="--device cpu ...").
# The first run (ksa, the model to ship) fixes the step count; each run also stops at 1.5x the budget (its
# summary.json then says so).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
T_START=$SECONDS
DATA="${DATA:-.cache/data/austen-kjv-4096}"
BUILD_ONLY=0
if [ "${1:-}" = "--build-only" ]; then BUILD_ONLY=1; fi
[ -f "$DATA/train.bin" ] || { echo "no $DATA/train.bin: prepare the data here first (docs/training.md) and carry $DATA"; exit 1; }

# The CUDA kernels (the same build folder as torch_check.sh: a warm machine rebuilds nothing), then ksa_torch
# and ksa_train into a venv with the machine's torch (or a --target folder where no venv can be made).
if [ "${TRAIN_DRY:-0}" = 1 ]; then
  # A dry run on any machine (docs/training.md): no build, KSA_PYTHON has ksa_torch and ksa_train installed.
  RUN=("${KSA_PYTHON:-python3}")
else
  gpu_configure build-torch torch_ -G Ninja -DKSA_BUILD_TESTS=OFF
  gpu_build build-torch torch_ --target ksa_core ksa_cpu ksa_cuda
  echo "== kernels built: $((SECONDS - T_START)) s"
  PY="${KSA_PYTHON:-python3}"
  PIP_ARGS=(--no-build-isolation --no-index --no-cache-dir --disable-pip-version-check -q)
  VENV=build-torch/train-venv
  if [ -x "$VENV/bin/python" ] || { "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1 && "$VENV/bin/python" -c "import torch" 2>/dev/null; }; then
    KSA_BUILD_DIR="$PWD/build-torch" "$VENV/bin/python" -m pip install "${PIP_ARGS[@]}" ./python >"$OUT/train_install.log" 2>&1 ||
      { tail -30 "$OUT/train_install.log"; exit 1; }
    RUN=("$VENV/bin/python")
  else
    rm -rf build-torch/train-site
    KSA_BUILD_DIR="$PWD/build-torch" "$PY" -m pip install "${PIP_ARGS[@]}" --no-deps --target build-torch/train-site ./python \
      >"$OUT/train_install.log" 2>&1 || { tail -30 "$OUT/train_install.log"; exit 1; }
    RUN=(env PYTHONPATH="$PWD/build-torch/train-site" "$PY")
  fi
  (cd /tmp && "${RUN[@]}" -c "import torch, ksa_torch, ksa_train; print('ksa_torch', ksa_torch.__version__, 'cuda kernels:', ksa_torch.has_cuda, 'torch', torch.__version__, torch.cuda.get_device_name())")
fi
echo "== ksa_torch installed: $((SECONDS - T_START)) s"
[ "$BUILD_ONLY" = 1 ] && exit 0
# The first run's budget: TRAIN_SECONDS, else what is left of TOTAL_SECONDS (default 450) after the build, for
# three runs and their start-up, evaluation and export (~30 s each), between 30 and 120 s.
BUDGET="${TRAIN_SECONDS:-$(awk -v t="${TOTAL_SECONDS:-450}" -v e="$((SECONDS - T_START))" \
  'BEGIN { b = (t - e - 90) / 3.3; if (b < 30) b = 30; if (b > 120) b = 120; printf "%d", b }')}"
echo "== time budget of the first run: $BUDGET s"

# The shape: 6 layers, hidden 256, 4/2 heads of 64, SwiGLU 768, vocab 4096 (+1 summary id), tied embeddings:
# 6.5 M parameters with the summary projections (13 MB in bf16); rows of 4224 tokens (passkeys up to ~4100
# tokens back), batch 8 (33,792 tokens per step), dropout 0.1 (the first runs, without it and on Austen alone,
# memorised the corpus: docs/training.md).
COMMON=(--data "$DATA" --batch 8 --seq 4224 --hidden 256 --intermediate 768 --layers 6 --heads 4 --kv-heads 2
        --head-dim 64 --chunk-size 8 --S 1 --window 16 --lr 3e-3 --warmup 100 --passkey-frac 1.0 --answer-weight 10
        --dropout 0.1 --log-every 25 --seed 0 --eval-trials 20 ${TRAIN_ARGS:-})
WORK=build-torch/train-runs
rm -rf "$WORK"
mkdir -p "$WORK/pack/train"
# What comes back from $OUT is at most 8 files of 16 MiB, 2 folders deep: each model's weights as
# $OUT/<attn>.safetensors, everything else (configs, tokenizer, logs, loss CSVs, summaries, plots, build logs)
# in $OUT/train.tar.gz, packed again after every run. bench/gpu/train_unpack.sh puts them back together.
pack() {
  local attn=$1
  mkdir -p "$WORK/pack/train/$attn"
  for f in log.txt loss.csv summary.json loss.png; do [ -f "$WORK/$attn/$f" ] && cp "$WORK/$attn/$f" "$WORK/pack/train/$attn/"; done
  if [ -d "$WORK/$attn/model" ]; then
    mkdir -p "$WORK/pack/train/$attn/model"
    find "$WORK/$attn/model" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} "$WORK/pack/train/$attn/model/" \;
    [ -f "$WORK/$attn/model/model.safetensors" ] && cp "$WORK/$attn/model/model.safetensors" "$OUT/$attn.safetensors"
  fi
  cp "$WORK/$attn.out" "$WORK/pack/train/$attn.out" 2>/dev/null || true
  for f in "$OUT"/*.log; do [ -f "$f" ] && cp "$f" "$WORK/pack/"; done
  tar -czf "$OUT/train.tar.gz" -C "$WORK/pack" .
}
# TRAIN_STEPS=N [TRAIN_MODELS="ksa"]: a fixed schedule of N steps instead of the time budget, for the listed
# models only (default all three): one model per device command, so that each can train for most of the
# 10 minutes a command may run; the other models in later commands with the same N read the same batches.
# TRAIN_PARALLEL=1: the three models train at the same time on the one GPU (three processes; a small model
# leaves the GPU idle between the Python-launched kernels of one process, so three of them get ~3x the steps in
# the same wall time). Each fits its schedule to the time left of TOTAL_SECONDS (after the build, start-up,
# evaluation and export) measured while all three run, and all take the smallest step count (--sync-dir), so
# they see the same batches and the same schedule.
if [ "${TRAIN_PARALLEL:-0}" = 1 ]; then
  models=(${TRAIN_MODELS:-ksa swa full})
  PBUDGET=$((${TOTAL_SECONDS:-450} - (SECONDS - T_START) - 110))
  ((PBUDGET > 30)) || { echo "TRAIN_PARALLEL: only $PBUDGET s left for training"; exit 1; }
  echo "== train ${models[*]} side by side: a time budget of $PBUDGET s each ($((SECONDS - T_START)) s so far)"
  pids=()
  for attn in "${models[@]}"; do
    OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 "${RUN[@]}" -m ksa_train.train --attn "$attn" --out "$WORK/$attn" "${COMMON[@]}" \
      --steps 100000 --time-budget "$PBUDGET" --sync-dir "$WORK/sync" --sync-count "${#models[@]}" --fit-margin 0.92 \
      --max-seconds "$((PBUDGET + 40))" >"$WORK/$attn.out" 2>&1 &
    pids+=($!)
  done
  for i in "${!models[@]}"; do
    attn=${models[$i]}
    if wait "${pids[$i]}"; then grep -E "^ksa_train|time budget|side-by-side|passkey" "$WORK/$attn.out" || true
    else echo "train $attn: FAILED"; tail -30 "$WORK/$attn.out"; fi
    pack "$attn"
  done
  rm -f "$OUT"/*.log
  echo "== done in $((SECONDS - T_START)) s"
  ls -la "$OUT"
  exit 0
fi
steps="${TRAIN_STEPS:-}"
stop_step="${TRAIN_STEPS:-}"
for attn in ${TRAIN_MODELS:-ksa swa full}; do
  echo "== train $attn ($((SECONDS - T_START)) s so far)"
  if [ -z "$steps" ]; then args=(--steps 100000 --time-budget "$BUDGET"); else args=(--steps "$steps" --stop-at "$stop_step"); fi
  if [ -n "${TRAIN_STEPS:-}" ]; then limit=(--max-seconds "$((${TOTAL_SECONDS:-450} - (SECONDS - T_START) - 45))")
  else limit=(--max-seconds "$(awk -v b="$BUDGET" 'BEGIN { print 1.5 * b }')"); fi
  if PYTHONUNBUFFERED=1 "${RUN[@]}" -m ksa_train.train --attn "$attn" --out "$WORK/$attn" "${COMMON[@]}" "${args[@]}" \
       "${limit[@]}" >"$WORK/$attn.out" 2>&1; then
    grep -E "^ksa_train|time budget|passkey" "$WORK/$attn.out" || true
  else
    echo "train $attn: FAILED"; tail -30 "$WORK/$attn.out"
  fi
  if [ -z "$steps" ] && [ -f "$WORK/$attn/summary.json" ]; then
    read -r steps stop_step < <("${RUN[@]}" -c "import json; s = json.load(open('$WORK/$attn/summary.json')); print(s['schedule_steps'], s['steps'])")
    echo "   all three: a schedule of $steps steps, stopped after $stop_step"
  fi
  pack "$attn"
done
rm -f "$OUT"/*.log  # they are in train.tar.gz
echo "== done in $((SECONDS - T_START)) s"
ls -la "$OUT"
