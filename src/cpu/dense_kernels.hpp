// Internal: the matrix-vector row kernel behind ksa::cpu::linear, chosen once at run time.
#pragma once
#include <cstdint>

#include "ksa/dtype.hpp"

namespace ksa::cpu::detail {

using DotRowFn = float (*)(const void* W, DType wdt, int64_t row, int64_t K, const float* x);
float dot_row_portable(const void* W, DType wdt, int64_t row, int64_t K, const float* x);
// AVX-512 version (dense_avx512.cpp), or null when not compiled in.
DotRowFn dot_row_avx512();
// The fastest kernel this CPU runs (AVX-512 after a __builtin_cpu_supports check; KSA_CPU_PRIMITIVES=portable
// forces the portable one).
DotRowFn dot_row_kernel();

}  // namespace ksa::cpu::detail
