// AVX-512 matrix-vector row kernel for ksa::cpu::linear (compiled with AVX-512 flags; called only after a
// run-time CPU check in dense_dispatch.cpp).
#include "cpu/dense_kernels.hpp"

#ifdef KSA_CPU_AVX512_TU
#include <immintrin.h>

namespace ksa::cpu::detail {
namespace {

float hsum(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float s = 0.f;
  for (float x : t) s += x;
  return s;
}

float dot_row(const void* W, DType wdt, int64_t row, int64_t K, const float* x) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  if (wdt == DType::bf16) {
    const uint16_t* w = static_cast<const uint16_t*>(W) + row * K;
    for (; k + 32 <= K; k += 32) {
      // 2 x 16 bf16 widened to fp32 by a 16-bit shift (maskz forms: GCC 12 warns on the plain ones).
      const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16));
      const __m512 w0 = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, h0), 16));
      const __m512 w1 = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, h1), 16));
      a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
    }
    float tail = 0.f;
    for (; k < K; ++k) tail += bf16::to_float(w[k]) * x[k];
    return hsum(_mm512_add_ps(a0, a1)) + tail;
  }
  const float* w = static_cast<const float*>(W) + row * K;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
  }
  float tail = 0.f;
  for (; k < K; ++k) tail += w[k] * x[k];
  return hsum(_mm512_add_ps(a0, a1)) + tail;
}

}  // namespace

DotRowFn dot_row_avx512() { return &dot_row; }

}  // namespace ksa::cpu::detail
#else
namespace ksa::cpu::detail {
DotRowFn dot_row_avx512() { return nullptr; }
}  // namespace ksa::cpu::detail
#endif
