// Run-time choice of the matrix-vector kernel (see dense_kernels.hpp).
#include <cstdlib>
#include <cstring>

#include "cpu/dense_kernels.hpp"

namespace ksa::cpu::detail {

DotRowFn dot_row_kernel() {
  static const DotRowFn fn = [] {
    const char* force = std::getenv("KSA_CPU_PRIMITIVES");
    const bool portable = force && std::strcmp(force, "portable") == 0;
    const bool cpu_ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
    const DotRowFn avx = dot_row_avx512();
    return (!portable && cpu_ok && avx) ? avx : &dot_row_portable;
  }();
  return fn;
}

}  // namespace ksa::cpu::detail
