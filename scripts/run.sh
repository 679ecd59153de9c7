#!/usr/bin/env bash
# The main job: install what is missing, build, then
#   1. `ksa generate` from the shipped default model, models/ksa-austen (a 6.6 M-parameter Qwen3-KSA trained
#      on Jane Austen's novels and the King James Bible with k=8, S=1 and a 128-token window; MODEL.md there):
#      a continuation of an Austen-like prompt, then a passkey retrieved from ~1,800 tokens back, 14 times the
#      model's window, with the KV-cache line (KSA against full attention) on stderr. On the CPU, in seconds.
#   2. `ksa demo`: KSA attention on a synthetic 32K-token sequence on the CPU, checked against the oracle.
# Extra arguments go to the first `ksa generate` (e.g. --temp 0 for greedy, or -p "another prompt").
# Random-weight checkpoints of the released shapes, for benchmarks: `ksa make-model --shape tiny|4b --out DIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

KSA=./build/bin/ksa
MODEL=models/ksa-austen

echo
echo "== ksa generate -m $MODEL: a continuation (sampled: --temp 0.7 --top-k 40 --seed 1)"
"$KSA" generate -m "$MODEL" -p "Elizabeth was very much surprised by the letter; she" -n 80 --temp 0.7 --top-k 40 --seed 1 "$@"
echo
echo
echo "== Passkey retrieval: the key is ~1,800 tokens before the question, far outside the 128-token window;"
echo "== only the summary tokens carry it (a sliding-window model of the same shape answers at chance)."
echo "== Prompt: $MODEL/passkey-prompt.txt (Austen's held-out text around the needle; its last line is the question)"
echo "   needle:   $(grep -o 'The pass key is [0-9]*\. Remember it\.' "$MODEL/passkey-prompt.txt")"
echo "   question: $(tail -n 1 "$MODEL/passkey-prompt.txt")"
log=$(mktemp)
answer=$("$KSA" generate -m "$MODEL" -f "$MODEL/passkey-prompt.txt" -n 6 --temp 0 --no-display-prompt 2>"$log") ||
  { cat "$log"; exit 1; }
echo "   answer:  $answer"
grep -E "prompt eval time|KV cache" "$log"
rm -f "$log"

echo
echo "== ksa demo: one KSA attention layer over a synthetic 32K-token text, checked against the oracle."
exec "$KSA" demo
