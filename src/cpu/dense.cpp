// Dense CPU operations (see ksa/dense.hpp).
#include "ksa/dense.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <mutex>
#include <string_view>
#include <vector>

#include "cpu/dense_kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "ksa/error.hpp"
#ifdef KSA_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace ksa::cpu {
namespace {

// Rows [r0, r1) of W [N, K] (f32, bf16, or q8_0 rows of K/32 blocks) as fp32.
void widen_rows(const void* W, DType wdt, int64_t K, int64_t r0, int64_t r1, float* out) {
  if (wdt == DType::q8_0) {
    const int64_t row_bytes = K / kQ8Block * kQ8BlockBytes;
    dequantize_q8_0(static_cast<const std::byte*>(W) + r0 * row_bytes, (r1 - r0) * K, out);
  } else if (wdt == DType::bf16) {
    detail::widen_bf16_row(static_cast<const uint16_t*>(W) + r0 * K, (r1 - r0) * K, out);
  } else {
    std::copy(static_cast<const float*>(W) + r0 * K, static_cast<const float*>(W) + r1 * K, out);
  }
}

}  // namespace

namespace detail {
const float* f16_to_f32_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = f16::to_float(uint16_t(h));
    return t;
  }();
  return table.data();
}

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

namespace {

// A thread's slab of weight rows in a matrix-vector product: long enough that the hardware prefetcher
// streams it. Slabs of 64 rows of 512 bytes (the lm head of a model with hidden size 256) ran at 25 GB/s
// against 52 GB/s for rows of 5 KB (2-vCPU EPYC, 2 threads).
constexpr int64_t kGemvSlabBytes = int64_t(256) << 10;

// Rows per slab: at least 64 and kGemvSlabBytes, at most N / (4 threads) (each thread gets a few slabs).
int64_t gemv_grain(int64_t row_bytes, int64_t N, int nt) {
  return std::max<int64_t>(64, std::min(kGemvSlabBytes / std::max<int64_t>(1, row_bytes), N / (4 * int64_t(nt))));
}

// W is f32, bf16 or q8_0 (the q8_0 products of fewer than 12 rows take linear_q8_0's own path).
void linear_impl(const float* x, int64_t M, int64_t K, const void* W, DType wdt, int64_t N, float* y, int threads,
                 bool batch_invariant) {
  if (M == 0) return;
  const int nt = detail::resolve_threads(threads);
  // bf16 weights (any M) and Q8_0 weights (here: M >= 12) on a CPU with bf16 dot products: x rounded to bf16
  // once, then every output one accumulator of gemm_bf16_dot_rows over all of K, so its bits do not depend
  // on M, the blocking or the threads (a row's product is the same in a prompt and in decode).
  // Short rows in a product of a few rows: the fp32 matrix-vector kernel, whose x fits L1 anyway and which
  // has no per-row lane reduction to amortise: the small model's lm head (K = 256) streamed at 61-64 GB/s
  // with it against 55-59 with the bf16 kernel, and the small model decoded 8-15% slower with the latter.
  constexpr int64_t kBf16GemvMinK = 1024;
  const bool few_rows = M < 12 || batch_invariant;
  if ((wdt == DType::bf16 || wdt == DType::q8_0) && K % 2 == 0 && bf16_products() &&
      !(wdt == DType::bf16 && few_rows && K < kBf16GemvMinK)) {
    thread_local std::vector<uint16_t> xb_buf;  // the calling thread's (the workers see it through xb)
    xb_buf.resize(static_cast<size_t>(M * K));
    uint16_t* const xb = xb_buf.data();
    detail::parallel_chunks(nt, M, std::max<int64_t>(1, (int64_t(1) << 16) / K), [&](int64_t m0, int64_t m1, int) {
      detail::round_to_bf16(x + m0 * K, (m1 - m0) * K, xb + m0 * K);
    });
    const auto* Wb = static_cast<const uint16_t*>(W);
    if (wdt == DType::bf16 && few_rows) {
      // A few rows: slabs of W rows as in the matrix-vector path below, all M rows of x per slab. With x in
      // bf16 a long row of it stays in L1 beside the weight streams (K = 9,728: 19 KB against 38 KB in fp32):
      // the 4B shape's down projection at M = 1 streamed at 50-58 GB/s against 31-38 for the fp32 kernel.
      // (Rows shorter than kBf16GemvMinK take the fp32 kernel below: see there.)
      detail::parallel_chunks(nt, N, gemv_grain(dtype_bytes(wdt, K), N, nt), [&](int64_t n0, int64_t n1, int) {
        detail::gemm_bf16_dot_rows(xb, M, K, Wb, n0, n1, y, N);
      });
      return;
    }
    // Rows of W in blocks that stay in the L2 cache (~384 KiB) while every row group of x passes them; Q8_0
    // blocks dequantised and rounded to bf16 into the worker's buffer first.
    const int64_t rows = std::max<int64_t>(5, (int64_t(384) << 10) / (2 * K) / 5 * 5);
    struct Scratch {
      std::vector<float> f32;
      std::vector<uint16_t> b16;
    };
    detail::PerWorker<Scratch> bufs(nt);
    detail::parallel_for(nt, (N + rows - 1) / rows, 1, [&](int64_t bi, int worker) {
      const int64_t n0 = bi * rows, n1 = std::min(N, n0 + rows);
      if (wdt == DType::bf16) return detail::gemm_bf16_dot_rows(xb, M, K, Wb, n0, n1, y, N);
      Scratch& sc = bufs.get(worker);
      sc.f32.resize(static_cast<size_t>(rows * K));
      sc.b16.resize(static_cast<size_t>(rows * K));
      widen_rows(W, wdt, K, n0, n1, sc.f32.data());
      detail::round_to_bf16(sc.f32.data(), (n1 - n0) * K, sc.b16.data());
      detail::gemm_bf16_dot_rows(xb, M, K, sc.b16.data(), 0, n1 - n0, y + n0, N);
    });
    return;
  }
  if (M <= 4) {
    // Rows of W in contiguous slabs of at least 64 rows and kGemvSlabBytes, claimed by the threads as they
    // come free (at least 4 slabs per thread); all M vectors per row read.
    detail::parallel_chunks(nt, N, gemv_grain(dtype_bytes(wdt, K), N, nt), [&](int64_t n0, int64_t n1, int) {
      detail::gemv_rows(W, wdt, n0, n1, K, x, M, y + n0, N);
    });
    return;
  }
  // A few rows: the matrix-vector kernel over groups of 4 rows reads W once per group, which beats widening
  // W for sgemm below about 12 rows (measured 2026-11-29, 2-vCPU EPYC, K=2560, N=9728 bf16: M=8 5.6 vs
  // 7.2 ms, M=12 8.1 vs 7.7 ms).
  // batch_invariant: always (a row's result then does not depend on M).
  if (M < 12 || batch_invariant) {
    for (int64_t m = 0; m < M; m += 4)
      linear_impl(x + m * K, std::min<int64_t>(4, M - m), K, W, wdt, N, y + m * N, threads, false);
    return;
  }
  // Weight rows widened at a time (at most 256 x K fp32): N / 16 rounded up to 16, so that up to 8 threads
  // get two blocks each. The block depends on N alone: OpenBLAS rounds an element differently for other
  // block widths, and the output must not depend on the thread count (tests/cli: greedy text equal at -t 1
  // and -t 2).
  const int64_t block = std::clamp<int64_t>(((N + 15) / 16 + 15) / 16 * 16, 16, 256);
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
      std::vector<float>& wbuf = bufs.get(worker, static_cast<size_t>(block * K));
      const int64_t n0 = bi * block, nb = std::min(block, N - n0);
      widen_rows(W, wdt, K, n0, n0 + nb, wbuf.data());
#ifdef KSA_HAVE_OPENBLAS
      // y[:, n0:n0+nb] = x . wbuf^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(nb), int(K), 1.f, x, int(K), wbuf.data(), int(K),
                  0.f, y + n0, int(N));
#else
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < nb; ++n)
          y[m * N + n0 + n] = detail::dot_row_portable(wbuf.data(), DType::f32, n, K, x + m * K);
#endif
    });
  }
}

}  // namespace

namespace {
std::atomic<bool> g_bf16_products{true};
}

bool bf16_products() {
  if (!g_bf16_products.load(std::memory_order_relaxed) || !detail::bf16_dot_supported()) return false;
  // Off where the SIMD target was restricted below AVX-512 (set_simd_target), to time or check such a machine.
  return std::string_view(simd_target()).starts_with("AVX3");
}

void set_bf16_products(bool on) { g_bf16_products.store(on, std::memory_order_relaxed); }

void linear(const float* x, int64_t M, int64_t K, const void* W, DType wdt, int64_t N, float* y, int threads,
            bool batch_invariant) {
  if (M < 0 || K < 1 || N < 1) fail("linear: bad shape M=", M, " K=", K, " N=", N);
  if (wdt == DType::f16) fail("linear: weights must be f32, bf16 or q8_0 (got f16)");
  if (wdt == DType::q8_0) return linear_q8_0(x, M, K, W, N, y, threads, batch_invariant);
  linear_impl(x, M, K, W, wdt, N, y, threads, batch_invariant);
}

void linear_q8_0(const float* x, int64_t M, int64_t K, const void* W, int64_t N, float* y, int threads,
                 bool batch_invariant) {
  if (M < 0 || K < 1 || N < 1) fail("linear_q8_0: bad shape M=", M, " K=", K, " N=", N);
  if (K % kQ8Block) fail("linear_q8_0: K must be a multiple of ", kQ8Block, " (got ", K, ")");
  if (M == 0) return;
  if (M >= 12 && !batch_invariant) return linear_impl(x, M, K, W, DType::q8_0, N, y, threads, false);
  // The matrix-vector path: x rounded to 8 bits per block of 32 once for the whole product, then integer dot
  // products with each weight row, groups of up to 4 rows of x per pass over W, rows of W in chunks of 64
  // claimed by the threads as in linear_impl.
  // The quants from a 64-byte boundary: the AVX512_VNNI kernel loads them 64 bytes (two blocks) at a time.
  // The kernel's tables derived from the quants (detail::Q8Activations) are made here too, once per product,
  // and read by every thread's slabs.
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> xd;
  thread_local detail::Q8Activations xa_buf;
  detail::Q8Activations& xa = xa_buf;  // the calling thread's (inside the workers' lambda `xa_buf` is theirs)
  xq_buf.resize(size_t(M * K + 63));
  xd.resize(size_t(M * K / kQ8Block));
  int8_t* const xq = xq_buf.data() + (-reinterpret_cast<uintptr_t>(xq_buf.data()) & 63);
  detail::quantize_x_q8_0(x, M * K, xq, xd.data());
  xa.M = M, xa.K = K, xa.q = xq, xa.d = xd.data();
  detail::prepare_q8_0_x(xa);
  const int nt = detail::resolve_threads(threads);
  const int64_t grain = gemv_grain(dtype_bytes(DType::q8_0, K), N, nt);
  for (int64_t m = 0; m < M; m += 4) {
    const int64_t g = std::min<int64_t>(4, M - m);
    detail::parallel_chunks(nt, N, grain, [&](int64_t n0, int64_t n1, int) {
      detail::gemv_q8_0_rows(W, n0, n1, xa, m, g, y + m * N + n0, N);
    });
  }
}

void quantize_q8_0(const float* x, int64_t n, void* out) {
  if (n % kQ8Block) fail("quantize_q8_0: length must be a multiple of ", kQ8Block, " (got ", n, ")");
  auto* o = static_cast<unsigned char*>(out);
  for (int64_t b = 0; b < n / kQ8Block; ++b, o += kQ8BlockBytes) {
    const float* v = x + b * kQ8Block;
    float amax = 0.f;
    for (int i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::abs(v[i]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    const uint16_t h = f16::from_float(d);
    o[0] = uint8_t(h & 0xff);
    o[1] = uint8_t(h >> 8);
    for (int i = 0; i < kQ8Block; ++i) {
      const int q = int(std::lround(v[i] * inv));
      o[2 + i] = uint8_t(int8_t(std::clamp(q, -127, 127)));
    }
  }
}

void dequantize_q8_0(const void* in, int64_t n, float* out) {
  if (n % kQ8Block) fail("dequantize_q8_0: length must be a multiple of ", kQ8Block, " (got ", n, ")");
  detail::dequantize_q8_0_simd(in, n, out);
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

void silu_mul(float* gate, const float* up, int64_t n) { detail::silu_mul_simd(gate, up, n); }

}  // namespace ksa::cpu
