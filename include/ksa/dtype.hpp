// Storage types: fp32, bf16 and fp16 (stored), always computed in fp32 or wider.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace ksa {

enum class DType : uint8_t { f32, bf16, f16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
  }
  return "?";
}
inline int64_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }
// Parses "f32"/"fp32"/"float32", "bf16"/"bfloat16", "f16"/"fp16"/"float16"; false if unknown.
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
    case DType::bf16: return float(bf16(x));
    case DType::f16: return float(f16(x));
    default: return x;
  }
}

inline float load_as_float(DType t, const void* base, int64_t index) {
  switch (t) {
    case DType::bf16: return bf16::to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::f16: return f16::to_float(static_cast<const uint16_t*>(base)[index]);
    default: return static_cast<const float*>(base)[index];
  }
}
inline void store_from_float(DType t, void* base, int64_t index, float x) {
  switch (t) {
    case DType::bf16: static_cast<uint16_t*>(base)[index] = bf16::from_float(x); break;
    case DType::f16: static_cast<uint16_t*>(base)[index] = f16::from_float(x); break;
    default: static_cast<float*>(base)[index] = x;
  }
}

}  // namespace ksa
