// Internal: the inner loops of ksa::cpu's dense operations (dense_hwy.cpp, one Highway source dispatched at run
// time to the best SIMD target, see simd.hpp).
#pragma once
#include <cstdint>
#include <vector>

#include "ksa/dtype.hpp"

namespace ksa::cpu::detail {

// y[m * ldy + (n - n0)] = W[n, :] . x[m, :] for m < M (1..4), n in [n0, n1); W [*, K] in f32 or bf16, x rows
// contiguous (stride K). Each weight row is read once for all M vectors.
void gemv_rows(const void* W, DType wdt, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
               int64_t ldy);
// n activations (a multiple of 32) rounded to 8 bits per block of 32 for the Q8_0 matrix-vector product:
// d[b] = max|x| / 127 over block b (fp32; NaN when the block holds a NaN or an infinity), q[i] = x[i] / d[b]
// rounded to the nearest integer, ties to even (|q| <= 127, stored as int8; 0 in an all-zero block).
void quantize_x_q8_0(const float* x, int64_t n, int8_t* q, float* d);
// Every fp16 bit pattern as fp32 (65536 floats, 256 KiB, built on first use): the portable and AVX2 Q8_0
// matrix-vector kernels read a block's scale with one table load instead of a dozen scalar bit operations,
// which otherwise cost more than the block's vector work (the AVX512_VNNI one converts 16 at once, vcvtph2ps).
const float* f16_to_f32_table();
// The activations of a Q8_0 matrix-vector product as the dispatched kernel reads them, prepared once per
// product by prepare_q8_0_x and then read by every thread's slabs of weight rows: quantize_x_q8_0's q (rows of
// K) and d (rows of K / 32), set by the caller, and what the kernel derives from them, filled in by
// prepare_q8_0_x (the AVX512_VNNI kernel: per group of 16 blocks, 128 x each block's sum of activation quants
// and the activation scales, both in its lane order; the portable kernel: q widened to int16; AVX2: nothing).
// The AVX512_VNNI kernel reads q 64 bytes at a time: fastest from a 64-byte boundary (linear_q8_0's buffer).
struct Q8Activations {
  int64_t M = 0, K = 0;
  const int8_t* q = nullptr;  // [M, K]
  const float* d = nullptr;   // [M, K / 32]
  // Filled by prepare_q8_0_x: the kernel it prepared for (gemv_q8_0_rows takes that one), its tables.
  int kernel = -1;
  const int16_t* q16 = nullptr;  // portable: [M, K]
  const int32_t* c = nullptr;    // AVX512_VNNI: [M, groups, 16], from a 64-byte boundary
  const float* dp = nullptr;     // AVX512_VNNI: [M, groups, 16], from a 64-byte boundary
  std::vector<int16_t> q16_buf;  // the tables' storage (reused from product to product)
  std::vector<int32_t> c_buf;
  std::vector<float> dp_buf;
};
void prepare_q8_0_x(Q8Activations& x);
// gemv_rows over Q8_0 rows (K a multiple of 32; ksa/dense.hpp) with rows [m0, m0 + M) of x (M <= 4), prepared:
// y = sum over blocks of d_w * d_x * (the integer dot product of the block's quants).
void gemv_q8_0_rows(const void* W, int64_t n0, int64_t n1, const Q8Activations& x, int64_t m0, int64_t M, float* y,
                    int64_t ldy);
// n weights (a multiple of 32) of Q8_0 blocks as fp32.
void dequantize_q8_0_simd(const void* in, int64_t n, float* out);
// out[i] = w[i] (bf16 bits) as fp32, i < count.
void widen_bf16_row(const uint16_t* w, int64_t count, float* out);
// One row: x[0:n) = x / sqrt(mean(x^2) + eps) * w (w f32 or bf16).
void rms_norm_simd(float* x, int64_t n, const void* w, DType wdt, float eps);
// One RoPE head: v[i], v[i + half] rotated by (c[i], s[i]).
void rope_rotate_simd(float* v, int64_t half, const float* c, const float* s);
// gate[i] = silu(gate[i]) * up[i].
void silu_mul_simd(float* gate, const float* up, int64_t n);

#if defined(__x86_64__) || defined(__i386__)
// Whether the CPU has AVX-512 F, BW, VL and DQ: the base of the kernels compiled for one more extension by a
// function attribute (bf16_dot_supported: AVX512_BF16; dense_hwy.cpp's q8_vnni_supported: AVX512_VNNI).
inline bool avx512_base_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}
#endif

// bf16 products (gemm_bf16.cpp): whether this CPU has AVX512_BF16 (and this build the kernel);
bool bf16_dot_supported();
// out[i] = bf16::from_float(x[i]) (nearest, ties to even; NaN kept quiet), i < n;
void round_to_bf16(const float* x, int64_t n, uint16_t* out);
// y[m * ldy + n] = sum_k x[m, k] W[n, k] for m < M, n in [n0, n1), x [M, K] and W [*, K] bf16 (K even), fp32
// sums by vdpbf16ps; each output is one register's 16 lanes of pair sums over k, then a lane reduction, so its
// bits do not depend on M, n0, n1 or the thread. Only where bf16_dot_supported().
void gemm_bf16_dot_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W, int64_t n0, int64_t n1, float* y,
                        int64_t ldy);

using DotRowFn = float (*)(const void* W, DType wdt, int64_t row, int64_t K, const float* x);
// Plain scalar loops (the tests' reference, and the sgemm fallback of builds without OpenBLAS).
float dot_row_portable(const void* W, DType wdt, int64_t row, int64_t K, const float* x);
// The dispatched one-row kernel (tests compare it with the portable one).
DotRowFn dot_row_kernel();

}  // namespace ksa::cpu::detail
