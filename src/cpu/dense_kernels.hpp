// Internal: the inner loops of ksa::cpu's dense operations (dense_hwy.cpp, one Highway source dispatched at run
// time to the best SIMD target, see simd.hpp).
#pragma once
#include <cstdint>

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
// gemv_rows over Q8_0 rows (K a multiple of 32; ksa/dense.hpp) with x given as quantize_x_q8_0's q (rows of K)
// and d (rows of K / 32): y = sum over blocks of d_w * d_x * (the integer dot product of the block's quants).
// The AVX512_VNNI kernel reads q 64 bytes at a time: fastest from a 64-byte boundary (linear_q8_0's buffer).
void gemv_q8_0_rows(const void* W, int64_t n0, int64_t n1, int64_t K, const int8_t* xq, const float* xd, int64_t M,
                    float* y, int64_t ldy);
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
