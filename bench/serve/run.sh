#!/usr/bin/env bash
# Starts `ksa serve` on a checkpoint (127.0.0.1, a free port), runs bench/serve/loadgen.js against it (1, 8 and
# 64 concurrent streams unless told otherwise), prints its table and the server's /metrics summary, and stops
# the server.
#   bench/serve/run.sh MODEL_DIR [loadgen flags...]
# Environment: KSA (default build/bin/ksa), SERVE_ARGS (extra `ksa serve` flags, e.g. "-t 2 --max-seqs 64").
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${1:?usage: bench/serve/run.sh MODEL_DIR [loadgen flags...]}"
shift
KSA="${KSA:-build/bin/ksa}"
LOG="$(mktemp)"
# shellcheck disable=SC2086
"$KSA" serve -m "$MODEL" --host 127.0.0.1 --port 0 --quiet ${SERVE_ARGS:-} 2>"$LOG" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; rm -f "$LOG"' EXIT
PORT=""
for _ in $(seq 600); do
  PORT=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$LOG" | grep -o '[0-9]*$' || true)
  [ -n "$PORT" ] && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.1
done
[ -n "$PORT" ] || { echo "the server did not start"; cat "$LOG"; exit 1; }
head -1 "$LOG"
echo "# $(date -u +%Y-%m-%d), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), load $(cut -d' ' -f1-3 /proc/loadavg)"
node bench/serve/loadgen.js --url "http://127.0.0.1:$PORT" "$@"
curl -s "http://127.0.0.1:$PORT/metrics" 2>/dev/null |
  grep -E '^ksa_(generation_tokens_total|prompt_tokens_total|steps_total|live_sequences|kv_bytes_in_use|graph_[a-z_]*|plans_ahead_total[^ ]*|step_duration_seconds_(sum|count)[^ ]*) ' |
  sed 's/^/# /' || true
