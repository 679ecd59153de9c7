#!/usr/bin/env bash
# The `ksa` command end to end (ctest `ksa_cli`): clear errors with a nonzero exit for bad input, and
# deterministic generation (greedy output equal across thread counts; the same seed gives the same text).
#   tests/cli/cli_test.sh <path to ksa> <scratch dir>
# Exits 77 (ctest: skipped) when the Qwen3 tokenizer cache of scripts/fetch_test_data.sh is absent.
set -uo pipefail
KSA="$1"
DIR="$2/cli_test_model"
fails=0
check() {  # check NAME EXPECTED_RC PATTERN -- command...: exit code and a pattern in stdout+stderr
  local name="$1" want="$2" pat="$3"
  shift 4
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  if [ "$rc" != "$want" ] && ! { [ "$want" = "nz" ] && [ "$rc" != 0 ]; }; then
    echo "FAIL $name: exit $rc, expected $want"; echo "$out" | tail -5; fails=$((fails + 1)); return
  fi
  if ! grep -qE -- "$pat" <<<"$out"; then
    echo "FAIL $name: output lacks /$pat/"; echo "$out" | tail -5; fails=$((fails + 1)); return
  fi
  echo "ok   $name"
}

check "unknown flag" 2 "unknown flag|--bogus" -- "$KSA" generate --bogus
check "missing model dir" nz "/nonexistent/model" -- "$KSA" generate -m /nonexistent/model -p hi
check "missing prompt" nz "prompt|-p" -- "$KSA" generate -m /nonexistent/model
check "unknown command" nz "unknown command|frobnicate" -- "$KSA" frobnicate
check "a misspelt command" 2 "unknown command 'generat' \(did you mean 'generate'\?\)" -- "$KSA" generat
check "a misspelt flag" 2 "unknown flag '--tmep' \(did you mean '--temp'\?\)" -- "$KSA" generate --tmep 1
check "no suggestion far from any flag" 2 "unknown flag '--bogus'$" -- "$KSA" generate --bogus
check "version" 0 "^ksa [0-9]+\.[0-9]+\.[0-9]+$" -- "$KSA" --version

rm -rf "$DIR"
if ! "$KSA" make-model --shape tiny --out "$DIR" >/dev/null 2>&1 || [ ! -f "$DIR/tokenizer.json" ]; then
  echo "SKIPPED: no tokenizer cache (run scripts/fetch_test_data.sh); the generation checks need it"
  [ "$fails" = 0 ] && exit 77 || exit 1
fi
PROMPT="Kwai Summary Attention compresses the cache of old chunks into summary tokens, so"
check "prompt longer than the context" nz "context" -- "$KSA" generate -m "$DIR" -p "$PROMPT" --ctx 4
check "bad sampler value" nz "top_p|top-p" -- "$KSA" generate -m "$DIR" -p hi --temp 0.7 --top-p 1.5
check "negative prefill piece" 2 "-ub.*out of range" -- "$KSA" generate -m "$DIR" -p hi -ub -1
# -i: turns from a pipe; /reset starts over; turn 3 continues turn 2's cache (its new tokens only).
conv() { printf 'hello there\n/reset\nsecond try\nand a follow-up\n/exit\n' | "$KSA" generate -m "$DIR" -i -n 6 -t 1; }
check "conversation: three turns" 0 "turn 3: [0-9]+ new prompt tokens \(" -- conv
check "conversation: reset" 0 "conversation reset" -- conv
# The cache holds each whole answer (the token that ended it at -n included): a turn's KV line counts the
# previous turn's tokens + its new prompt tokens + its answer (when the answer did not end at an end-of-sequence id).
cache_whole() {
  local prev=0 bad=0 line re='turn [0-9]+: ([0-9]+) new prompt tokens.*, ([0-9]+) generated.* at ([0-9]+) tokens'
  while IFS= read -r line; do
    [[ $line =~ $re ]] || continue
    local a=${BASH_REMATCH[1]} g=${BASH_REMATCH[2]} t=${BASH_REMATCH[3]}
    echo "turn: before $prev + prompt $a + answer $g -> cache $t"
    if [ "$g" = 6 ] && [ "$t" != $((prev + a + g)) ]; then bad=1; fi
    prev=$t
  done < <(printf 'hello there\nand a follow-up\n/exit\n' | "$KSA" generate -m "$DIR" -i -n 6 -t 1 2>&1)
  [ "$prev" -gt 0 ] && [ "$bad" = 0 ] && echo "cache holds whole answers"
}
check "conversation: the cache holds whole answers" 0 "cache holds whole answers" -- cache_whole
check "no prompt without -i" 2 "or -i for a conversation" -- "$KSA" generate -m "$DIR"
check "-m a file in the checkpoint" 0 "KV cache" -- "$KSA" info -m "$DIR/config.json"
check "llama-cli spelling -c" nz "context" -- "$KSA" generate -m "$DIR" -p "$PROMPT" -c 4
# bench model: lists run every case (2 x 2 x 1 here); -o json is one document with a result per case.
check "bench model: lists" 0 "^4$" -- bash -c "'$KSA' bench model -m '$DIR' -p 8,16 -n 2 -b 1,2 -r 1 --bw-mib 0 -t 1 | grep -c '^| tg'"
check "bench model: -o json" 0 "^3 results, batch 2 n_gen 1 2 3$" -- bash -c "'$KSA' bench model -m '$DIR' -p 8 -n 1,2,3 -b 2 -r 1 \
  --bw-mib 0 -t 1 -o json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); r=d[\"results\"]; \
print(len(r), \"results, batch\", r[0][\"batch\"], \"n_gen\", *[x[\"n_gen\"] for x in r])'"
check "bench model: a bad list" 2 "'8,' is not a list of integers" -- "$KSA" bench model -m "$DIR" -p 8,

# ksa quantize (docs/quantization.md): the q8_0 copy is 53% of the bf16 weights, says what it is, and runs.
Q8="$2/cli_test_model_q8"
rm -rf "$Q8"
check "quantize: q8_0" 0 "41 of 62 tensors to q8_0; weights .*\(53\.1%\), the quantised matrices .*\(53\.1%\)" -- \
  "$KSA" quantize -m "$DIR" --type q8_0 --out "$Q8" -q
check "quantize: info" 0 "weights: q8_0 \(norms bf16\)" -- "$KSA" info -m "$Q8"
check "quantize: generate" 0 "weights [0-9.]+ MiB q8_0 \(norms bf16\)" -- "$KSA" generate -m "$Q8" -p "$PROMPT" -n 8
check "quantize: bench model" 0 "weights [0-9.]+ MiB q8_0" -- "$KSA" bench model -m "$Q8" -p 8 -n 2 -r 1 --bw-mib 0 -t 1
check "quantize: a bad type" 2 "--type: must be q8_0 \(got 'q4_0'\)" -- "$KSA" quantize -m "$DIR" --type q4_0 --out "$Q8"
q1=$("$KSA" generate -m "$Q8" -p "$PROMPT" -n 24 --no-display-prompt -t 1 2>/dev/null)
q2=$("$KSA" generate -m "$Q8" -p "$PROMPT" -n 24 --no-display-prompt -t 2 2>/dev/null)
if [ -n "$q1" ] && [ "$q1" = "$q2" ]; then echo "ok   quantize: greedy output equal with -t 1 and -t 2"
else echo "FAIL quantize: greedy q8_0 output differs across thread counts"; printf '%s\n---\n%s\n' "$q1" "$q2"; fails=$((fails + 1)); fi
rm -rf "$Q8"

gen() { "$KSA" generate -m "$DIR" -p "$PROMPT" -n 40 --no-display-prompt "$@" 2>/dev/null; }
g1=$(gen -t 1); g2=$(gen -t 2)
if [ -n "$g1" ] && [ "$g1" = "$g2" ]; then echo "ok   greedy output equal with -t 1 and -t 2"
else echo "FAIL greedy output differs across thread counts"; printf '%s\n---\n%s\n' "$g1" "$g2"; fails=$((fails + 1)); fi
s1=$(gen --temp 0.9 --top-k 50 --seed 11); s2=$(gen --temp 0.9 --top-k 50 --seed 11 -t 1)
if [ -n "$s1" ] && [ "$s1" = "$s2" ]; then echo "ok   same seed, same sampled output"
else echo "FAIL same seed gave different output"; printf '%s\n---\n%s\n' "$s1" "$s2"; fails=$((fails + 1)); fi
s3=$(gen --temp 0.9 --top-k 50 --seed 12)
if [ "$s1" != "$s3" ]; then echo "ok   another seed, other output"
else echo "FAIL seeds 11 and 12 gave the same 40 tokens"; fails=$((fails + 1)); fi
check "timings and KV bytes on stderr" 0 "prompt eval time.*tokens per second" -- "$KSA" generate -m "$DIR" -p "$PROMPT" -n 4

# ksa perplexity / eval passkey / tokenize (docs/training.md): flags and errors; their numbers are checked
# against the PyTorch module in python/tests/test_train.py.
SRC="$(cd "$(dirname "$0")/../.." && pwd)"
check "perplexity: unknown flag" 2 "unknown flag" -- "$KSA" perplexity --bogus
check "perplexity: no file" 2 "-f/--file: required" -- "$KSA" perplexity -m "$DIR"
check "perplexity: text shorter than ctx" 1 "fewer than --ctx" -- "$KSA" perplexity -m "$DIR" -f "$SRC/docs/ksa.md" --ctx 100000 --device cpu
check "perplexity: counts" 0 "windows 2, ctx 64, tokens scored 62 \\(second half" -- "$KSA" perplexity -m "$DIR" -f "$SRC/docs/ksa.md" --ctx 64 --chunks 2 --device cpu
check "eval: no task" 2 "a task is required" -- "$KSA" eval
check "eval: unknown task" 2 "unknown task 'bogus'" -- "$KSA" eval bogus
check "eval passkey: bad lengths" 2 "--lengths" -- "$KSA" eval passkey -m "$DIR" -f "$SRC/docs/ksa.md" --lengths 10,x
check "eval passkey: length below the fixed pieces" 1 "shorter than the prompt's fixed pieces" -- "$KSA" eval passkey -m "$DIR" -f "$SRC/docs/ksa.md" --lengths 5 --device cpu
check "eval passkey: table" 0 "^ +64 +[0-9]+ +2 " -- "$KSA" eval passkey -m "$DIR" -f "$SRC/docs/ksa.md" --lengths 64 --trials 2 --device cpu
check "tokenize: count" 0 "^[0-9]+$" -- "$KSA" tokenize -m "$DIR" -p "The pass key is 48213." --count
rm -rf "$DIR"
[ "$fails" = 0 ] || { echo "$fails check(s) failed"; exit 1; }
echo "all passed"
