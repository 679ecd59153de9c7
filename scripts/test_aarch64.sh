#!/usr/bin/env bash
# The CPU library and its kernel tests (core, cpu, cache) cross-compiled for 64-bit Arm with Debian's
# toolchain and run under qemu-user: correctness of the NEON (and portable) SIMD targets on an x86 machine.
# Installs what is missing (the cross compiler, qemu-user, and arm64 multiarch libhwy/libgtest/libopenblas),
# builds in build-aarch64/ (CMake toolchain file cmake/aarch64-linux-gnu.cmake). Extra arguments go to ctest.
# Environment: JOBS; KSA_AARCH64_FULL=1 runs every test (see below). Measured 2026-12-03 on the 2-core dev
# machine under load (docs/testing.md): 47 s to build from scratch, 53-70 s to test.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "ksa aarch64: adding the arm64 architecture to dpkg (multiarch)"
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
fi
PACKAGES=(g++-aarch64-linux-gnu qemu-user libhwy-dev:arm64 libgtest-dev:arm64 libopenblas-dev:arm64)
source scripts/install_missing.sh
install_missing "ksa aarch64" "${PACKAGES[@]}"

t0=$(date +%s)
cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DCMAKE_BUILD_TYPE=Release \
  -DKSA_CUDA=OFF -DKSA_ENGINE=OFF >build-aarch64.configure.log 2>&1 || { cat build-aarch64.configure.log; exit 1; }
cmake --build build-aarch64 -j "${JOBS:-$(nproc)}" --target ksa_core_tests ksa_cpu_tests ksa_cache_tests ksa_cuda_host_tests
t1=$(date +%s)
# Under emulation the slowest tests are left out unless KSA_AARCH64_FULL=1: they check threading, the cache's
# block bookkeeping and packing (scalar code that the x86 suite covers), not the SIMD kernels, and take
# 190 s of the 400 s of test time.
exclude=()
[ "${KSA_AARCH64_FULL:-0}" != 0 ] ||
  exclude=(-E "Decode.RandomShapesMatchOracle|CpuVarlen.PackedEqualsOneStreamAtATime|DeterministicAcrossThreadCounts")
(cd build-aarch64 && ctest --output-on-failure -j "${JOBS:-$(nproc)}" --timeout 900 -L "core|cpu|cache|cuda_host" "${exclude[@]}" "$@")
echo "== aarch64 (qemu-user): $((t1 - t0)) s to build, $(($(date +%s) - t1)) s to test"
