// Products with bf16 weights through the CPU's bf16 dot-product instruction (AVX512_BF16's vdpbf16ps: 32
// bf16 pairs multiplied and summed into 16 fp32 lanes, twice the multiply-adds of an fp32 FMA per
// instruction). See dense_kernels.hpp.
//
// Why intrinsics here and not Highway: Debian 12's Highway (1.0.3) has no target that emits vdpbf16ps (its
// bf16 dot products widen to fp32 and FMA, which is what the sgemm path already does at the fp32 rate). This
// file is the one exception to the one-Highway-source-per-kernel rule: a single kernel, compiled through
// per-function target attributes (no global -m flags) and run only where the CPU reports AVX512_BF16.
#include "cpu/dense_kernels.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "ksa/dtype.hpp"
#include "ksa/error.hpp"

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 10)
#define KSA_BF16_DOT_X86 1
// GCC 12's AVX-512 headers start some intrinsics (reductions, narrowing stores) from an "undefined" register
// and then warn that it is uninitialised; the lanes it leaves are never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace ksa::cpu::detail {

#ifdef KSA_BF16_DOT_X86
#define KSA_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

// The micro-kernel: MR rows of x against NR rows of W, each a dot product over all of K in one accumulator
// register (16 lanes, each summing the pairs at k = 32 i + 2 lane, +1), reduced across lanes at the end. The
// sums of one output therefore do not depend on MR, NR, the blocking or the thread that computes it.
template <int MR, int NR>
KSA_TARGET_BF16 void micro(const uint16_t* x, int64_t K, const uint16_t* w, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_loadu_si512(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  if (k < K) {  // the last K % 32 (even: K is a multiple of 2 here), zeros beyond
    const __mmask32 mk = _cvtu32_mask32((uint32_t(1) << (K - k)) - 1u);
    __m512i wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_epi16(mk, w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mk, x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

constexpr int kMR = 4, kNR = 5;  // 20 accumulators + 4 x + 5 W registers of the 32

using MicroFn = void (*)(const uint16_t*, int64_t, const uint16_t*, float*, int64_t);

template <int MR, int... NR>
constexpr auto micro_row(std::integer_sequence<int, NR...>) {
  return std::array<MicroFn, sizeof...(NR)>{&micro<MR, NR + 1>...};
}
template <int... MR>
constexpr auto micro_table(std::integer_sequence<int, MR...>) {
  return std::array<std::array<MicroFn, kNR>, sizeof...(MR)>{micro_row<MR + 1>(std::make_integer_sequence<int, kNR>())...};
}
// kMicro[mr - 1][nr - 1]
constexpr auto kMicro = micro_table(std::make_integer_sequence<int, kMR>());

// x to bf16 as bf16::from_float does (nearest, ties to even; a NaN stays a quiet NaN; subnormals kept).
KSA_TARGET_BF16 void round_to_bf16_avx512(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), inf = _mm512_set1_epi32(0x7f800000),
                abs_mask = _mm512_set1_epi32(0x7fffffff), quiet = _mm512_set1_epi32(0x40);
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(x + i));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs_mask), inf);
    const __m512i v = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(v));
  }
  for (; i < n; ++i) out[i] = bf16::from_float(x[i]);
}

}  // namespace

bool bf16_dot_supported() {
  static const bool ok = avx512_base_supported() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

void gemm_bf16_dot_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W, int64_t n0, int64_t n1, float* y,
                        int64_t ldy) {
  // One vector (decode): one row of W at a time, so that the rows stream as one sequential run instead of
  // kNR interleaved short ones (the prefetchers ramp up per stream; a row of the 4B shape is 5 KB). 4B-shaped
  // bf16 decode, 2 threads, 2-vCPU EPYC Zen 4, alternated: 5.10 / 5.78 / 4.24 / 4.80 / 5.88 tok/s against
  // 3.97 / 4.80 / 4.17 / 3.89 / 4.36 with kNR rows. The sums are the same (one accumulator per output).
  const int64_t nr_max = M == 1 ? 1 : kNR;
  for (int64_t m = 0; m < M; m += kMR) {
    const int mr = int(std::min<int64_t>(kMR, M - m));
    for (int64_t n = n0; n < n1; n += nr_max) {
      const int nr = int(std::min<int64_t>(nr_max, n1 - n));
      kMicro[mr - 1][nr - 1](x + m * K, K, W + n * K, y + m * ldy + n, ldy);
    }
  }
}

#else  // no x86 AVX512_BF16 code in this build

bool bf16_dot_supported() { return false; }

void gemm_bf16_dot_rows(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t) {
  fail("gemm_bf16_dot_rows: this build has no bf16 dot-product kernel");
}

#endif

void round_to_bf16(const float* x, int64_t n, uint16_t* out) {
#ifdef KSA_BF16_DOT_X86
  if (bf16_dot_supported()) return round_to_bf16_avx512(x, n, out);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = bf16::from_float(x[i]);
}

}  // namespace ksa::cpu::detail
