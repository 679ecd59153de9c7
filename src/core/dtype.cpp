#include "ksa/dtype.hpp"

namespace ksa {

bool parse_dtype(std::string_view s, DType& out) {
  if (s == "f32" || s == "fp32" || s == "float32" || s == "F32") out = DType::f32;
  else if (s == "bf16" || s == "bfloat16" || s == "BF16") out = DType::bf16;
  else if (s == "f16" || s == "fp16" || s == "float16" || s == "F16") out = DType::f16;
  else return false;
  return true;
}

uint16_t f16::from_float(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to inf (>= 65520)
  if (ax < 0x38800000u) {                                  // subnormal or zero in half
    if (ax < 0x33000000u) return uint16_t(sign);           // < 2^-25 rounds to zero
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t sh = 126 - e;  // value = m * 2^(e-150); in units of 2^-24 (half's subnormal step)
    uint32_t q = m >> sh;
    const uint32_t rem = m & ((1u << sh) - 1), half = 1u << (sh - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t h = ((ax >> 13) - (112u << 10));  // rebias exponent 127 -> 15
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

float f16::to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
  if (e == 0) {
    if (m == 0) x = sign;
    else {  // subnormal: normalise
      int s = -1;
      do {
        ++s;
        m <<= 1;
      } while (!(m & 0x400u));
      x = sign | ((112u - uint32_t(s)) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

}  // namespace ksa
