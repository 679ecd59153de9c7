# Shared by the bench/gpu scripts (source it after `set -euo pipefail`): moves to the repository root, sets
# OUT (logs; default bench/gpu/out), ARCH (KSA_CUDA_ARCH, default 90) and GTEST_ARGS (KSA_GTEST_SRC=<googletest
# source> where there is no libgtest), and defines the kernel-only (engine off) Release configure and build.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-bench/gpu/out}"
mkdir -p "$OUT"
ARCH="${KSA_CUDA_ARCH:-90}"
GTEST_ARGS=()
if [ -n "${KSA_GTEST_SRC:-}" ]; then GTEST_ARGS=(-DKSA_GTEST_SRC="$KSA_GTEST_SRC"); fi
# A machine without Debian's libhwy-dev (the CPU kernels' SIMD) can be given Highway as a prefix:
# KSA_DEPS=<dir> with hwy/{include,lib/x86_64-linux-gnu} (CMake finds it through CMAKE_PREFIX_PATH).
if [ -n "${KSA_DEPS:-}" ] && [ -d "$KSA_DEPS/hwy" ]; then
  _hwy=$(realpath "$KSA_DEPS/hwy")
  export CMAKE_PREFIX_PATH="$_hwy${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export LD_LIBRARY_PATH="$_hwy/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# gpu_configure <build dir> <log prefix> [cmake args...]: log in $OUT/<prefix>cmake.log; its tail on failure.
gpu_configure() {
  local dir=$1 log="$OUT/${2}cmake.log"
  shift 2
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DKSA_ENGINE=OFF -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    "${GTEST_ARGS[@]}" "$@" >"$log" 2>&1 || { tail -30 "$log"; exit 1; }
}

# gpu_build <build dir> <log prefix> [cmake --build args...]: log in $OUT/<prefix>build.log; on failure its
# compiler errors (or its tail when no line says "error").
gpu_build() {
  local dir=$1 log="$OUT/${2}build.log"
  shift 2
  cmake --build "$dir" -j "$(nproc)" "$@" >"$log" 2>&1 && return 0
  if grep -qE "error" "$log"; then grep -E "error" -A3 "$log" | head -60; else tail -30 "$log"; fi
  exit 1
}

# gpu_torch <build dir>: installs ksa_torch against that (CUDA) build and runs python/tests, the CUDA ones
# included (scripts/test_python.sh; log in $OUT/torch_tests.log, its tail on failure); then KSA_PY (an array)
# runs Python with the installed package.
gpu_torch() {
  local dir=$1
  if ! KSA_PYTHON="${KSA_PYTHON:-python3}" scripts/test_python.sh "$dir" -rA >"$OUT/torch_tests.log" 2>&1; then
    tail -80 "$OUT/torch_tests.log"; echo "ksa_torch tests: FAILED (log: $OUT/torch_tests.log)"; exit 1
  fi
  grep -E "^python:|^pip install|^import ksa_torch|^(PASSED|SKIPPED|FAILED) |passed|failed" "$OUT/torch_tests.log" | tail -90
  if [ -x "$dir/python-venv/bin/python" ]; then KSA_PY=("$dir/python-venv/bin/python")
  else KSA_PY=(env PYTHONPATH="$dir/python-site" "${KSA_PYTHON:-python3}"); fi
}
