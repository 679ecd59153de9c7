#!/usr/bin/env bash
# ksa against llama.cpp on the CPU, one weight type at a time, with the page cache in a stated state: both files
# of the pair (bf16: ~8 GB each; q8_0: ~4.3 GB each) fit the page cache together on a 23 GB machine, where the
# four files of compare.sh do not and get evicted between runs. Uses the models compare.sh writes (run it once).
#   bench/llama_cpp/pair.sh bf16|q8_0 [ROUNDS (default 2)]
# Environment: THREADS (2), PP (0: decode only), TG (64), WORK (.cache/llama-compare), KSA (build/bin/ksa),
#   KSA_ARGS (extra `ksa bench model` arguments, e.g. "--no-mmap"), LLAMA_ARGS (extra llama-bench arguments,
#   e.g. "--mmap 0"), LABEL (a name for this configuration in the results),
#   PREP: the page cache before the rounds:
#     warm  (default) both files read once by `cat` if fincore says they are not wholly resident (as they are)
#     evict both files dropped from the page cache (POSIX_FADV_DONTNEED), then read back by `cat`, one
#           after the other: both engines' files enter the cache the same way
#     cold  both files dropped, not read back: each engine's first run pages its own file in its own way
# Per run it prints tok/s and, sampled from /proc/PID/smaps_rollup while the run lasts (the largest value):
# FilePmdMapped (file pages mapped in 2 MiB pages), AnonHugePages, Rss; for ksa its bandwidth bound (1 GiB
# STREAM-like read in the same process) and the 1-minute load average after it (another process on the cores
# spoils the run). Lines go to $WORK/pair_runs.tsv.
set -euo pipefail
cd "$(dirname "$0")/../.."
WEIGHTS="${1:?bf16 or q8_0}" ROUNDS="${2:-2}"
THREADS="${THREADS:-2}" PP="${PP:-0}" TG="${TG:-64}" PREP="${PREP:-warm}" LABEL="${LABEL:-}"
WORK="$(realpath "${WORK:-.cache/llama-compare}")"
KSA="${KSA:-build/bin/ksa}"
LB="$WORK/llama.cpp/build/bin/llama-bench"
PY=/usr/bin/python3
case "$WEIGHTS" in
  bf16) KDIR="$WORK/qwen3-4b" GGUF="$WORK/qwen3-4b-bf16.gguf" ;;
  q8_0) KDIR="$WORK/qwen3-4b-q8" GGUF="$WORK/qwen3-4b-q8_0.gguf" ;;
  *) echo "pair.sh: weights must be bf16 or q8_0"; exit 2 ;;
esac
KDIR="${KDIR_OVERRIDE:-$KDIR}" GGUF="${GGUF_OVERRIDE:-$GGUF}"
KFILES=("$KDIR"/*.safetensors)
[ -x "$LB" ] && [ -f "$GGUF" ] && [ -f "${KFILES[0]}" ] || { echo "pair.sh: run compare.sh first"; exit 1; }

drop() { "$PY" -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"; }
resident() { fincore -nb -o RES "$@" | awk '{s += $1} END {printf "%.2f GB", s / 1e9}'; }
case "$PREP" in
  warm) for f in "${KFILES[@]}" "$GGUF"; do
          [ "$(fincore -nb -o RES "$f")" = "$(stat -c %s "$f")" ] || cat "$f" >/dev/null
        done ;;
  evict) drop "${KFILES[@]}" "$GGUF"; cat "${KFILES[@]}" >/dev/null; cat "$GGUF" >/dev/null ;;
  cold) drop "${KFILES[@]}" "$GGUF" ;;
  *) echo "pair.sh: PREP must be warm, evict or cold"; exit 2 ;;
esac
echo "== $WEIGHTS, PREP=$PREP $LABEL; resident: ksa $(resident "${KFILES[@]}"), llama.cpp $(resident "$GGUF");" \
  "FileHugePages $(awk '/FileHugePages/ {print $2 / 1e6 " GB"}' /proc/meminfo); load $(cut -d' ' -f1-3 /proc/loadavg)"

# watch PID: the largest FilePmdMapped / AnonHugePages / Rss (GB) of PID's smaps_rollup while it runs
watch_pid() {
  local pid=$1 fp=0 ah=0 rss=0 a b c
  while kill -0 "$pid" 2>/dev/null; do
    read -r a b c < <(awk '/^FilePmdMapped/ {f=$2} /^AnonHugePages/ {h=$2} /^Rss/ {r=$2} END {print f+0, h+0, r+0}' \
      "/proc/$pid/smaps_rollup" 2>/dev/null || echo "0 0 0")
    ((a > fp)) && fp=$a; ((b > ah)) && ah=$b; ((c > rss)) && rss=$c
    sleep 0.5
  done
  awk -v f="$fp" -v h="$ah" -v r="$rss" 'BEGIN {printf "%.2f\t%.2f\t%.2f", f / 1e6, h / 1e6, r / 1e6}'
}
RES="$WORK/pair_runs.tsv"
run() {  # run <engine> <command...>: prints engine, weights, label, pp, tg, FilePmdMapped, AnonHugePages, Rss
  local engine=$1 bound out="$WORK/pair_out.$$" pid maps tg pp
  shift
  "$@" >"$out" 2>>"$WORK/pair_err.log" &
  pid=$!
  maps=$(watch_pid "$pid")
  wait "$pid"
  if [ "$engine" = llama.cpp ]; then
    bound=
    pp=$(awk -F, 'NR==1{for(i=1;i<=NF;i++){h[$i]=i}} NR>1{gsub(/"/,"");if($h["n_gen"]==0) print $h["avg_ts"]}' "$out")
    tg=$(awk -F, 'NR==1{for(i=1;i<=NF;i++){h[$i]=i}} NR>1{gsub(/"/,"");if($h["n_prompt"]==0) print $h["avg_ts"]}' "$out")
  else
    read -r pp tg bound < <("$PY" -c 'import json, sys
j = json.load(open(sys.argv[1])); r = j["results"][0]
print("%.2f %.2f %.2f@%.1fGB/s" % (r.get("pp_tok_s") or 0, r["tg_tok_s"], r["bound_tok_s"], j["bandwidth_gb_s"]))' "$out")
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$engine" "$WEIGHTS" "${LABEL:-$PREP}" "${pp:--}" "$tg" "$maps" "${bound:--}" \
    "$(cut -d' ' -f1 /proc/loadavg)" |
    tee -a "$RES"
  rm -f "$out"
}
echo -e "engine\tweights\tlabel\tpp$PP\ttg$TG\tFilePmdMapped_GB\tAnonHugePages_GB\tRss_GB\tksa_bound_tok_s@bandwidth\tload1"
for r in $(seq "$ROUNDS"); do
  # shellcheck disable=SC2086
  run llama.cpp "$LB" -m "$GGUF" -p "$PP" -n "$TG" -t "$THREADS" -r 1 -o csv ${LLAMA_ARGS:-}
  # shellcheck disable=SC2086
  run ksa "$KSA" bench model -m "$KDIR" --device cpu -p "$PP" -n "$TG" -t "$THREADS" -r 1 -o json ${KSA_ARGS:-}
done
