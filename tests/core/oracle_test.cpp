// The oracle against an independent brute-force computation: a dense LxL score matrix masked by `visible`,
// softmax per row, all in double.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "ksa/cpu.hpp"
#include "ksa/error.hpp"

namespace ksa {
namespace {

struct Inputs {
  std::vector<uint8_t> q, k, v;
};

TEST(Oracle, MatchesDenseMaskedSoftmax) {
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    std::mt19937_64 rng(seed);
    const int64_t k = 1 + int64_t(rng() % 5), S = 1 + int64_t(rng() % 2), T = 1 + int64_t(rng() % 40);
    const int64_t W = int64_t(rng() % 4), Hkv = 1 + int64_t(rng() % 2), G = 1 + int64_t(rng() % 3);
    const int64_t Hq = Hkv * G, D = 1 + int64_t(rng() % 9), B = 1 + int64_t(rng() % 2);
    const DType dt = rng() % 2 ? DType::f32 : DType::bf16;
    const Layout lay(k, S, T, rng() % 2 == 0);
    const int64_t L = lay.length();
    SCOPED_TRACE("seed " + std::to_string(seed));
    // Strided views: q rows padded, k/v interleaved in one buffer [B, L, 2, Hkv, D+1].
    const int64_t qrow = Hq * D + 3, kvrow = 2 * Hkv * (D + 1);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<uint8_t> qb(size_t(B * L * qrow * 4)), kvb(size_t(B * L * kvrow * 4));
    for (int64_t i = 0; i < B * L * qrow; ++i) store_from_float(dt, qb.data(), i, nd(rng));
    for (int64_t i = 0; i < B * L * kvrow; ++i) store_from_float(dt, kvb.data(), i, nd(rng));
    AttentionParams p = shaped_params(lay, W, B, Hq, Hkv, D, dt);
    p.scale = 0.37f;
    p.q = TensorView{qb.data(), L * qrow, qrow, D};
    p.k = TensorView{kvb.data(), L * kvrow, kvrow, D + 1};
    p.v = TensorView{static_cast<uint8_t*>(static_cast<void*>(kvb.data())) + Hkv * (D + 1) * dtype_size(dt), L * kvrow,
                     kvrow, D + 1};
    std::vector<float> outb(size_t(B * L * Hq * D));
    p.out = TensorView::dense(outb.data(), L, Hq, D);
    const auto ref = cpu::attention_reference(p);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hq; ++h) {
        // Dense scores with the mask.
        std::vector<double> sc(size_t(L * L), -INFINITY);
        for (int64_t i = 0; i < L; ++i)
          for (int64_t j = 0; j < L; ++j) {
            if (!visible(lay, W, i, j)) continue;
            double dot = 0;
            for (int64_t d = 0; d < D; ++d)
              dot += double(load_as_float(dt, p.q.data, p.q.offset(b, i, h) + d)) *
                     double(load_as_float(dt, p.k.data, p.k.offset(b, j, h / G) + d));
            sc[size_t(i * L + j)] = dot * 0.37f;
          }
        for (int64_t i = 0; i < L; ++i) {
          double m = -INFINITY, sum = 0;
          for (int64_t j = 0; j < L; ++j) m = std::max(m, sc[size_t(i * L + j)]);
          ASSERT_TRUE(std::isfinite(m)) << "row " << i << " fully masked";
          for (int64_t j = 0; j < L; ++j) sum += std::exp(sc[size_t(i * L + j)] - m);
          EXPECT_NEAR(ref.lse[size_t((b * L + i) * Hq + h)], m + std::log(sum), 1e-12);
          for (int64_t d = 0; d < D; ++d) {
            double o = 0;
            for (int64_t j = 0; j < L; ++j)
              o += std::exp(sc[size_t(i * L + j)] - m) / sum * load_as_float(dt, p.v.data, p.v.offset(b, j, h / G) + d);
            EXPECT_NEAR(ref.out[size_t(((b * L + i) * Hq + h) * D + d)], o, 1e-12) << "row " << i << " d " << d;
          }
        }
      }
    // A row sample returns the same rows.
    const std::vector<int64_t> rows = {L - 1, 0};
    const auto part = cpu::attention_reference(p, rows);
    for (int64_t d = 0; d < D; ++d) EXPECT_EQ(part.out[size_t(d)], ref.out[size_t(((L - 1) * Hq) * D + d)]);
  }
}

TEST(Oracle, RejectsBadRows) {
  std::vector<float> buf(64, 0.5f);
  AttentionParams p;
  p.layout = Layout(2, 1, 3);
  p.D = 4;
  p.q = p.k = p.v = p.out = TensorView::dense(buf.data(), 4, 1, 4);
  const std::vector<int64_t> rows = {9};
  EXPECT_THROW(cpu::attention_reference(p, rows), Error);
}

}  // namespace
}  // namespace ksa
