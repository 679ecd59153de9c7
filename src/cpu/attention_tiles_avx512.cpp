// AVX-512 tile primitives (see tile_kernels.hpp). This file is compiled with AVX-512 flags (src/cpu/
// CMakeLists.txt) and only ever called through kAvx512TileKernels after the runtime check in
// attention_tiles.cpp. It includes no header with inline C++ code (only intrinsics) so that nothing compiled
// here can be linked into the portable path.
//
// Register blocking: both GEMM-like primitives keep an R x 4 block of 16-float accumulators (R <= 6 rows,
// 64 columns: 24 of the 32 zmm registers), stream one operand as 4 vector loads and broadcast the other.
#include "cpu/tile_kernels.hpp"

#if defined(KSA_CPU_AVX512_TU)
// GCC 12's AVX-512 intrinsics initialise their "undefined" vectors from themselves, which -Wuninitialized
// reports where they are inlined (GCC bug 105593): silence that false positive in this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

namespace ksa::cpu::detail {
namespace {

// exp(x) for a vector: 2^n * e^r with n = round(x / ln 2), |r| <= ln2/2, e^r by its degree-7 Taylor polynomial
// (truncation < 1e-8 relative, about one ulp overall). x < -87 (including -inf) gives 0; NaN stays NaN.
inline __m512 exp512(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.f), x);  // operand order keeps NaN in x
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(_knot_mask16(tiny), _mm512_scalef_ps(p, n));
}

inline __mmask16 tail_mask(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

template <int R>
inline void scores_block(const float* A, int64_t lda, const float* Bt, int Dp, float* C) {
  __m512 c[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) c[r][v] = _mm512_setzero_ps();
  for (int d = 0; d < Dp; ++d) {
    const float* b = Bt + int64_t(d) * 64;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32),
                 b3 = _mm512_loadu_ps(b + 48);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + d]);
      c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
      c[r][2] = _mm512_fmadd_ps(a, b2, c[r][2]);
      c[r][3] = _mm512_fmadd_ps(a, b3, c[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(C + r * 64 + v * 16, c[r][v]);
}

void scores_avx512(const float* A, int64_t lda, int rows, const float* Bt, int Dp, float* C) {
  int r = 0;
  for (; r + 6 <= rows; r += 6) scores_block<6>(A + r * lda, lda, Bt, Dp, C + r * 64);
  switch (rows - r) {
    case 5: scores_block<5>(A + r * lda, lda, Bt, Dp, C + r * 64); break;
    case 4: scores_block<4>(A + r * lda, lda, Bt, Dp, C + r * 64); break;
    case 3: scores_block<3>(A + r * lda, lda, Bt, Dp, C + r * 64); break;
    case 2: scores_block<2>(A + r * lda, lda, Bt, Dp, C + r * 64); break;
    case 1: scores_block<1>(A + r * lda, lda, Bt, Dp, C + r * 64); break;
    default: break;
  }
}

// R rows x NV vectors of C (columns already offset).
template <int R, int NV>
inline void accumulate_block(const float* P, int n, const float* B, int Dp, float* C, const float* alpha) {
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha ? alpha[r] : 1.f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      c[r][v] = _mm512_loadu_ps(C + int64_t(r) * Dp + v * 16);
      if (alpha) c[r][v] = _mm512_mul_ps(c[r][v], a);
    }
  }
  for (int j = 0; j < n; ++j) {
    const float* b = B + int64_t(j) * Dp;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(P[r * 64 + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(p, bv[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + int64_t(r) * Dp + v * 16, c[r][v]);
}

template <int NV>
void accumulate_cols(const float* P, int rows, int n, const float* B, int Dp, float* C, const float* alpha) {
  int r = 0;
  for (; r + 6 <= rows; r += 6)
    accumulate_block<6, NV>(P + r * 64, n, B, Dp, C + int64_t(r) * Dp, alpha ? alpha + r : nullptr);
  const float* Pr = P + r * 64;
  float* Cr = C + int64_t(r) * Dp;
  const float* ar = alpha ? alpha + r : nullptr;
  switch (rows - r) {
    case 5: accumulate_block<5, NV>(Pr, n, B, Dp, Cr, ar); break;
    case 4: accumulate_block<4, NV>(Pr, n, B, Dp, Cr, ar); break;
    case 3: accumulate_block<3, NV>(Pr, n, B, Dp, Cr, ar); break;
    case 2: accumulate_block<2, NV>(Pr, n, B, Dp, Cr, ar); break;
    case 1: accumulate_block<1, NV>(Pr, n, B, Dp, Cr, ar); break;
    default: break;
  }
}

void accumulate_avx512(const float* P, int rows, int n, const float* B, int Dp, float* C, const float* alpha) {
  for (int c0 = 0; c0 < Dp; c0 += 64) {
    switch ((Dp - c0) >= 64 ? 4 : (Dp - c0) / 16) {
      case 4: accumulate_cols<4>(P, rows, n, B + c0, Dp, C + c0, alpha); break;
      case 3: accumulate_cols<3>(P, rows, n, B + c0, Dp, C + c0, alpha); break;
      case 2: accumulate_cols<2>(P, rows, n, B + c0, Dp, C + c0, alpha); break;
      case 1: accumulate_cols<1>(P, rows, n, B + c0, Dp, C + c0, alpha); break;
      default: break;
    }
  }
}

float row_max_avx512(const float* s, int n) {
  __m512 m = _mm512_set1_ps(-__builtin_inff());
  for (int j = 0; j < n; j += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), tail_mask(n - j), s + j));
  return _mm512_reduce_max_ps(m);
}

float exp_shift_avx512(float* s, int n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), sh));
    _mm512_mask_storeu_ps(s + j, k, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(sum);
}

void exp_shift_vec_avx512(float* s, int n, const float* shift) {
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), _mm512_maskz_loadu_ps(k, shift + j));
    _mm512_mask_storeu_ps(s + j, k, exp512(x));
  }
}

}  // namespace

const TileKernels kAvx512TileKernels{"avx512", scores_avx512, accumulate_avx512, row_max_avx512, exp_shift_avx512,
                                     exp_shift_vec_avx512};

}  // namespace ksa::cpu::detail
#endif  // KSA_CPU_AVX512_TU
