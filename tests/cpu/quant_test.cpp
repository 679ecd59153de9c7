// Q8_0 weights (ksa/dense.hpp): the block layout byte by byte, the round-trip error bound, and linear_q8_0
// against double-precision products with the dequantised weights, on every SIMD target.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/simd.hpp"
#include "ksa/dense.hpp"
#include "ksa/error.hpp"

namespace ksa::cpu {
namespace {

std::vector<unsigned char> quantize(const std::vector<float>& x) {
  std::vector<unsigned char> q(x.size() / kQ8Block * kQ8BlockBytes);
  quantize_q8_0(x.data(), int64_t(x.size()), q.data());
  return q;
}

TEST(Q8_0, BlockLayout) {
  // One block: max |x| = 127 * 0.5, so d = 0.5 (exact in fp16: 0x3800) and q = x / 0.5.
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[size_t(i)] = float(i - 16) * 0.5f;
  x[31] = 63.5f;
  const auto q = quantize(x);
  ASSERT_EQ(q.size(), 34u);
  EXPECT_EQ(q[0], 0x00);  // fp16 0.5 = 0x3800, little-endian
  EXPECT_EQ(q[1], 0x38);
  for (int i = 0; i < 31; ++i) EXPECT_EQ(int8_t(q[size_t(2 + i)]), i - 16) << i;
  EXPECT_EQ(int8_t(q[33]), 127);
  std::vector<float> back(32);
  dequantize_q8_0(q.data(), 32, back.data());
  EXPECT_EQ(back, x);  // every value is a multiple of d here
}

TEST(Q8_0, ZeroBlockAndSigns) {
  std::vector<float> x(64, 0.f);
  for (int i = 32; i < 64; ++i) x[size_t(i)] = i % 2 ? -127.f : 127.f;  // d = 1, exact in fp16
  const auto q = quantize(x);
  for (int i = 0; i < 34; ++i) EXPECT_EQ(q[size_t(i)], 0) << "a zero block is all zero bytes";
  std::vector<float> back(64);
  dequantize_q8_0(q.data(), 64, back.data());
  for (int i = 0; i < 64; ++i) EXPECT_EQ(back[size_t(i)], x[size_t(i)]) << i;
}

// |x - deq(q(x))| <= d/2 (rounding to the nearest quant) + 127 |d - fp16(d)| (the stored scale), with
// d = max|x| / 127 of the block and |d - fp16(d)| <= max(2^-11 d, 2^-25) (half an ulp: relative for normal
// fp16, absolute 2^-25 below 2^-14, where the scales of blocks with max|x| < 0.0078 fall).
TEST(Q8_0, RoundTripErrorBound) {
  std::mt19937_64 rng(11);
  for (const float scale : {1e-3f, 0.02f, 1.f, 300.f}) {
    std::normal_distribution<float> nd(0.f, scale);
    std::vector<float> x(32 * 97);
    for (auto& v : x) v = nd(rng);
    const auto q = quantize(x);
    std::vector<float> back(x.size());
    dequantize_q8_0(q.data(), int64_t(x.size()), back.data());
    for (size_t b = 0; b < x.size() / 32; ++b) {
      float amax = 0.f;
      for (size_t i = 0; i < 32; ++i) amax = std::max(amax, std::abs(x[b * 32 + i]));
      const double d = amax / 127.0, bound = d / 2 + 127 * std::max(d * std::ldexp(1.0, -11), std::ldexp(1.0, -25)) + 1e-12;
      for (size_t i = 0; i < 32; ++i)
        ASSERT_LE(std::abs(double(back[b * 32 + i]) - x[b * 32 + i]), bound)
            << "scale " << scale << " block " << b << " element " << i;
    }
  }
}

TEST(Q8_0, RejectsLengthsThatAreNotWholeBlocks) {
  std::vector<float> x(40);
  std::vector<unsigned char> q(68);
  EXPECT_THROW(quantize_q8_0(x.data(), 40, q.data()), Error);
  EXPECT_THROW(dequantize_q8_0(q.data(), 40, x.data()), Error);
  std::vector<float> y(4);
  EXPECT_THROW(linear_q8_0(x.data(), 1, 40, q.data(), 1, y.data()), Error);
}

// linear_q8_0 = x . deq(W)^T within fp32 accumulation error, for the matrix-vector sizes (M <= 11) and the
// sgemm path (M >= 12).
void check_linear_q8_0() {
  std::mt19937_64 rng(12);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t M : {1, 2, 3, 4, 5, 12, 37})
    for (int64_t K : {32, 96, 2560}) {
      const int64_t N = 67;
      std::vector<float> x(size_t(M * K)), w(size_t(N * K)), y(size_t(M * N), NAN);
      for (auto& v : x) v = nd(rng);
      for (auto& v : w) v = nd(rng) * 0.05f;
      const auto q = quantize(w);
      std::vector<float> wd(w.size());
      dequantize_q8_0(q.data(), int64_t(w.size()), wd.data());
      linear_q8_0(x.data(), M, K, q.data(), N, y.data(), 2);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double ref = 0, mag = 0;
          for (int64_t k = 0; k < K; ++k) {
            ref += double(x[size_t(m * K + k)]) * wd[size_t(n * K + k)];
            mag += std::abs(double(x[size_t(m * K + k)]) * wd[size_t(n * K + k)]);
          }
          ASSERT_NEAR(y[size_t(m * N + n)], ref, 1e-6 * mag + 1e-6) << "M=" << M << " K=" << K << " at " << m << "," << n;
        }
    }
}

TEST(Q8_0, LinearMatchesDequantisedDouble) { check_linear_q8_0(); }

TEST(Q8_0, LinearEveryTarget) {
  for (const int64_t t : detail::simd_targets()) {
    detail::force_simd_target(t);
    SCOPED_TRACE(detail::simd_target_name(t));
    check_linear_q8_0();
  }
  detail::force_simd_target(0);
}

}  // namespace
}  // namespace ksa::cpu
