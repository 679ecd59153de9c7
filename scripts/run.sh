#!/usr/bin/env bash
# The main job: install what is missing, build, and run `ksa demo` on its built-in default
# (KSA attention on a synthetic 32K-token sequence on the CPU, checked against the oracle).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec ./build/bin/ksa demo "$@"
