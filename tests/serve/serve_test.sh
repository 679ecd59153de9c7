#!/usr/bin/env bash
# `ksa serve` end to end (ctest `ksa_serve_e2e`): makes a tiny random-weight checkpoint with the Qwen3
# tokenizer and runs tests/serve/e2e.js (the official `openai` npm client and raw HTTP against servers it
# starts on 127.0.0.1). Exits 77 (ctest: skipped) when the tokenizer cache, node or the openai package of
# scripts/fetch_test_data.sh is missing.
#   tests/serve/serve_test.sh <path to ksa> <scratch dir>
set -uo pipefail
KSA="$1"
DIR="$2/serve_test_model/tiny"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"

if ! command -v node >/dev/null 2>&1; then
  echo "SKIPPED: node not found (scripts/setup.sh installs it)"; exit 77
fi
if [ ! -f "$ROOT/.cache/openai-node/node_modules/openai/package.json" ]; then
  echo "SKIPPED: the openai npm client is not in .cache/openai-node (run scripts/fetch_test_data.sh)"; exit 77
fi
rm -rf "$DIR"
if ! (cd "$ROOT" && "$KSA" make-model --shape tiny --out "$DIR" >/dev/null 2>&1) || [ ! -f "$DIR/tokenizer.json" ]; then
  echo "SKIPPED: no tokenizer cache (run scripts/fetch_test_data.sh); ksa serve needs a tokenizer"; rm -rf "$DIR"; exit 77
fi
timeout 300 node "$ROOT/tests/serve/e2e.js" "$KSA" "$DIR" "$ROOT"
rc=$?
rm -rf "$(dirname "$DIR")"
exit $rc
