// The tile primitives of the CPU attention kernels (tile_kernels.hpp), one Highway source compiled for every
// target Highway offers on this architecture (x86: SCALAR, SSSE3, SSE4, AVX2, AVX3 = AVX-512; Arm: NEON,
// SVE, SVE2) and chosen at run time (simd.cpp).
//
// Vectors are capped at 16 floats (CappedTag), so the padded head dim (a multiple of 16) and the 64-wide tiles
// always hold a whole number of vectors, whatever the target's width (SVE included).
//
// Register blocking: both GEMM-like primitives keep an R x NV block of accumulator vectors (R <= 6 rows, NV
// vectors of columns), stream NV vectors of the B operand per step and broadcast one A element per row.
// Targets with 32 vector registers (AVX-512, NEON, SVE) take NV = 4 (24 accumulators); those with 16 (AVX2,
// SSE4) NV = 2 (12 accumulators + 2 B vectors + 1 broadcast: no spill).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/tile_kernels_hwy.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cmath>
#include <cstring>

#include "cpu/simd-inl.hpp"
#include "cpu/simd.hpp"
#include "cpu/tile_kernels.hpp"

HWY_BEFORE_NAMESPACE();
namespace ksa::cpu::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::CappedTag<float, 16>;

#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3
constexpr int kNV = 2;  // 16 vector registers
#else
constexpr int kNV = 4;  // 32 vector registers (or emulated)
#endif
constexpr int kR = 6;

// C[r, 0:NV*N) (row stride ldc) = (kLoadC ? alpha[r] * C : 0) + sum_{k<K} A[r*lda + k] * B[k*ldb + 0:NV*N).
template <int R, int NV, bool kLoadC>
HWY_INLINE void gemm_block(const float* HWY_RESTRICT A, int64_t lda, const float* HWY_RESTRICT B, int64_t ldb, int K,
                           float* HWY_RESTRICT C, int64_t ldc, const float* HWY_RESTRICT alpha) {
  const DF d;
  const size_t N = hn::Lanes(d);
  using V = hn::Vec<DF>;
  V c[R][NV];
  HWY_UNROLL(8)
  for (int r = 0; r < R; ++r) {
    if constexpr (kLoadC) {
      const V a = hn::Set(d, alpha ? alpha[r] : 1.f);
      HWY_UNROLL(4)
      for (int v = 0; v < NV; ++v) {
        c[r][v] = hn::LoadU(d, C + r * ldc + int64_t(v * N));
        if (alpha) c[r][v] = hn::Mul(c[r][v], a);
      }
    } else {
      HWY_UNROLL(4)
      for (int v = 0; v < NV; ++v) c[r][v] = hn::Zero(d);
    }
  }
  for (int k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    V bv[NV];
    HWY_UNROLL(4)
    for (int v = 0; v < NV; ++v) bv[v] = hn::LoadU(d, b + v * N);
    HWY_UNROLL(8)
    for (int r = 0; r < R; ++r) {
      const V a = hn::Set(d, A[r * lda + k]);
      HWY_UNROLL(4)
      for (int v = 0; v < NV; ++v) c[r][v] = hn::MulAdd(a, bv[v], c[r][v]);
    }
  }
  HWY_UNROLL(8)
  for (int r = 0; r < R; ++r) {
    HWY_UNROLL(4)
    for (int v = 0; v < NV; ++v) hn::StoreU(c[r][v], d, C + r * ldc + int64_t(v * N));
  }
}

// All `rows` rows (blocks of kR, then the remainder) for one column block of NV vectors.
template <int NV, bool kLoadC>
HWY_INLINE void gemm_cols(const float* A, int64_t lda, int rows, const float* B, int64_t ldb, int K, float* C,
                          int64_t ldc, const float* alpha) {
  int r = 0;
  for (; r + kR <= rows; r += kR)
    gemm_block<kR, NV, kLoadC>(A + r * lda, lda, B, ldb, K, C + r * ldc, ldc, alpha ? alpha + r : nullptr);
  const float* Ar = A + r * lda;
  float* Cr = C + r * ldc;
  const float* ar = alpha ? alpha + r : nullptr;
  switch (rows - r) {
    case 5:
      gemm_block<5, NV, kLoadC>(Ar, lda, B, ldb, K, Cr, ldc, ar);
      break;
    case 4:
      gemm_block<4, NV, kLoadC>(Ar, lda, B, ldb, K, Cr, ldc, ar);
      break;
    case 3:
      gemm_block<3, NV, kLoadC>(Ar, lda, B, ldb, K, Cr, ldc, ar);
      break;
    case 2:
      gemm_block<2, NV, kLoadC>(Ar, lda, B, ldb, K, Cr, ldc, ar);
      break;
    case 1:
      gemm_block<1, NV, kLoadC>(Ar, lda, B, ldb, K, Cr, ldc, ar);
      break;
    default:
      break;
  }
}

// C[rows, cols] (cols a multiple of the vector width) as above, column blocks of kNV vectors then the rest.
template <bool kLoadC>
HWY_INLINE void gemm(const float* A, int64_t lda, int rows, const float* B, int64_t ldb, int K, float* C, int64_t ldc,
                     int cols, const float* alpha) {
  const int N = int(hn::Lanes(DF()));
  int c0 = 0;
  for (; c0 + kNV * N <= cols; c0 += kNV * N) gemm_cols<kNV, kLoadC>(A, lda, rows, B + c0, ldb, K, C + c0, ldc, alpha);
  switch ((cols - c0) / N) {
    case 3:
      gemm_cols<3, kLoadC>(A, lda, rows, B + c0, ldb, K, C + c0, ldc, alpha);
      break;
    case 2:
      gemm_cols<2, kLoadC>(A, lda, rows, B + c0, ldb, K, C + c0, ldc, alpha);
      break;
    case 1:
      gemm_cols<1, kLoadC>(A, lda, rows, B + c0, ldb, K, C + c0, ldc, alpha);
      break;
    default:
      break;
  }
}

void scores(const float* A, int64_t lda, int rows, const float* Bt, int Dp, float* C) {
  gemm<false>(A, lda, rows, Bt, 64, Dp, C, 64, 64, nullptr);
}

void accumulate(const float* P, int rows, int n, const float* B, int Dp, float* C, const float* alpha) {
  gemm<true>(P, 64, rows, B, Dp, n, C, Dp, Dp, alpha);
}

float row_max(const float* s, int n) {
  const DF d;
  const int N = int(hn::Lanes(d));
  const auto ninf = hn::Set(d, -HUGE_VALF);
  auto m = ninf;
  int j = 0;
  for (; j + N <= n; j += N) m = hn::Max(m, hn::LoadU(d, s + j));
  if (j < n) {
    HWY_ALIGN float t[16];
    hn::Store(ninf, d, t);
    std::memcpy(t, s + j, size_t(n - j) * sizeof(float));
    m = hn::Max(m, hn::Load(d, t));
  }
  return hn::GetLane(hn::MaxOfLanes(d, m));
}

float exp_shift(float* s, int n, float shift) {
  const DF d;
  const int N = int(hn::Lanes(d));
  const auto sh = hn::Set(d, shift);
  auto sum = hn::Zero(d);
  int j = 0;
  for (; j + N <= n; j += N) {
    const auto e = simd_exp(d, hn::Sub(hn::LoadU(d, s + j), sh));
    hn::StoreU(e, d, s + j);
    sum = hn::Add(sum, e);
  }
  if (j < n) {  // the tail through a whole vector on the stack (some targets' masked loads read every lane)
    HWY_ALIGN float t[16];
    hn::Store(hn::Set(d, -HUGE_VALF), d, t);  // exp(-inf) = 0 in the unused lanes
    std::memcpy(t, s + j, size_t(n - j) * sizeof(float));
    const auto e = simd_exp(d, hn::Sub(hn::Load(d, t), sh));
    hn::Store(e, d, t);
    std::memcpy(s + j, t, size_t(n - j) * sizeof(float));
    sum = hn::Add(sum, e);
  }
  return hn::GetLane(hn::SumOfLanes(d, sum));
}

void exp_shift_vec(float* s, int n, const float* shift) {
  const DF d;
  const int N = int(hn::Lanes(d));
  int j = 0;
  for (; j + N <= n; j += N) hn::StoreU(simd_exp(d, hn::Sub(hn::LoadU(d, s + j), hn::LoadU(d, shift + j))), d, s + j);
  if (j < n) {
    HWY_ALIGN float t[16], u[16] = {};
    std::memcpy(t, s + j, size_t(n - j) * sizeof(float));
    std::memcpy(u, shift + j, size_t(n - j) * sizeof(float));
    hn::Store(simd_exp(d, hn::Sub(hn::Load(d, t), hn::Load(d, u))), d, t);
    std::memcpy(s + j, t, size_t(n - j) * sizeof(float));
  }
}

void axpy(float w, const float* x, float* y, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto vw = hn::Set(d, w);
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::MulAdd(vw, hn::LoadU(d, x + i), hn::LoadU(d, y + i)), d, y + i);
  for (; i < n; ++i) y[i] += w * x[i];
}

// Heads [g0, g0 + R) of group_scores against key row kr.
template <int R>
HWY_INLINE void group_scores_rows(const float* HWY_RESTRICT q, int64_t g0, const float* HWY_RESTRICT kr, int64_t D,
                                  float* HWY_RESTRICT s, int64_t lds, int64_t i) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  hn::Vec<DF> a[R];
  for (int r = 0; r < R; ++r) a[r] = hn::Zero(d);
  int64_t c = 0;
  for (; c + N <= D; c += N) {
    const auto kv = hn::LoadU(d, kr + c);
    for (int r = 0; r < R; ++r) a[r] = hn::MulAdd(hn::LoadU(d, q + (g0 + r) * D + c), kv, a[r]);
  }
  for (int r = 0; r < R; ++r) {
    float t = hn::GetLane(hn::SumOfLanes(d, a[r]));
    for (int64_t e = c; e < D; ++e) t += q[(g0 + r) * D + e] * kr[e];
    s[(g0 + r) * lds + i] = t;
  }
}

void group_scores(const float* q, int64_t G, const float* k, int64_t n, int64_t D, float* s, int64_t lds) {
  for (int64_t i = 0; i < n; ++i) {
    const float* kr = k + i * D;
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) group_scores_rows<4>(q, g, kr, D, s, lds, i);
    switch (G - g) {
      case 3: group_scores_rows<3>(q, g, kr, D, s, lds, i); break;
      case 2: group_scores_rows<2>(q, g, kr, D, s, lds, i); break;
      case 1: group_scores_rows<1>(q, g, kr, D, s, lds, i); break;
      default: break;
    }
  }
}

const TileKernels* GetTileKernels() {
  static const TileKernels k{hwy::TargetName(HWY_TARGET), scores, accumulate, row_max, exp_shift, exp_shift_vec,
                             axpy, group_scores};
  return &k;
}

}  // namespace HWY_NAMESPACE
}  // namespace ksa::cpu::detail
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace ksa::cpu::detail {
HWY_EXPORT(GetTileKernels);

const TileKernels& tile_kernels() { return *HWY_DYNAMIC_DISPATCH(GetTileKernels)(); }
}  // namespace ksa::cpu::detail
#endif
