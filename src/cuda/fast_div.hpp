// Division by a divisor fixed for a launch, by a multiply-high (Granlund and Montgomery's method with a
// 32-bit multiplier, as CUTLASS's FastDivmod): q = umulhi(y, mul) >> shift, exact for every y < 2^31. A
// kernel builds it once per CTA and saves a u32 division (~20 instructions) per use. Plain C++ (KSA_HD), so
// that a CPU test (tests/cuda_host/fast_div_test.cpp) checks it against the division.
#pragma once
#include <cstdint>

#include "ksa/config.hpp"

namespace ksa::cuda {

struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;  // d == 1: q = y

  FastDiv() = default;
  // d >= 1. mul = ceil(2^(31 + l) / d) with l = ceil(log2 d) fits 32 bits; shift = l - 1.
  KSA_HD explicit FastDiv(uint32_t divisor) : d(divisor) {
    if (d <= 1) return;
    uint32_t l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    mul = uint32_t(((uint64_t(1) << (31 + l)) + d - 1) / d);
    shift = l - 1;
  }
  KSA_HD uint32_t div(uint32_t y) const {
    if (d <= 1) return y;
#if defined(__CUDA_ARCH__)
    return __umulhi(y, mul) >> shift;
#else
    return uint32_t((uint64_t(y) * mul) >> 32) >> shift;
#endif
  }
  KSA_HD uint32_t mod(uint32_t y, uint32_t q) const { return y - q * d; }  // q = div(y)
};

}  // namespace ksa::cuda
