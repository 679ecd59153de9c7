// The dense kernels' inner loops (dense_kernels.hpp), one Highway source compiled for every target Highway
// offers and chosen at run time (simd.cpp): the matrix-vector product over bf16/f32 weight rows, the bf16
// widening for the sgemm path, the same two over Q8_0 blocks (the product in integers, with the activations
// rounded to 8 bits per block), RMSNorm, the RoPE rotation and the SwiGLU gate.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/dense_hwy.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/dense_kernels.hpp"
#include "cpu/simd-inl.hpp"
#include "cpu/simd.hpp"
#include "ksa/error.hpp"

HWY_BEFORE_NAMESPACE();
namespace ksa::cpu::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::CappedTag<float, 16>;

// N weights at w (bf16 bits) as fp32: a bf16 is the top half of an fp32.
HWY_INLINE hn::Vec<DF> load_bf16(DF d, const uint16_t* HWY_RESTRICT w) {
  const hn::RebindToUnsigned<DF> du32;
  const hn::Rebind<uint16_t, DF> du16;
  return hn::BitCast(d, hn::ShiftLeft<16>(hn::PromoteTo(du32, hn::LoadU(du16, w))));
}
template <class T>
HWY_INLINE hn::Vec<DF> load_w(DF d, const T* HWY_RESTRICT w) {
  if constexpr (sizeof(T) == 2) return load_bf16(d, w);
  else return hn::LoadU(d, w);
}
inline float scalar_w(const uint16_t* w, int64_t k) { return bf16::to_float(w[k]); }
inline float scalar_w(const float* w, int64_t k) { return w[k]; }

// y[m * ldy + n - n0] = W[n, :] . x[m, :] for m < M, n in [n0, n1): each weight row read once for all M
// vectors, two accumulators per vector.
template <int M, class T>
void gemv_t(const T* HWY_RESTRICT W, int64_t n0, int64_t n1, int64_t K, const float* HWY_RESTRICT x, float* y,
            int64_t ldy) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    hn::Vec<DF> a0[M], a1[M];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = hn::Zero(d);
    int64_t k = 0;
    for (; k + 2 * N <= K; k += 2 * N) {
      const auto w0 = load_w(d, w + k), w1 = load_w(d, w + k + N);
      HWY_UNROLL(4)
      for (int m = 0; m < M; ++m) {
        a0[m] = hn::MulAdd(w0, hn::LoadU(d, x + m * K + k), a0[m]);
        a1[m] = hn::MulAdd(w1, hn::LoadU(d, x + m * K + k + N), a1[m]);
      }
    }
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) {
      float s = hn::GetLane(hn::SumOfLanes(d, hn::Add(a0[m], a1[m])));
      for (int64_t kk = k; kk < K; ++kk) s += scalar_w(w, kk) * x[m * K + kk];
      y[m * ldy + (n - n0)] = s;
    }
  }
}

void gemv(const void* W, DType wdt, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
          int64_t ldy) {
  auto run = [&](auto* w) {
    switch (M) {
      case 1:
        gemv_t<1>(w, n0, n1, K, x, y, ldy);
        break;
      case 2:
        gemv_t<2>(w, n0, n1, K, x, y, ldy);
        break;
      case 3:
        gemv_t<3>(w, n0, n1, K, x, y, ldy);
        break;
      default:
        gemv_t<4>(w, n0, n1, K, x, y, ldy);
        break;
    }
  };
  if (wdt == DType::bf16) run(static_cast<const uint16_t*>(W));
  else run(static_cast<const float*>(W));
}

void widen_bf16(const uint16_t* HWY_RESTRICT w, int64_t count, float* HWY_RESTRICT out) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= count; i += N) hn::StoreU(load_bf16(d, w + i), d, out + i);
  for (; i < count; ++i) out[i] = bf16::to_float(w[i]);
}

// x[0:n) = x / sqrt(mean(x^2) + eps) * w.
template <class T>
void rms_norm_t(float* HWY_RESTRICT x, int64_t n, const T* HWY_RESTRICT w, float eps) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto a = hn::LoadU(d, x + i), b = hn::LoadU(d, x + i + N);
    s0 = hn::MulAdd(a, a, s0);
    s1 = hn::MulAdd(b, b, s1);
  }
  double ss = double(hn::GetLane(hn::SumOfLanes(d, hn::Add(s0, s1))));
  for (int64_t j = i; j < n; ++j) ss += double(x[j]) * x[j];
  const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
  const auto vinv = hn::Set(d, inv);
  i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(d, x + i), vinv), load_w(d, w + i)), d, x + i);
  for (; i < n; ++i) x[i] = x[i] * inv * scalar_w(w, i);
}

void rms_norm_row(float* x, int64_t n, const void* w, DType wdt, float eps) {
  if (wdt == DType::bf16) rms_norm_t(x, n, static_cast<const uint16_t*>(w), eps);
  else rms_norm_t(x, n, static_cast<const float*>(w), eps);
}

// One head: v[i], v[i + half] rotated by (cos[i], sin[i]) for i < half.
void rope_rotate(float* HWY_RESTRICT v, int64_t half, const float* HWY_RESTRICT c, const float* HWY_RESTRICT s) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= half; i += N) {
    const auto a = hn::LoadU(d, v + i), b = hn::LoadU(d, v + i + half);
    const auto vc = hn::LoadU(d, c + i), vs = hn::LoadU(d, s + i);
    hn::StoreU(hn::NegMulAdd(b, vs, hn::Mul(a, vc)), d, v + i);
    hn::StoreU(hn::MulAdd(a, vs, hn::Mul(b, vc)), d, v + i + half);
  }
  for (; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i] + a * s[i];
  }
}

// gate = gate * sigmoid(gate) * up.
void silu_mul(float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto one = hn::Set(d, 1.f);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto g = hn::LoadU(d, gate + i);
    const auto sig = hn::Div(one, hn::Add(one, simd_exp(d, hn::Neg(g))));
    hn::StoreU(hn::Mul(hn::Mul(g, sig), hn::LoadU(d, up + i)), d, gate + i);
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// The scale of a Q8_0 block (fp16 little-endian in its first two bytes): normal numbers by bit moves, the
// rest (zero, subnormal, inf, NaN) through the core's converter.
HWY_INLINE float q8_scale(const unsigned char* b) {
  const uint16_t h = uint16_t(b[0] | (b[1] << 8));
  const uint32_t e = (h >> 10) & 0x1fu;
  if (e == 0 || e == 31) return f16::to_float(h);
  const uint32_t u = (uint32_t(h & 0x8000u) << 16) | ((e + 112u) << 23) | (uint32_t(h & 0x3ffu) << 13);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// N int8 quants as floats.
HWY_INLINE hn::Vec<DF> load_q8(DF d, const unsigned char* q) {
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<int8_t, DF> d8;
  return hn::ConvertTo(d, hn::PromoteTo(di, hn::LoadU(d8, reinterpret_cast<const int8_t*>(q))));
}

// The activations of a Q8_0 product rounded to 8 bits per block of 32 (dense_kernels.hpp): d = max|x| / 127
// in fp32, q = x / d rounded to the nearest integer, ties to even (NearestInt on every target), kept as int8
// (|q| <= 127) for the integer products. A block holding a NaN or an infinity gets d = NaN (the sum of x * 0),
// so that the product's output is NaN as with fp32 activations; an all-zero block gets d = 0 and q = 0.
void quantize_x_q8(const float* HWY_RESTRICT x, int64_t n, int8_t* HWY_RESTRICT q, float* HWY_RESTRICT dx) {
  const DF d;
  const hn::Rebind<int8_t, DF> d8;
  const int N = int(hn::Lanes(d));
  const auto zero = hn::Zero(d), lo = hn::Set(d, -127.f), hi = hn::Set(d, 127.f);
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* v = x + b * 32;
    auto amax = zero, nan = zero;
    for (int j = 0; j < 32; j += N) {
      const auto a = hn::LoadU(d, v + j);
      amax = hn::Max(amax, hn::Abs(a));
      nan = hn::Add(nan, hn::Mul(a, zero));
    }
    const float scale = hn::GetLane(hn::MaxOfLanes(d, amax)) / 127.f;
    dx[b] = scale + hn::GetLane(hn::SumOfLanes(d, nan));
    const auto div = hn::Set(d, scale > 0.f ? scale : 1.f);
    for (int j = 0; j < 32; j += N) {
      const auto t = hn::Min(hn::Max(hn::Div(hn::LoadU(d, v + j), div), lo), hi);
      hn::StoreU(hn::DemoteTo(d8, hn::NearestInt(t)), d8, q + b * 32 + j);
    }
  }
}

// The row walk of the per-block Q8_0 kernels (gemv_q8_t, gemv_q8_avx2_t): per row of W, block b into
// accumulator a0 (b even) or a1 (b odd) of each row m of x (two multiply-add chains in flight), then
// y[m, n] = sum(a0[m] + a1[m]) by `lane_sum`.
template <int M, class V, class Block, class LaneSum>
HWY_INLINE void q8_rows(const unsigned char* HWY_RESTRICT W, int64_t n0, int64_t n1, int64_t nb, V zero, Block block,
                        LaneSum lane_sum, float* y, int64_t ldy) {
  const int64_t row_bytes = nb * 34;
  for (int64_t n = n0; n < n1; ++n) {
    const unsigned char* w = W + n * row_bytes;
    V a0[M], a1[M];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = zero;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      block(w + b * 34, b, a0);
      block(w + (b + 1) * 34, b + 1, a1);
    }
    if (b < nb) block(w + b * 34, b, a0);
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) y[m * ldy + (n - n0)] = lane_sum(a0[m], a1[m]);
  }
}

// As gemv_t over Q8_0 rows (K / 32 blocks of 34 bytes) with the activations rounded by quantize_x_q8 and
// widened to int16 (gemv_q8): per block, the M integer dot products of the 32 weight quants (widened to int16)
// with the 32 activation quants (pairs summed into int32 lanes: vpmaddwd on x86, vmlal_s16 on NEON; at most
// 32 * 128 * 127 in a lane, no overflow), then one fp32 multiply-add of the lanes by d_w * d_x into the
// accumulators. Two accumulators per vector (even and odd blocks) keep two multiply-add chains in flight; the
// weight scale comes from the fp16 table (f16_to_f32_table). The portable kernel: x86 with AVX2 or
// AVX512_VNNI takes gemv_q8_avx2_t or gemv_q8_vnni_t below.
template <int M>
void gemv_q8_t(const unsigned char* HWY_RESTRICT W, int64_t n0, int64_t n1, int64_t K, const int16_t* HWY_RESTRICT xq,
               const float* HWY_RESTRICT xd, float* y, int64_t ldy) {
  const float* HWY_RESTRICT f16 = f16_to_f32_table();
  const hn::CappedTag<int16_t, 32> d16;  // at most one block per vector
  const hn::RepartitionToWide<decltype(d16)> d32;
  const hn::RebindToFloat<decltype(d32)> df;
  const hn::Rebind<int8_t, decltype(d16)> d8;
  const int N = int(hn::Lanes(d16));
  const int64_t nb = K / 32;
  using VF = hn::Vec<decltype(df)>;
  // acc[m] += (the 32 products of block b) * d_w * d_x for each m.
  auto block = [&](const unsigned char* HWY_RESTRICT w, int64_t b, VF* HWY_RESTRICT acc) HWY_ATTR {
    hn::Vec<decltype(d32)> s0[M], s1[M];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) s0[m] = s1[m] = hn::Zero(d32);
    for (int j = 0; j < 32; j += N) {
      const auto q = hn::PromoteTo(d16, hn::LoadU(d8, reinterpret_cast<const int8_t*>(w + 2 + j)));
      HWY_UNROLL(4)
      for (int m = 0; m < M; ++m)
        s0[m] = hn::ReorderWidenMulAccumulate(d32, q, hn::LoadU(d16, xq + m * K + b * 32 + j), s0[m], s1[m]);
    }
    const float dw = f16[w[0] | (w[1] << 8)];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m)
      acc[m] = hn::MulAdd(hn::ConvertTo(df, hn::Add(s0[m], s1[m])), hn::Set(df, dw * xd[m * nb + b]), acc[m]);
  };
  q8_rows<M>(W, n0, n1, nb, hn::Zero(df), block,
             [&](VF a0, VF a1) HWY_ATTR { return hn::GetLane(hn::SumOfLanes(df, hn::Add(a0, a1))); }, y, ldy);
}

#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX2
// x86 kernels in intrinsics: Highway 1.0.3 (Debian's) has no int8 x int8 dot product (SumOfMulQuadAccumulate
// came later), and widening both operands to int16 as above costs more than the products. Both kernels read
// the activation quants as int8 (|q| <= 127, quantize_x_q8): products of int8 pairs are exact and the block
// sums are the same integers as in gemv_q8_t; only the fp32 steps after them differ (see each kernel).

// Horizontal sum of 8 floats: (lo + hi) halves, then pairs.
HWY_INLINE float q8_hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// AVX2: one block per 256-bit vector (AVX3 without VNNI keeps gemv_q8_t, whose vpmaddwd takes a block per
// 512-bit instruction). Sign trick: vpmaddubsw multiplies unsigned by signed bytes, so the weight quants enter
// as |w| (128 for -128, as unsigned) and the activations as x * sign(w) (vpsignb); a pair of products is at
// most 2 * 128 * 127 < 2^15 (no saturation), then vpmaddwd by ones sums pairs into 8 int32 lanes. Then as
// gemv_q8_t: the lanes converted to fp32 and multiply-added with d_w * d_x, two accumulators (even and odd
// blocks), the lanes summed at the end of the row (the lanes hold other partial sums than gemv_q8_t's, so the
// fp32 roundings differ). Measured on the 2-vCPU EPYC restricted to AVX2, 1 thread, rows in L2: 8-15% faster
// than gemv_q8_t there.
template <int M>
void gemv_q8_avx2_t(const unsigned char* HWY_RESTRICT W, int64_t n0, int64_t n1, int64_t K,
                    const int8_t* HWY_RESTRICT xq, const float* HWY_RESTRICT xd, float* y, int64_t ldy) {
  const float* HWY_RESTRICT f16 = f16_to_f32_table();
  const int64_t nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  auto block = [&](const unsigned char* HWY_RESTRICT w, int64_t b, __m256* HWY_RESTRICT acc) HWY_ATTR {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
    const __m256i aq = _mm256_abs_epi8(q);
    const float dw = f16[w[0] | (w[1] << 8)];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * 32));
      const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(x, q)), ones);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * xd[m * nb + b]), acc[m]);
    }
  };
  q8_rows<M>(W, n0, n1, nb, _mm256_setzero_ps(), block,
             [](__m256 a0, __m256 a1) HWY_ATTR { return q8_hsum256(_mm256_add_ps(a0, a1)); }, y, ldy);
}
#endif  // AVX3 || AVX2

#if HWY_TARGET == HWY_AVX3
// AVX512_VNNI (Ice Lake, Zen 4 and later): Highway 1.0.3's AVX3 target does not assume it, so the kernel is
// compiled for it by a function attribute and taken where the CPU reports it (q8_vnni_supported).
#ifndef KSA_Q8_VNNI_TARGET
#define KSA_Q8_VNNI_TARGET \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512cd,avx512vnni,avx2,avx,fma,f16c,bmi,bmi2")))
#define KSA_Q8_VNNI_INLINE KSA_Q8_VNNI_TARGET inline __attribute__((always_inline))
#endif

bool q8_vnni_supported() {
  static const bool ok = avx512_base_supported() && __builtin_cpu_supports("avx512vnni");
  return ok;
}

// Rows of fewer blocks take the portable kernel (gemv_q8): see there.
constexpr int64_t kQ8VnniMinBlocks = 8;
// The rows are read with software prefetches this far ahead (a prefetch past the matrix is harmless). Without
// them the kernel streamed the 4B shape's weights from the mmap'ed checkpoint (page cache) at 29-31 GB/s
// where gemv_q8_t reached 34-37, with them at 40-43 (one decode step's 253 products, M = 1, 2 threads,
// 2-vCPU EPYC; 8 KiB ahead was no better than 4).
constexpr int64_t kQ8PrefetchBytes = 4096;
// The blocks of a group of 16 in the order in which q8_fold3 leaves their sums in the lanes.
constexpr int kQ8Perm[16] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};

// Lane sums within 128-bit lanes: from a, b (4 int32 per 128-bit lane each), per 128-bit lane
// [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
KSA_Q8_VNNI_INLINE __m512i q8_fold1(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
// From q8_fold1(A, B) and q8_fold1(C, D): per 128-bit lane [sum A, sum B, sum C, sum D] over that lane.
KSA_Q8_VNNI_INLINE __m512i q8_fold2(__m512i ab, __m512i cd) {
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}
// Eight vectors P0..P7, Pj holding block 2j in its lanes 0-7 and block 2j+1 in lanes 8-15, folded by q8_fold2
// into r0 (P0..P3) and r1 (P4..P7): the 16 block sums, block kQ8Perm[i] in lane i.
KSA_Q8_VNNI_INLINE __m512i q8_fold3(__m512i r0, __m512i r1) {
  return _mm512_add_epi32(_mm512_shuffle_i32x4(r0, r1, 0x88), _mm512_shuffle_i32x4(r0, r1, 0xDD));
}
// The quants of the blocks j0 and j0 + 1 of a group at wg (two 32-byte loads), each + 128 as unsigned bytes;
// in a group of r < 16 blocks (kPartial) those from block r on are 128 (and their activations 0, q8_x_pair).
template <bool kPartial>
KSA_Q8_VNNI_INLINE __m512i q8_w_pair(const unsigned char* wg, int j0, int r) {
  const __m512i k80 = _mm512_set1_epi8(char(0x80));
  const auto* lo = reinterpret_cast<const __m256i*>(wg + j0 * 34 + 2);
  const auto* hi = reinterpret_cast<const __m256i*>(wg + j0 * 34 + 36);
  if (!kPartial || j0 + 2 <= r)
    return _mm512_xor_si512(
        _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(lo)), _mm256_loadu_si256(hi), 1), k80);
  if (j0 < r) return _mm512_xor_si512(_mm512_zextsi256_si512(_mm256_loadu_si256(lo)), k80);
  return k80;
}
// The activation quants of the blocks j0 and j0 + 1 of a group at xg; 0 from block r on (kPartial).
template <bool kPartial>
KSA_Q8_VNNI_INLINE __m512i q8_x_pair(const int8_t* xg, int j0, int r) {
  if (!kPartial || j0 + 2 <= r) return _mm512_loadu_si512(xg + j0 * 32);
  if (j0 < r) return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + j0 * 32)));
  return _mm512_setzero_si512();
}
// The 16 block sums of a group (lane i: block kQ8Perm[i]) from its eight pairs' vpdpbusd lanes, pair(j0) for
// the pairs that hold a block (j0 < r), zero vectors for the others.
template <bool kPartial, class Pair>
KSA_Q8_VNNI_INLINE __m512i q8_group_sums(int r, Pair pair) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i q[4];
  for (int i = 0; i < 4; ++i) {  // pairs 2i and 2i + 1: blocks 4i .. 4i + 3
    if (kPartial && 4 * i >= r) {
      q[i] = zero;
      continue;
    }
    const __m512i p0 = pair(4 * i), p1 = !kPartial || 4 * i + 2 < r ? pair(4 * i + 2) : zero;
    q[i] = q8_fold1(p0, p1);
  }
  return q8_fold3(q8_fold2(q[0], q[1]), q8_fold2(q[2], q[3]));
}

// Per product (prepare_q8): for every row m < M of x and group g of 16 blocks (the last one partial when K / 32
// is not a multiple of 16), c[(m * groups + g) * 16 + i] = 128 * (the sum of the activation quants of block
// kQ8Perm[i] of the group) and dp[...] its activation scale; 0 for the missing blocks of a partial group.
// gemv_q8_vnni_t subtracts c from the vpdpbusd sums of the weight quants + 128 and multiplies by dp.
KSA_Q8_VNNI_TARGET void q8_vnni_prepare(const int8_t* HWY_RESTRICT xq, const float* HWY_RESTRICT xd, int64_t M,
                                        int64_t K, int32_t* HWY_RESTRICT c, float* HWY_RESTRICT dp) {
  const int64_t nb = K / 32, ng = nb / 16;
  const int rt = int(nb - ng * 16);  // blocks in the last, partial group (0: none)
  const int64_t ngt = ng + (rt > 0);
  const __m512i zero = _mm512_setzero_si512(), ones = _mm512_set1_epi8(1);
  const __m512i perm = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ngt; ++g) {
      const int8_t* xg = xq + m * K + g * 512;
      const float* dg = xd + m * nb + g * 16;
      __m512i s;
      __m512 d;
      if (g < ng) {
        s = q8_group_sums<false>(16, [&](int j0) KSA_Q8_VNNI_TARGET {
          return _mm512_dpbusd_epi32(zero, ones, q8_x_pair<false>(xg, j0, 16));
        });
        d = _mm512_loadu_ps(dg);
      } else {
        s = q8_group_sums<true>(rt, [&](int j0) KSA_Q8_VNNI_TARGET {
          return _mm512_dpbusd_epi32(zero, ones, q8_x_pair<true>(xg, j0, rt));
        });
        d = _mm512_maskz_loadu_ps(__mmask16((1u << rt) - 1), dg);
      }
      _mm512_storeu_si512(c + (m * ngt + g) * 16, _mm512_slli_epi32(s, 7));
      _mm512_storeu_ps(dp + (m * ngt + g) * 16, _mm512_permutexvar_ps(perm, d));
    }
}

// Rows in groups of 16 blocks (544 bytes), the last one with the K / 32 mod 16 blocks left if any; per pair of
// blocks and row of x one vpdpbusd of the weight quants + 128 (unsigned; vpdpbusd multiplies unsigned by
// signed bytes) with the activation quants into 16 int32 lanes; the eight pairs' lanes folded into one vector
// of the 16 block sums (q8_fold1..3: integer adds, exact), less 128 * (the block's sum of activation quants),
// computed once per product (q8_vnni_prepare's c); every sum is then below 2^24 (32 * 128 * 127) in magnitude
// and exact in fp32. Per
// group and row of x: one conversion, one multiply by the 16 weight scales (fp16, converted by vcvtph2ps) and
// one fused multiply-add with the 16 activation scales into the row's accumulator (lane i: blocks kQ8Perm[i]
// of every group; the missing blocks of the last group add 0 * 0), whose lanes are summed at the end of the
// row. Against gemv_q8_t: the same exact block sums; per block fl(sum * d_w) then one rounding into a lane
// (there sum * fl(d_w * d_x)), chains of ceil(nb / 16) blocks per lane (there ceil(nb / 2)), the same lane sum.
// Measured (2-vCPU EPYC Zen 4, 2026-12-06): 1 thread, rows in L2, M = 1: 41-55 GB/s against gemv_q8_t's
// 28-40; the 4B shape's decode (tg64, 2 threads) 6.7-8.6 tok/s against 5.7-7.6 (issue #27).
template <int M>
KSA_Q8_VNNI_TARGET void gemv_q8_vnni_t(const unsigned char* HWY_RESTRICT W, int64_t n0, int64_t n1, int64_t K,
                                       const int8_t* HWY_RESTRICT xq, const int32_t* HWY_RESTRICT c,
                                       const float* HWY_RESTRICT dp, float* y, int64_t ldy) {
  const int64_t nb = K / 32, ng = nb / 16, row_bytes = nb * 34;
  const int rt = int(nb - ng * 16);  // blocks in the last, partial group (0: none)
  const int64_t ngt = ng + (rt > 0);
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[M];
  // acc[m] += the products of group g (r blocks, kPartial where r < 16) of row w with row m of x.
  auto group = [&](const unsigned char* HWY_RESTRICT w, int64_t g, int r, auto partial) KSA_Q8_VNNI_TARGET {
    constexpr bool kPartial = decltype(partial)::value;
    const unsigned char* HWY_RESTRICT wg = w + g * 16 * 34;
    for (int i = 0; i < 16 * 34; i += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wg + kQ8PrefetchBytes + i), _MM_HINT_T0);
    // The 16 fp16 scales in kQ8Perm order, four to a general-purpose register (a vector stored to memory
    // lane by lane and loaded back would wait for the stores to commit: a 16-block row ran at half speed).
    uint64_t h4[4];
    for (int i = 0; i < 4; ++i) {
      uint64_t v = 0;
      for (int k = 0; k < 4; ++k) {
        const int b = kQ8Perm[4 * i + k];
        if (kPartial && b >= r) continue;
        uint16_t t;
        std::memcpy(&t, wg + b * 34, 2);
        v |= uint64_t(t) << (16 * k);
      }
      h4[i] = v;
    }
    __m512i q[M][4];
    for (int i = 0; i < 4; ++i) {  // pairs 2i and 2i + 1: blocks 4i .. 4i + 3
      if (kPartial && 4 * i >= r) {
        HWY_UNROLL(4)
        for (int m = 0; m < M; ++m) q[m][i] = zero;
        continue;
      }
      const bool two = !kPartial || 4 * i + 2 < r;
      const __m512i wa = q8_w_pair<kPartial>(wg, 4 * i, r);
      const __m512i wb = two ? q8_w_pair<kPartial>(wg, 4 * i + 2, r) : zero;
      HWY_UNROLL(4)
      for (int m = 0; m < M; ++m) {
        const int8_t* xg = xq + m * K + g * 512;
        const __m512i pa = _mm512_dpbusd_epi32(zero, wa, q8_x_pair<kPartial>(xg, 4 * i, r));
        const __m512i pb = two ? _mm512_dpbusd_epi32(zero, wb, q8_x_pair<kPartial>(xg, 4 * i + 2, r)) : zero;
        q[m][i] = q8_fold1(pa, pb);
      }
    }
    const __m512 dw =
        _mm512_cvtph_ps(_mm256_setr_epi64x(int64_t(h4[0]), int64_t(h4[1]), int64_t(h4[2]), int64_t(h4[3])));
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) {
      const __m512i sum = q8_fold3(q8_fold2(q[m][0], q[m][1]), q8_fold2(q[m][2], q[m][3]));
      const __m512i s = _mm512_sub_epi32(sum, _mm512_loadu_si512(c + (m * ngt + g) * 16));
      acc[m] =
          _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), dw), _mm512_loadu_ps(dp + (m * ngt + g) * 16), acc[m]);
    }
  };
  for (int64_t n = n0; n < n1; ++n) {
    const unsigned char* HWY_RESTRICT w = W + n * row_bytes;
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) group(w, g, 16, std::false_type());
    if (rt > 0) group(w, ng, rt, std::true_type());
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) y[m * ldy + (n - n0)] = _mm512_reduce_add_ps(acc[m]);
  }
}
#endif  // AVX3

// Q8Activations::kernel: the kernel prepare_q8 prepared for.
constexpr int kQ8Portable = 0, kQ8Avx2 = 1, kQ8Vnni = 2;

void prepare_q8(Q8Activations& x) {
  const int64_t M = x.M, K = x.K;
  x.q16 = nullptr, x.c = nullptr, x.dp = nullptr;
#if HWY_TARGET == HWY_AVX3
  // Rows of fewer than kQ8VnniMinBlocks blocks take the portable kernel (gemv_q8).
  if (q8_vnni_supported() && K >= 32 * kQ8VnniMinBlocks) {
    const int64_t n = M * ((K / 32 + 15) / 16) * 16;
    x.c_buf.resize(size_t(n + 15));
    x.dp_buf.resize(size_t(n + 15));
    // From 64-byte boundaries (whole cache lines per load).
    int32_t* c = x.c_buf.data() + ((-reinterpret_cast<uintptr_t>(x.c_buf.data()) & 63) / 4);
    float* dp = x.dp_buf.data() + ((-reinterpret_cast<uintptr_t>(x.dp_buf.data()) & 63) / 4);
    q8_vnni_prepare(x.q, x.d, M, K, c, dp);
    x.c = c, x.dp = dp, x.kernel = kQ8Vnni;
    return;
  }
#elif HWY_TARGET == HWY_AVX2
  x.kernel = kQ8Avx2;  // reads q and d as they are
  return;
#endif
  // The portable kernel: q widened to int16 once per product, not once per row (nor per slab of rows).
  x.q16_buf.resize(size_t(M * K));
  int16_t* HWY_RESTRICT x16 = x.q16_buf.data();
  const hn::ScalableTag<int16_t> d16;
  const hn::Rebind<int8_t, decltype(d16)> d8;
  const int64_t N = int64_t(hn::Lanes(d16));
  int64_t i = 0;
  for (; i + N <= M * K; i += N) hn::StoreU(hn::PromoteTo(d16, hn::LoadU(d8, x.q + i)), d16, x16 + i);
  for (; i < M * K; ++i) x16[i] = x.q[i];
  x.q16 = x16, x.kernel = kQ8Portable;
}

void gemv_q8(const void* W, int64_t n0, int64_t n1, const Q8Activations& x, int64_t m0, int64_t M, float* y,
             int64_t ldy) {
  const auto* w = static_cast<const unsigned char*>(W);
  const int64_t K = x.K, nb = K / 32;
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX2
  auto with_m = [M](auto kernel) HWY_ATTR {
    switch (M) {
      case 1:
        return kernel(std::integral_constant<int, 1>());
      case 2:
        return kernel(std::integral_constant<int, 2>());
      case 3:
        return kernel(std::integral_constant<int, 3>());
      default:
        return kernel(std::integral_constant<int, 4>());
    }
  };
#if HWY_TARGET == HWY_AVX3
  // Rows of fewer than kQ8VnniMinBlocks blocks take the portable kernel below (its vpmaddwd takes a block per
  // 512-bit instruction, and the VNNI kernel's cost per row, a group's lane folds and the lane sum, is spread
  // over too few blocks): K = 64 ran at 24 GB/s there against 14 (1 thread, in cache); the small model's
  // K = 256 at 37 GB/s in the VNNI kernel against 34 at M = 1 (12 against 11 at M = 4).
  if (x.kernel == kQ8Vnni) {
    const int64_t t = m0 * ((nb + 15) / 16) * 16;  // row m0's tables
    return with_m([&](auto m) HWY_ATTR {
      gemv_q8_vnni_t<decltype(m)::value>(w, n0, n1, K, x.q + m0 * K, x.c + t, x.dp + t, y, ldy);
    });
  }
#else
  if (x.kernel == kQ8Avx2)
    return with_m([&](auto m) HWY_ATTR {
      gemv_q8_avx2_t<decltype(m)::value>(w, n0, n1, K, x.q + m0 * K, x.d + m0 * nb, y, ldy);
    });
#endif
#endif
  if (x.kernel != kQ8Portable || !x.q16) fail("gemv_q8_0_rows: activations prepared for another SIMD target");
  const int16_t* x16 = x.q16 + m0 * K;
  const float* xd = x.d + m0 * nb;
  switch (M) {
    case 1:
      gemv_q8_t<1>(w, n0, n1, K, x16, xd, y, ldy);
      break;
    case 2:
      gemv_q8_t<2>(w, n0, n1, K, x16, xd, y, ldy);
      break;
    case 3:
      gemv_q8_t<3>(w, n0, n1, K, x16, xd, y, ldy);
      break;
    default:
      gemv_q8_t<4>(w, n0, n1, K, x16, xd, y, ldy);
      break;
  }
}

void dequantize_q8(const void* in, int64_t n, float* HWY_RESTRICT out) {
  const DF d;
  const int N = int(hn::Lanes(d));
  const auto* w = static_cast<const unsigned char*>(in);
  for (int64_t b = 0; b < n / 32; ++b, w += 34) {
    const auto sc = hn::Set(d, q8_scale(w));
    for (int j = 0; j < 32; j += N) hn::StoreU(hn::Mul(sc, load_q8(d, w + 2 + j)), d, out + b * 32 + j);
  }
}

float dot_row(const void* W, DType wdt, int64_t row, int64_t K, const float* x) {
  float y = 0.f;
  gemv(W, wdt, row, row + 1, K, x, 1, &y, 0);
  return y;
}

}  // namespace HWY_NAMESPACE
}  // namespace ksa::cpu::detail
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace ksa::cpu::detail {
HWY_EXPORT(gemv);
HWY_EXPORT(widen_bf16);
HWY_EXPORT(rms_norm_row);
HWY_EXPORT(rope_rotate);
HWY_EXPORT(silu_mul);
HWY_EXPORT(dot_row);
HWY_EXPORT(gemv_q8);
HWY_EXPORT(prepare_q8);
HWY_EXPORT(dequantize_q8);
HWY_EXPORT(quantize_x_q8);

void prepare_q8_0_x(Q8Activations& x) { HWY_DYNAMIC_DISPATCH(prepare_q8)(x); }
void gemv_q8_0_rows(const void* W, int64_t n0, int64_t n1, const Q8Activations& x, int64_t m0, int64_t M, float* y,
                    int64_t ldy) {
  HWY_DYNAMIC_DISPATCH(gemv_q8)(W, n0, n1, x, m0, M, y, ldy);
}
void quantize_x_q8_0(const float* x, int64_t n, int8_t* q, float* d) {
  HWY_DYNAMIC_DISPATCH(quantize_x_q8)(x, n, q, d);
}
void dequantize_q8_0_simd(const void* in, int64_t n, float* out) { HWY_DYNAMIC_DISPATCH(dequantize_q8)(in, n, out); }

void gemv_rows(const void* W, DType wdt, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
               int64_t ldy) {
  HWY_DYNAMIC_DISPATCH(gemv)(W, wdt, n0, n1, K, x, M, y, ldy);
}
void widen_bf16_row(const uint16_t* w, int64_t count, float* out) { HWY_DYNAMIC_DISPATCH(widen_bf16)(w, count, out); }
void rms_norm_simd(float* x, int64_t n, const void* w, DType wdt, float eps) {
  HWY_DYNAMIC_DISPATCH(rms_norm_row)(x, n, w, wdt, eps);
}
void rope_rotate_simd(float* v, int64_t half, const float* c, const float* s) {
  HWY_DYNAMIC_DISPATCH(rope_rotate)(v, half, c, s);
}
void silu_mul_simd(float* gate, const float* up, int64_t n) { HWY_DYNAMIC_DISPATCH(silu_mul)(gate, up, n); }
DotRowFn dot_row_kernel() { return HWY_DYNAMIC_DISPATCH(dot_row); }
}  // namespace ksa::cpu::detail
#endif
