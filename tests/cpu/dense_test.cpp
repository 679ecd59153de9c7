// Dense ops of the model forward against double-precision loops.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cpu/dense_kernels.hpp"
#include "cpu/simd.hpp"
#include "ksa/dense.hpp"
#include "ksa/error.hpp"
#include "simd_targets.hpp"

namespace ksa::cpu {
namespace {

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = bf16::from_float(v[i]);
  return o;
}

// Error bound: fp32 accumulation over K products of unit-normal values: |err| <= K * 2^-23 * sum|w x|,
// far below 1e-3 relative for these K; we check 2e-5 * sqrt(K) * rms scale (a generous constant).
void check_LinearMatchesDouble() {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t M : {1, 2, 4, 5, 11, 12, 37})
    for (int64_t K : {1, 31, 64, 161, 34, 290})
      for (DType wdt : {DType::f32, DType::bf16}) {
        // Products with bf16 weights on a CPU with bf16 dot products round x to bf16 first.
        // (Products of fewer than 12 rows with K < 1024 keep the fp32 kernel.)
        const bool x_bf16 = wdt == DType::bf16 && K % 2 == 0 && bf16_products() && (M >= 12 || K >= 1024);
        const int64_t N = 67;
        std::vector<float> x(static_cast<size_t>(M * K)), w(static_cast<size_t>(N * K)),
            y(static_cast<size_t>(M * N), NAN);
        for (auto& v : x) v = nd(rng);
        for (auto& v : w) v = wdt == DType::bf16 ? round_to(DType::bf16, nd(rng)) : nd(rng);
        const auto wb = to_bf16(w);
        const void* W = wdt == DType::bf16 ? static_cast<const void*>(wb.data()) : w.data();
        linear(x.data(), M, K, W, wdt, N, y.data(), 2);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double ref = 0, mag = 0;
            for (int64_t k = 0; k < K; ++k) {
              const float xv = x_bf16 ? round_to(DType::bf16, x[size_t(m * K + k)]) : x[size_t(m * K + k)];
              ref += double(xv) * w[size_t(n * K + k)];
              mag += std::abs(double(xv) * w[size_t(n * K + k)]);
            }
            ASSERT_NEAR(y[size_t(m * N + n)], ref, 1e-6 * mag + 1e-6)
                << "M=" << M << " K=" << K << " " << dtype_name(wdt) << " at " << m << "," << n;
          }
        // The dispatched row kernel equals the portable one within rounding.
        const auto fast = detail::dot_row_kernel();
        for (int64_t n = 0; n < N; ++n)
          EXPECT_NEAR(fast(W, wdt, n, K, x.data()), detail::dot_row_portable(W, wdt, n, K, x.data()),
                      1e-4 * std::sqrt(double(K)));
      }
  std::vector<float> x(4), y(4);
  EXPECT_THROW(linear(x.data(), 1, 0, x.data(), DType::f32, 1, y.data()), Error);
}

void check_RmsNorm() {
  std::mt19937_64 rng(6);
  std::normal_distribution<float> nd(0.f, 2.f);
  const int64_t rows = 3, n = 350;
  std::vector<float> x(static_cast<size_t>(rows * n)), w(static_cast<size_t>(n));
  for (auto& v : x) v = nd(rng);
  for (auto& v : w) v = nd(rng);
  auto y = x;
  rms_norm(y.data(), rows, n, w.data(), DType::f32, 1e-6f);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[size_t(r * n + i)]) * x[size_t(r * n + i)];
    const double inv = 1 / std::sqrt(ss / n + 1e-6);
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(y[size_t(r * n + i)], x[size_t(r * n + i)] * inv * w[size_t(i)], 1e-5);
  }
}

void check_RopeRotatesPairs() {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const int64_t D : {16, 128, 36}) {
    const int64_t H = 3;
    std::vector<float> x(static_cast<size_t>(H * D));
    for (auto& v : x) v = nd(rng);
    auto y = x;
    rope(y.data(), H, D, 0, 1e6);
    EXPECT_EQ(y, x);  // position 0: identity
    for (int64_t pos : {1, 7, 131071}) {
      std::copy(x.begin(), x.end(), y.begin());
      rope(y.data(), H, D, pos, 1e6);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          const double ang = double(float(pos) * (1.f / std::pow(1e6f, float(2 * i) / float(D))));
          const double a = x[size_t(h * D + i)], b = x[size_t(h * D + i + D / 2)];
          EXPECT_NEAR(y[size_t(h * D + i)], a * std::cos(ang) - b * std::sin(ang), 1e-5);
          EXPECT_NEAR(y[size_t(h * D + i + D / 2)], b * std::cos(ang) + a * std::sin(ang), 1e-5);
        }
    }
  }
}

void check_SiluMul() {
  std::vector<float> g = {-3.f, -0.5f, 0.f, 0.7f, 4.f}, u = {1.f, 2.f, 3.f, -1.f, 0.5f};
  // Then 75 more (whole vectors and a tail on every target), from -100 to 100.
  std::mt19937_64 rng(8);
  std::uniform_real_distribution<float> ud(-100.f, 100.f);
  for (int i = 0; i < 75; ++i) g.push_back(i < 40 ? ud(rng) / 10 : ud(rng)), u.push_back(ud(rng) / 50);
  auto out = g;
  silu_mul(out.data(), u.data(), int64_t(g.size()));
  for (size_t i = 0; i < g.size(); ++i) {
    const double ref = g[i] / (1 + std::exp(-double(g[i]))) * u[i];
    EXPECT_NEAR(out[i], ref, 1e-6 * std::max(1.0, std::abs(ref))) << "g=" << g[i] << " u=" << u[i];
  }
}

// A product's result never depends on the thread count, and with batch_invariant a row's result does not
// depend on the other rows (every M takes the matrix-vector kernel): bitwise, bf16 and q8_0 weights, M across
// the sgemm threshold (12).
TEST(Dense, LinearBitsDoNotDependOnThreadsOrOtherRows) {
  std::mt19937_64 rng(9);
  std::normal_distribution<float> nd(0.f, 1.f);
  // (M, K, N): the tiny test model's shapes (where OpenBLAS once rounded 16- and 32-row blocks differently)
  // and a larger one.
  for (const std::array<int64_t, 3>& shape :
       std::vector<std::array<int64_t, 3>>{{15, 64, 64}, {20, 64, 192}, {37, 128, 300}}) {
    const int64_t M = shape[0], K = shape[1], N = shape[2];  // (clang 14: lambdas cannot capture structured bindings)
    SCOPED_TRACE("M=" + std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N));
    std::vector<float> x(size_t(M * K)), w(size_t(N * K));
    for (auto& v : x) v = nd(rng);
    for (auto& v : w) v = round_to(DType::bf16, nd(rng));
    const auto wb = to_bf16(w);
    std::vector<uint8_t> wq(size_t(N * (K / kQ8Block) * kQ8BlockBytes));
    quantize_q8_0(w.data(), N * K, wq.data());
    auto run = [&](bool q8, int64_t rows, int threads, bool invariant) {
      std::vector<float> y(size_t(rows * N), NAN);
      if (q8) linear_q8_0(x.data(), rows, K, wq.data(), N, y.data(), threads, invariant);
      else linear(x.data(), rows, K, wb.data(), DType::bf16, N, y.data(), threads, invariant);
      return y;
    };
    for (bool q8 : {false, true}) {
      SCOPED_TRACE(q8 ? "q8_0" : "bf16");
      for (bool invariant : {false, true})
        for (int t : {2, 3}) EXPECT_EQ(run(q8, M, 1, invariant), run(q8, M, t, invariant)) << t << " threads";
      const std::vector<float> all = run(q8, M, 2, true);
      for (int64_t rows : {1, 4, 13}) {
        const std::vector<float> part = run(q8, rows, 2, true);
        EXPECT_TRUE(std::equal(part.begin(), part.end(), all.begin())) << rows << " rows";
      }
    }
  }
}

// x rounded to bf16 by the vector code exactly as bf16::from_float does: ties, NaN, infinities, subnormals,
// and a tail shorter than a vector.
TEST(Dense, RoundToBf16MatchesScalar) {
  std::vector<float> x = {0.f, -0.f, 1.f, -1.f, INFINITY, -INFINITY, NAN, -NAN, 1e-40f, -3e-39f, 3.4e38f, -3.4e38f};
  for (uint32_t u : {0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x7f7fffffu, 0x7f800001u, 0xff800001u, 0x0000ffffu})
    x.push_back(std::bit_cast<float>(u));  // ties to even either way, the largest finite, signalling NaNs
  std::mt19937_64 rng(11);
  for (int i = 0; i < 1000; ++i) x.push_back(std::bit_cast<float>(uint32_t(rng())));
  std::vector<uint16_t> out(x.size());
  detail::round_to_bf16(x.data(), int64_t(x.size()), out.data());
  for (size_t i = 0; i < x.size(); ++i)
    ASSERT_EQ(out[i], bf16::from_float(x[i])) << "bits " << std::hex << std::bit_cast<uint32_t>(x[i]);
}

// The bf16 dot-product path against the fp32 one on a shape of the 4B model's attention output product
// (K = 4096 in whole vectors; N not a multiple of the kernel's 5 rows, M not of its 4), and
// set_bf16_products(false) going back to fp32 x.
TEST(Dense, Bf16ProductsRoundXOnce) {
  if (!detail::bf16_dot_supported())
    GTEST_SKIP() << "this CPU has no AVX512_BF16 (the bf16 dot-product path is not used here)";
  std::mt19937_64 rng(12);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const int64_t M : {23, 1, 5}) {
  SCOPED_TRACE("M=" + std::to_string(M));
  const int64_t K = 4096, N = 131;
  std::vector<float> x(size_t(M * K)), w(size_t(N * K)), y(size_t(M * N)), y32(size_t(M * N));
  for (auto& v : x) v = nd(rng);
  for (auto& v : w) v = round_to(DType::bf16, nd(rng));
  const auto wb = to_bf16(w);
  ASSERT_TRUE(bf16_products());
  linear(x.data(), M, K, wb.data(), DType::bf16, N, y.data(), 2);
  set_bf16_products(false);
  EXPECT_FALSE(bf16_products());
  linear(x.data(), M, K, wb.data(), DType::bf16, N, y32.data(), 2);
  set_bf16_products(true);
  double worst_bf16 = 0, worst_f32 = 0, worst_x = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double r_bf = 0, r_32 = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double wv = w[size_t(n * K + k)], xv = x[size_t(m * K + k)];
        r_bf += double(round_to(DType::bf16, float(xv))) * wv;
        r_32 += xv * wv;
        mag += std::abs(xv * wv);
      }
      const size_t i = size_t(m * N + n);
      worst_bf16 = std::max(worst_bf16, std::abs(y[i] - r_bf) / mag);
      worst_f32 = std::max(worst_f32, std::abs(y32[i] - r_32) / mag);
      worst_x = std::max(worst_x, std::abs(y[i] - r_32) / mag);
    }
  // fp32 sums of exact products: a few ulps of the magnitude; rounding x to bf16 moves each product by at most
  // 2^-9 of itself, so the result within 2^-9 of the magnitude of the fp32-x product, and in practice far less.
  EXPECT_LT(worst_bf16, 1e-6);
  EXPECT_LT(worst_f32, 1e-6);
  EXPECT_LT(worst_x, 1.0 / 512);
  EXPECT_GT(worst_x, 1e-6) << "x was not rounded: the bf16 path did not run";
  }
}

// With bf16 products and rows of K >= 1024 a row's result is the same bits in a product of any number of rows
// (one accumulator per output whatever M): decode and prompt agree.
TEST(Dense, Bf16ProductsRowBitsDoNotDependOnM) {
  if (!bf16_products()) GTEST_SKIP() << "this CPU has no AVX512_BF16 (the bf16 dot-product path is not used here)";
  std::mt19937_64 rng(13);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t M = 29, K = 9728, N = 37;
  std::vector<float> x(size_t(M * K)), w(size_t(N * K));
  for (auto& v : x) v = nd(rng);
  for (auto& v : w) v = round_to(DType::bf16, nd(rng));
  const auto wb = to_bf16(w);
  std::vector<float> all(size_t(M * N));
  linear(x.data(), M, K, wb.data(), DType::bf16, N, all.data(), 2);
  for (int64_t rows : {1, 3, 4, 11, 12}) {
    std::vector<float> part(size_t(rows * N));
    linear(x.data(), rows, K, wb.data(), DType::bf16, N, part.data(), 2);
    EXPECT_TRUE(std::equal(part.begin(), part.end(), all.begin())) << rows << " rows";
  }
}

TEST(Dense, LinearMatchesDouble) { check_LinearMatchesDouble(); }
TEST(Dense, RmsNorm) { check_RmsNorm(); }
TEST(Dense, RopeRotatesPairs) { check_RopeRotatesPairs(); }
TEST(Dense, SiluMul) { check_SiluMul(); }

// The same checks on every SIMD target compiled in that this CPU runs.
TEST(Dense, EveryTarget) {
  test::on_every_simd_target([] {
    check_LinearMatchesDouble();
    check_RmsNorm();
    check_RopeRotatesPairs();
    check_SiluMul();
  });
}

}  // namespace
}  // namespace ksa::cpu
