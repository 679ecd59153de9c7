#!/usr/bin/env bash
# Install what is missing, build (CUDA compiled when nvcc is found), fetch test data, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ -x scripts/fetch_test_data.sh ]; then ./scripts/fetch_test_data.sh; fi
cd build
ctest --output-on-failure -j "${JOBS:-$(nproc)}" --timeout 900 "$@"
