// Storage types: fp32, bf16 and fp16 (stored), always computed in fp32 or wider; and q8_0, 8-bit weights in
// blocks of 32 (an fp16 scale and 32 int8 quants, 34 bytes; docs/quantization.md), a storage type of weight
// matrices only (activations and KV caches are never q8_0).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "ksa/enum_name.hpp"
#include "ksa/error.hpp"

namespace ksa {

enum class DType : uint8_t { f32, bf16, f16, q8_0 };

inline const char* dtype_name(DType t) { return enum_name(t, {"f32", "bf16", "f16", "q8_0"}); }
// Q8_0 blocks: 32 weights in 34 bytes.
inline constexpr int64_t kQ8_0Block = 32, kQ8_0BlockBytes = 34;
// Bytes per element of f32, bf16, f16. q8_0 has no per-element size (throws ksa::Error): use dtype_bytes.
inline int64_t dtype_size(DType t) {
  if (t == DType::q8_0) fail("dtype_size: q8_0 has no per-element size (34 bytes per 32 weights)");
  return t == DType::f32 ? 4 : 2;
}
// Bytes of n elements (for q8_0, n a multiple of 32: n / 32 blocks of 34 bytes).
inline int64_t dtype_bytes(DType t, int64_t n) {
  return t == DType::q8_0 ? n / kQ8_0Block * kQ8_0BlockBytes : n * dtype_size(t);
}
// Parses "f32"/"fp32"/"float32", "bf16"/"bfloat16", "f16"/"fp16"/"float16"; false if unknown (q8_0 is not
// an element type that flags choose).
bool parse_dtype(std::string_view s, DType& out);

// bfloat16 as stored bits; conversion rounds to nearest even, NaN stays NaN.
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float f) : bits(from_float(f)) {}
  explicit operator float() const { return to_float(bits); }
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  static float to_float(uint16_t b) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// IEEE half as stored bits; conversion rounds to nearest even, with subnormals, inf and NaN.
struct f16 {
  uint16_t bits = 0;
  f16() = default;
  explicit f16(float f) : bits(from_float(f)) {}
  explicit operator float() const { return to_float(bits); }
  static uint16_t from_float(float f);
  static float to_float(uint16_t h);
};

// Rounds a float through the storage type (what a kernel reading that dtype sees).
inline float round_to(DType t, float x) {
  switch (t) {
    case DType::bf16:
      return float(bf16(x));
    case DType::f16:
      return float(f16(x));
    default:
      return x;
  }
}

// Element `index` of a q8_0 matrix stored row after row (rows of whole blocks): its block's scale times its
// quant. Byte reads only, so any address works.
inline float load_q8_0(const void* base, int64_t index) {
  const auto* b = static_cast<const unsigned char*>(base) + index / kQ8_0Block * kQ8_0BlockBytes;
  return f16::to_float(uint16_t(b[0] | (b[1] << 8))) * float(int8_t(b[2 + index % kQ8_0Block]));
}

inline float load_as_float(DType t, const void* base, int64_t index) {
  switch (t) {
    case DType::bf16:
      return bf16::to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::f16:
      return f16::to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::q8_0:
      return load_q8_0(base, index);
    default:
      return static_cast<const float*>(base)[index];
  }
}
// f32, bf16, f16 (a q8_0 block is written whole: ksa::cpu::quantize_q8_0).
inline void store_from_float(DType t, void* base, int64_t index, float x) {
  switch (t) {
    case DType::bf16:
      static_cast<uint16_t*>(base)[index] = bf16::from_float(x);
      break;
    case DType::f16:
      static_cast<uint16_t*>(base)[index] = f16::from_float(x);
      break;
    case DType::q8_0:
      fail("store_from_float: q8_0 is written in whole blocks (ksa::cpu::quantize_q8_0)");
    default:
      static_cast<float*>(base)[index] = x;
  }
}

}  // namespace ksa
