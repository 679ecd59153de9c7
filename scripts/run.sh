#!/usr/bin/env bash
# The main job: install what is missing, build, then
#   1. `ksa generate` on a tiny RANDOM-weight Qwen3-KSA checkpoint (made once into .cache/models/tiny with
#      the real Qwen3 tokenizer, which scripts/fetch_test_data.sh caches): the whole engine path (tokenizer,
#      prefill, decode through the compressed KV cache, sampling, streamed UTF-8) on a short prompt, then on a
#      ~2K-token prompt to show the KV cache of KSA against full attention. The text is gibberish by design.
#   2. `ksa demo`: KSA attention on a synthetic 32K-token sequence on the CPU, checked against the oracle.
# Extra arguments go to the first `ksa generate` (e.g. --temp 0.8 --seed 1, or -p "another prompt").
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/fetch_test_data.sh

KSA=./build/bin/ksa
MODEL=.cache/models/tiny
if [ ! -f "$MODEL/config.json" ] || [ ! -f "$MODEL/tokenizer.json" ]; then
  "$KSA" make-model --shape tiny --out "$MODEL"
fi

echo
if [ -f "$MODEL/tokenizer.json" ]; then
  echo "== ksa generate on $MODEL (4 layers, hidden 64): the weights are RANDOM, so the text below is gibberish."
  echo "== It exercises the engine end to end; it says nothing about the quality of KSA."
  "$KSA" generate -m "$MODEL" -p "Kwai Summary Attention keeps the KV cache small because" -n 48 "$@"
  echo
  echo "== The same model on a ~2K-token prompt (not echoed): the KV cache of KSA against full attention."
  "$KSA" generate -m "$MODEL" -p "$(seq -s ' ' 1 500)" -n 16 --no-display-prompt >/dev/null
else
  echo "== ksa generate skipped: no tokenizer (scripts/fetch_test_data.sh could not fetch it; see its message above)."
fi

echo
echo "== ksa demo: one KSA attention layer over a synthetic 32K-token text, checked against the oracle."
exec "$KSA" demo
