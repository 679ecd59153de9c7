#!/usr/bin/env bash
# Runs one libFuzzer harness over its seeds for a while (one process).
#   fuzz/run.sh [--binary PATH] [--corpus DIR] NAME SECONDS [libFuzzer flags...]
# NAME is a harness (pattern, config, safetensors, tokenizer_json, tokenizer_encode, chat_template,
# serve_request).
# Defaults: the binary build-sanitize/bin/fuzz_NAME (scripts/test.sh builds it), the corpus
# build-sanitize/fuzz/corpus/NAME (grown across runs; fuzz/seeds/NAME is read, never written). Findings are
# written to the corpus dir's parent as crash-*/leak-*/timeout-*/oom-* files and make the exit code nonzero.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="" corpus=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) bin="$2"; shift 2 ;;
    --corpus) corpus="$2"; shift 2 ;;
    *) break ;;
  esac
done
name="$1" secs="$2"
shift 2
bin="${bin:-$here/../build-sanitize/bin/fuzz_$name}"
corpus="${corpus:-$here/../build-sanitize/fuzz/corpus/$name}"
[ -x "$bin" ] || { echo "fuzz/run.sh: $bin not built (scripts/test.sh, or cmake -DKSA_FUZZ=ON with clang++)" >&2; exit 1; }
mkdir -p "$corpus"
dict=()
[ -f "$here/dicts/$name.dict" ] && dict=(-dict="$here/dicts/$name.dict")
# -timeout: one input taking over 10 s is a finding (a hang); -rss_limit_mb: so is 2 GiB of memory; leaks
# are findings too (LeakSanitizer, on by default in the sanitizer build).
exec "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$(dirname "$corpus")/$name-" "${dict[@]}" "$@" "$corpus" "$here/seeds/$name"
