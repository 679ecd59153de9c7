// Dense CPU operations of the Qwen3-KSA forward (docs/ksa.md: The model): linear layers over bf16/f32 weights,
// RMSNorm, RoPE (HF rotate_half) and the SwiGLU gate. Activations are fp32; weights stay in their file
// dtype. The model layer calls these; they know nothing of the model.
#pragma once
#include <cstdint>
#include <string_view>

#include "ksa/dtype.hpp"

namespace ksa::cpu {

// y[M, N] = x[M, K] . W^T with W [N, K] row-major (the HF/PyTorch Linear layout), W in f32 or bf16 (read
// in place, never widened as a whole; q8_0 goes to linear_q8_0). x rows are contiguous with stride K, y rows with
// stride N. bf16 weights on a CPU with bf16 dot products: see bf16_products(). Otherwise: M == 1..4: a threaded
// SIMD matrix-vector kernel streams W once (up to 11 rows: once per group of 4, faster here than widening W);
// larger M: W widened in row blocks, one block per worker thread at a time, each multiplied
// through a single-threaded OpenBLAS sgemm when built with it (the first such call sets OpenBLAS to one
// thread, since its own pthread pool would compete with ours).
// batch_invariant: every M runs the matrix-vector kernel (groups of up to 4 rows per pass over W), so a row's
// result does not depend on the other rows of x: the same bits whatever M (a server's step is then the same
// for a sequence under any load); slower for large M, since W is read once per 4 rows.
// The result never depends on `threads`.
void linear(const float* x, int64_t M, int64_t K, const void* W, DType wdt, int64_t N, float* y, int threads = 0,
            bool batch_invariant = false);

// 8-bit weights, llama.cpp's Q8_0 block layout (docs/quantization.md): a row of K weights (K a multiple of 32)
// is K/32 blocks of 34 bytes, each the block's scale d as IEEE fp16 (little-endian) then its 32 quants q as
// int8; weight = d * q. Quantizing: d = max|x| / 127, q = round(x / d) (all zero when the block is).
inline constexpr int64_t kQ8Block = kQ8_0Block, kQ8BlockBytes = kQ8_0BlockBytes;  // ksa/dtype.hpp
// n floats (a multiple of 32) into n / 32 blocks at out, and back.
void quantize_q8_0(const float* x, int64_t n, void* out);
void dequantize_q8_0(const void* in, int64_t n, float* out);
// linear with W [N, K] in Q8_0 (N rows of K/32 blocks), read in place. M <= 11: x is rounded to 8 bits per
// block of 32 (d_x = max|x| / 127 in fp32, q_x = x / d_x to the nearest integer, ties to even), then a SIMD
// matrix-vector kernel takes each block's integer dot product and adds it times d_w * d_x in fp32. This adds
// |x - d_x q_x| <= d_x (1/2 + 2^-17) per activation, i.e. at most sum over blocks of d_x (1/2 + 2^-17) sum |w|
// per output (docs/quantization.md); a NaN or infinity in a row of x makes that row's outputs NaN. M >= 12:
// blocks of rows dequantised for sgemm (as linear does for bf16), x not rounded; where bf16_products(), the
// dequantised blocks rounded to bf16 and multiplied with x rounded to bf16 instead; with batch_invariant,
// every M as M <= 11 (see linear).
void linear_q8_0(const float* x, int64_t M, int64_t K, const void* W, int64_t N, float* y, int threads = 0,
                 bool batch_invariant = false);

// In place: x[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for `rows` rows of `n` (w in f32 or bf16).
void rms_norm(float* x, int64_t rows, int64_t n, const void* w, DType wdt, float eps);

// RoPE, HF "rotate_half" form, in place on x [H, D] (heads contiguous, stride D) at `position`:
// x[i] <- x[i] cos - x[i + D/2] sin, x[i + D/2] <- x[i + D/2] cos + x[i] sin, angle = position * theta^(-2i/D)
// computed in fp32 like the reference implementation (inv_freq and the product in fp32).
void rope(float* x, int64_t H, int64_t D, int64_t position, double theta);

// In place: gate[i] = silu(gate[i]) * up[i] over n elements.
void silu_mul(float* gate, const float* up, int64_t n);

// Products with bf16 weights (and Q8_0 weights of 12 or more rows, see linear_q8_0) on a CPU with AVX512_BF16
// (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later): x is rounded to bf16 (nearest, ties
// to even) and multiplied with the weights in place by the CPU's bf16 dot-product instruction, with fp32 sums
// (twice the multiply-adds of the fp32 path per instruction; what llama.cpp does with bf16 weights). Every
// output is one accumulator over all of K whatever M, so with K >= 1024 a row's result is the same bits in a
// product of any number of rows (batch_invariant then changes nothing for such weights); products of fewer
// than 12 rows with K < 1024 keep the fp32 matrix-vector kernel (faster on such short rows). Elsewhere, or
// when turned off, the fp32 paths above run and x keeps fp32. bf16_products() tells whether this path runs: on by default where
// the CPU has the instructions, off when set_bf16_products(false) or when set_simd_target restricted the
// kernels below AVX-512 (`ksa` maps $KSA_CPU_BF16_DOT=0 onto the former). Not thread-safe with kernels running.
bool bf16_products();
void set_bf16_products(bool on);

// The SIMD target the CPU kernels run on (Google Highway's name: AVX2, AVX3 = AVX-512, SSE4, NEON, SVE, ...,
// EMU128 = portable C++): the best one this CPU supports unless set_simd_target chose another.
const char* simd_target();
// Restricts the CPU kernels to one SIMD target of this build and CPU ("AVX2", "AVX3", ...; "portable" = the
// lowest compiled in; "" or "auto" = the best again), to time or check a target on a machine that has a
// better one. Throws ksa::Error naming the available targets. Not thread-safe with kernels running. (`ksa`
// maps $KSA_CPU_PRIMITIVES onto it.)
void set_simd_target(std::string_view name);

}  // namespace ksa::cpu
