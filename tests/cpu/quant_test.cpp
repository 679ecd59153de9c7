// Q8_0 weights (ksa/dense.hpp): the block layout byte by byte, the round-trip error bound, and linear_q8_0
// against double-precision products with the dequantised weights (and, for M <= 11, with the activations
// rounded to 8 bits as the kernel does, and the bound that rounding adds) and exactly on integer data, on every
// SIMD target.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/simd.hpp"
#include "ksa/dense.hpp"
#include "ksa/error.hpp"
#include "simd_targets.hpp"

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
      const double d = amax / 127.0,
                   bound = d / 2 + 127 * std::max(d * std::ldexp(1.0, -11), std::ldexp(1.0, -25)) + 1e-12;
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

// The activations as linear_q8_0 rounds them for M <= 11 (ksa/dense.hpp): per block of 32, d = max|x| / 127
// in fp32 and q = x / d (fp32 division) rounded to the nearest integer, ties to even. xh = d * q in double.
struct RoundedX {
  std::vector<double> xh, d;  // [M * K], [M * K / 32]
};
RoundedX round_x(const std::vector<float>& x) {
  RoundedX r{std::vector<double>(x.size()), std::vector<double>(x.size() / 32)};
  for (size_t b = 0; b < x.size() / 32; ++b) {
    float amax = 0.f;
    for (size_t i = 0; i < 32; ++i) amax = std::max(amax, std::abs(x[b * 32 + i]));
    const float d = amax / 127.f;
    r.d[b] = d;
    for (size_t i = 0; i < 32; ++i) {
      const float t = d > 0.f ? std::clamp(x[b * 32 + i] / d, -127.f, 127.f) : 0.f;
      r.xh[b * 32 + i] = double(d) * double(std::nearbyint(t));
    }
  }
  return r;
}

// linear_q8_0 against double-precision products with the dequantised weights wd (exact: an fp16 scale times
// a 7-bit quant fits fp32), for the matrix-vector sizes (M <= 11) and the sgemm path (M >= 12).
//
// M >= 12: y = x . wd^T within fp32 accumulation error (1e-6 of sum |x wd|, as for bf16 weights); where bf16_products(),
// with x and wd rounded to bf16 first.
//
// M <= 11, two checks:
// (a) the arithmetic: y = sum_k wd_k xh_k with xh the rounded activations (round_x). The block sums of
//     quant products are exact int32; per block one fp32 product (fl(d_w d_x), or fl(sum d_w) in the
//     AVX512_VNNI kernel) and one fused multiply-add into a lane accumulator (chains of at most ceil(nb/2)
//     roundings: two accumulators, even and odd blocks, or one lane per block of a group of 16), then at most
//     one add of two accumulators and log2(16) = 4 levels of the lane sum: |y - ref| <= (nb/2 + 7) u
//     sum|wd xh| with u = 2^-24 (first order; the 1% covers the second).
// (b) the numerics change against the unrounded x: |x - xh| <= d_x (1/2 + 2^-17) per element (x / d_x is
//     within 127 u of the exact quotient, |x / d_x| <= 127 (1 + u), then rounding moves it by <= 1/2, and
//     127 u < 2^-17), so |y - x . wd^T| <= sum_b d_x,b (1/2 + 2^-17) sum_{k in b} |wd_k| plus the error of (a).
// Blocks of x span six decades (a per-block scale must follow each), one is all zero. K / 32 = 1, 3, 10, 16,
// 17 and 37 blocks: whole groups of 16 blocks and the blocks after them (the AVX512_VNNI kernel takes rows of
// 8 blocks or more), odd counts.
void check_linear_q8_0() {
  std::mt19937_64 rng(12);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> decade(-3.f, 3.f);
  const double u = std::ldexp(1.0, -24), ex = 0.5 + std::ldexp(1.0, -17);
  for (int64_t M : {1, 2, 3, 4, 5, 11, 12, 37})
    for (int64_t K : {32, 96, 320, 512, 544, 1184, 2560}) {
      const int64_t N = 67, nb = K / 32;
      std::vector<float> x(size_t(M * K)), w(size_t(N * K)), y(size_t(M * N), NAN);
      for (size_t b = 0; b < x.size() / 32; ++b) {
        const float s = b == 1 ? 0.f : std::pow(10.f, decade(rng));
        for (size_t i = 0; i < 32; ++i) x[b * 32 + i] = nd(rng) * s;
      }
      for (auto& v : w) v = nd(rng) * 0.05f;
      const auto q = quantize(w);
      std::vector<float> wd(w.size());
      dequantize_q8_0(q.data(), int64_t(w.size()), wd.data());
      const RoundedX r = round_x(x);
      linear_q8_0(x.data(), M, K, q.data(), N, y.data(), 2);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double exact = 0, mag = 0, ref = 0, magr = 0, xerr = 0;
          for (int64_t k = 0; k < K; ++k) {
            const double xv = x[size_t(m * K + k)], xh = r.xh[size_t(m * K + k)], wv = wd[size_t(n * K + k)];
            exact += xv * wv, mag += std::abs(xv * wv);
            ref += xh * wv, magr += std::abs(xh * wv);
            xerr += ex * r.d[size_t((m * K + k) / 32)] * std::abs(wv);
          }
          const double got = y[size_t(m * N + n)];
          const auto at = [&] {
            return "M=" + std::to_string(M) + " K=" + std::to_string(K) + " at " + std::to_string(m) + "," +
                   std::to_string(n);
          };
          if (M >= 12 && bf16_products()) {
            // x and the dequantised weights rounded to bf16, then fp32 sums of the exact products.
            double r16 = 0, m16 = 0;
            for (int64_t k = 0; k < K; ++k) {
              const double p = double(round_to(DType::bf16, x[size_t(m * K + k)])) *
                               round_to(DType::bf16, float(wd[size_t(n * K + k)]));
              r16 += p, m16 += std::abs(p);
            }
            ASSERT_NEAR(got, r16, 1e-6 * m16 + 1e-6) << "(bf16 products) " << at();
            continue;
          }
          if (M >= 12) {
            ASSERT_NEAR(got, exact, 1e-6 * mag + 1e-6) << at();
            continue;
          }
          const double arith = (double(nb) / 2 + 7) * u * magr * 1.01;
          ASSERT_NEAR(got, ref, arith) << "(a) rounded x, " << at();
          ASSERT_NEAR(got, exact, xerr + arith) << "(b) unrounded x, " << at();
        }
    }
}

// A NaN or an infinity in a row of x makes that row's outputs NaN on the matrix-vector path (the block's
// scale is NaN), as fp32 products would (up to the sign of an infinity); other rows are unaffected.
void check_linear_q8_0_nonfinite() {
  std::mt19937_64 rng(13);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t M = 3, K = 96, N = 5;
  std::vector<float> w(size_t(N * K));
  for (auto& v : w) v = nd(rng);
  const auto q = quantize(w);
  for (const float bad : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> x(size_t(M * K)), y(size_t(M * N), 0.f);
    for (auto& v : x) v = nd(rng);
    x[size_t(K + 40)] = bad;
    linear_q8_0(x.data(), M, K, q.data(), N, y.data(), 2);
    for (int64_t n = 0; n < N; ++n) {
      EXPECT_TRUE(std::isfinite(y[size_t(n)])) << n;
      EXPECT_TRUE(std::isnan(y[size_t(N + n)])) << bad << " " << n;
      EXPECT_TRUE(std::isfinite(y[size_t(2 * N + n)])) << n;
    }
  }
}

// Integer data on which every step of the matrix-vector kernels is exact: weight scales 1 (fp16 0x3c00), quants
// anywhere in [-128, 127] (llama.cpp's files may hold -128, which quantize_q8_0 never writes; the kernels take
// |w| or w + 128 as unsigned bytes), activations integers in [-127, 127] with +-127 in every block (so d_x = 1
// and q_x = x), every partial sum an integer below 2^24 (at most 23 blocks of 32 * 128 * 127): y must equal the
// integer dot product exactly, for M = 1..4 and block counts below, at and past a group of 16; and M = 5, 8,
// 11, whose rows from the fifth on read the per-product tables (detail::Q8Activations) from row 4 or 8 on.
void check_linear_q8_0_integers() {
  std::mt19937_64 rng(14);
  std::uniform_int_distribution<int> wq(-128, 127), xq(-127, 127);
  for (int64_t M : {1, 2, 3, 4, 5, 8, 11})
    for (int64_t K : {32, 96, 320, 512, 544, 736}) {
      const int64_t N = 7, nb = K / 32;
      std::vector<int> wi(size_t(N * K)), xi(size_t(M * K));
      for (auto& v : wi) v = wq(rng);
      for (auto& v : xi) v = xq(rng);
      for (size_t b = 0; b < xi.size() / 32; ++b) xi[b * 32 + b % 32] = b % 2 ? 127 : -127;
      // Row 0 of W all -128 and row 0 of x all -127 in its first block: the largest block sum, 32 * 128 * 127.
      for (int64_t k = 0; k < K; ++k) wi[size_t(k)] = -128;
      for (int64_t k = 0; k < 32; ++k) xi[size_t(k)] = -127;
      std::vector<unsigned char> q(size_t(N * nb * kQ8BlockBytes));
      for (int64_t b = 0; b < N * nb; ++b) {
        q[size_t(b * kQ8BlockBytes)] = 0x00;
        q[size_t(b * kQ8BlockBytes + 1)] = 0x3c;
        for (int i = 0; i < 32; ++i) q[size_t(b * kQ8BlockBytes + 2 + i)] = uint8_t(int8_t(wi[size_t(b * 32 + i)]));
      }
      std::vector<float> x(xi.begin(), xi.end()), y(size_t(M * N), NAN);
      linear_q8_0(x.data(), M, K, q.data(), N, y.data(), 2);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          int64_t ref = 0;
          for (int64_t k = 0; k < K; ++k) ref += int64_t(wi[size_t(n * K + k)]) * xi[size_t(m * K + k)];
          ASSERT_EQ(y[size_t(m * N + n)], float(ref)) << "M=" << M << " K=" << K << " at " << m << "," << n;
        }
    }
}

// The matrix-vector path (M <= 11) prepares x once per product for all its rows (detail::Q8Activations) and
// runs groups of up to 4 rows over slabs of W rows on 2 threads: each row's outputs must be bit for bit those of
// the row alone (M = 1, one thread), on random data, for rows under and over the AVX512_VNNI kernel's 8 blocks
// and a partial last group of 16 blocks.
void check_linear_q8_0_rows_alone() {
  std::mt19937_64 rng(15);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t K : {96, 544, 2560})
    for (int64_t M : {2, 5, 11}) {
      const int64_t N = 1000;  // several slabs per thread
      std::vector<float> x(size_t(M * K)), w(size_t(N * K)), y(size_t(M * N), NAN), y1(size_t(N), NAN);
      for (auto& v : x) v = nd(rng);
      for (auto& v : w) v = nd(rng) * 0.05f;
      const auto q = quantize(w);
      linear_q8_0(x.data(), M, K, q.data(), N, y.data(), 2);
      for (int64_t m = 0; m < M; ++m) {
        linear_q8_0(x.data() + m * K, 1, K, q.data(), N, y1.data(), 1);
        for (int64_t n = 0; n < N; ++n)
          ASSERT_EQ(std::memcmp(&y[size_t(m * N + n)], &y1[size_t(n)], sizeof(float)), 0)
              << "K=" << K << " M=" << M << " at " << m << "," << n << ": " << y[size_t(m * N + n)] << " vs "
              << y1[size_t(n)];
      }
    }
}

TEST(Q8_0, LinearMatchesDequantisedDouble) { check_linear_q8_0(); }
TEST(Q8_0, LinearRowsAsAlone) { check_linear_q8_0_rows_alone(); }
TEST(Q8_0, LinearExactOnIntegers) { check_linear_q8_0_integers(); }
TEST(Q8_0, LinearNonFiniteActivations) { check_linear_q8_0_nonfinite(); }

TEST(Q8_0, LinearEveryTarget) {
  test::on_every_simd_target([] {
    check_linear_q8_0();
    check_linear_q8_0_nonfinite();
    check_linear_q8_0_integers();
    check_linear_q8_0_rows_alone();
  });
}

}  // namespace
}  // namespace ksa::cpu
