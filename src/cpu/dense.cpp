// Dense CPU operations (see ksa/dense.hpp).
#include "ksa/dense.hpp"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "cpu/dense_kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "ksa/error.hpp"
#ifdef KSA_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace ksa::cpu {
namespace {

void widen_rows(const void* W, DType wdt, int64_t K, int64_t r0, int64_t r1, float* out) {
  if (wdt == DType::f32) {
    std::copy(static_cast<const float*>(W) + r0 * K, static_cast<const float*>(W) + r1 * K, out);
    return;
  }
  if (wdt == DType::bf16) {
    detail::widen_bf16_row(static_cast<const uint16_t*>(W) + r0 * K, (r1 - r0) * K, out);
    return;
  }
  for (int64_t i = r0 * K; i < r1 * K; ++i) out[i - r0 * K] = load_as_float(wdt, W, i);
}

}  // namespace

namespace detail {
// Portable dot products of one weight row with an fp32 vector (the SIMD kernels are in dense_hwy.cpp).
float dot_row_portable(const void* W, DType wdt, int64_t row, int64_t K, const float* x) {
  float acc[8] = {};
  if (wdt == DType::bf16) {
    const uint16_t* w = static_cast<const uint16_t*>(W) + row * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      for (int j = 0; j < 8; ++j) acc[j] += bf16::to_float(w[k + j]) * x[k + j];
    for (; k < K; ++k) acc[0] += bf16::to_float(w[k]) * x[k];
  } else {
    const float* w = static_cast<const float*>(W) + row * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      for (int j = 0; j < 8; ++j) acc[j] += w[k + j] * x[k + j];
    for (; k < K; ++k) acc[0] += w[k] * x[k];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
}  // namespace detail

void linear(const float* x, int64_t M, int64_t K, const void* W, DType wdt, int64_t N, float* y, int threads) {
  if (M < 0 || K < 1 || N < 1) fail("linear: bad shape M=", M, " K=", K, " N=", N);
  if (wdt == DType::f16) fail("linear: weights must be f32 or bf16 (got f16)");
  if (M == 0) return;
  const int nt = detail::resolve_threads(threads);
  if (M <= 4) {
    // Rows of W in chunks of 64 (contiguous slabs), claimed by the threads as they come free; all M vectors
    // per row read.
    detail::parallel_chunks(nt, N, 64, [&](int64_t n0, int64_t n1, int) {
      detail::gemv_rows(W, wdt, n0, n1, K, x, M, y + n0, N);
    });
    return;
  }
  // A few rows: the matrix-vector kernel over groups of 4 rows reads W once per group, which beats widening
  // W for sgemm below about 12 rows (measured 2026-11-29, 2-vCPU EPYC, K=2560, N=9728 bf16: M=8 5.6 vs
  // 7.2 ms, M=12 8.1 vs 7.7 ms).
  if (M < 12) {
    for (int64_t m = 0; m < M; m += 4) linear(x + m * K, std::min<int64_t>(4, M - m), K, W, wdt, N, y + m * N, threads);
    return;
  }
  // Weight rows widened at a time (at most 256 x K fp32), so that every thread gets blocks.
  const int64_t per = (N + 2 * nt - 1) / (2 * nt);
  const int64_t block = std::clamp<int64_t>((per + 15) / 16 * 16, 16, 256);
#ifdef KSA_HAVE_OPENBLAS
  // Each OpenMP thread widens its blocks and multiplies them with a single-threaded sgemm: OpenBLAS's own
  // thread pool (Debian's pthread build ignores OpenMP) would otherwise run next to ours and fight it.
  static std::once_flag single;
  std::call_once(single, [] { openblas_set_num_threads(1); });
#endif
  // One std::vector<float> of block * K per worker that gets a block.
  detail::PerWorker<std::vector<float>> bufs(nt);
  {
    detail::parallel_for(nt, (N + block - 1) / block, 1, [&](int64_t bi, int worker) {
      std::vector<float>& wf = bufs.get(worker, static_cast<size_t>(block * K));
      const int64_t n0 = bi * block, nb = std::min(block, N - n0);
      widen_rows(W, wdt, K, n0, n0 + nb, wf.data());
#ifdef KSA_HAVE_OPENBLAS
      // y[:, n0:n0+nb] = x . wf^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(nb), int(K), 1.f, x, int(K), wf.data(), int(K),
                  0.f, y + n0, int(N));
#else
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < nb; ++n) y[m * N + n0 + n] = detail::dot_row_portable(wf.data(), DType::f32, n, K, x + m * K);
#endif
    });
  }
}

void rms_norm(float* x, int64_t rows, int64_t n, const void* w, DType wdt, float eps) {
  if (wdt == DType::f32 || wdt == DType::bf16) {
    for (int64_t r = 0; r < rows; ++r) detail::rms_norm_simd(x + r * n, n, w, wdt, eps);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * n;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(v[i]) * v[i];
    const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] * inv * load_as_float(wdt, w, i);
  }
}

void rope(float* x, int64_t H, int64_t D, int64_t position, double theta) {
  if (D % 2) fail("rope: head dim must be even (got ", D, ")");
  const int64_t half = D / 2;
  thread_local std::vector<float> cs;
  cs.resize(size_t(D));
  for (int64_t i = 0; i < half; ++i) {
    // fp32 like the reference: inv_freq = 1 / theta^(2i/D) and the angle product in fp32.
    const float inv_freq = 1.f / std::pow(float(theta), float(2 * i) / float(D));
    const float angle = float(position) * inv_freq;
    cs[size_t(i)] = float(std::cos(double(angle)));
    cs[size_t(half + i)] = float(std::sin(double(angle)));
  }
  for (int64_t h = 0; h < H; ++h) detail::rope_rotate_simd(x + h * D, half, cs.data(), cs.data() + half);
}

void silu_mul(float* gate, const float* up, int64_t n) {
  detail::silu_mul_simd(gate, up, n);
}

}  // namespace ksa::cpu
