// The tile primitives of the CPU prefill kernels and the row primitives of the CPU decode as a table of
// function pointers, one table per SIMD target (tile_kernels_hwy.cpp, compiled by Highway once per target).
#pragma once
#include <cstdint>

namespace ksa::cpu::detail {

// Tile sizes: query rows per work item and key rows per key tile. The backward's transposed panels are BQ
// wide, so the score primitive always produces 64-wide rows.
inline constexpr int BQ = 64, BK = 64;

// All matrices are fp32 and row-major; Dp (padded head dim) is a multiple of 16.
struct TileKernels {
  const char* name;  // the Highway target
  // C[r*64 + j] = sum_{d<Dp} A[r*lda + d] * Bt[d*64 + j], for r < rows (<= 64), j < 64.
  void (*scores)(const float* A, int64_t lda, int rows, const float* Bt, int Dp, float* C);
  // C[r*Dp + c] = alpha[r] * C[r*Dp + c] + sum_{j<n} P[r*64 + j] * B[j*Dp + c], r < rows; alpha null = 1.
  void (*accumulate)(const float* P, int rows, int n, const float* B, int Dp, float* C, const float* alpha);
  // Max of s[0..n).
  float (*row_max)(const float* s, int n);
  // s[j] = exp(s[j] - shift) for j < n (exp(-inf) = 0); returns their sum.
  float (*exp_shift)(float* s, int n, float shift);
  // s[j] = exp(s[j] - shift[j]) for j < n.
  void (*exp_shift_vec)(float* s, int n, const float* shift);
  // The decode's value rows (any n): y[0..n) += w * x.
  void (*axpy)(float w, const float* x, float* y, int64_t n);
  // The decode's scores of a run of n keys k [n, D] for the G query heads q [G, D] of their group (any D):
  // s[g * lds + i] = sum_d q[g * D + d] * k[i * D + d]. Each key row is read once for up to 4 heads.
  void (*group_scores)(const float* q, int64_t G, const float* k, int64_t n, int64_t D, float* s, int64_t lds);
};

// The table of the SIMD target chosen at run time (simd.hpp); its name is the target's (AVX2, AVX3, ...).
const TileKernels& tile_kernels();

}  // namespace ksa::cpu::detail
