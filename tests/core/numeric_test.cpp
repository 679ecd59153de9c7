// Storage dtypes and the online-softmax state.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "ksa/attention.hpp"
#include "ksa/dtype.hpp"
#include "ksa/error.hpp"
#include "ksa/softmax.hpp"

namespace ksa {
namespace {

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(bf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(bf16::from_float(1.00390625f), 0x3f80);  // exactly half an ulp above 1: ties to even (down)
  EXPECT_EQ(bf16::from_float(1.01171875f), 0x3f82);  // 1.5 ulp: ties to even (up)
  EXPECT_TRUE(std::isnan(float(bf16(NAN))));
  EXPECT_EQ(float(bf16(-2.5f)), -2.5f);
}

TEST(DType, F16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16::to_float(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16::to_float(f16::from_float(f))));
      continue;
    }
    ASSERT_EQ(f16::from_float(f), h) << std::hex << h;
  }
  EXPECT_EQ(float(f16(65504.f)), 65504.f);
  EXPECT_TRUE(std::isinf(float(f16(65520.f))));
  EXPECT_EQ(float(f16(1e-8f)), 0.f);
  EXPECT_EQ(f16::from_float(5.9604645e-8f), 1);            // smallest subnormal
  EXPECT_EQ(f16::from_float(1.0f + 1.0f / 2048), 0x3c00);  // tie to even
}

// Partials over disjoint key sets merge exactly, in any order.
TEST(OnlineSoftmax, MergeIsOrderIndependent) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.f, 3.f);
  const int n = 200, D = 5;
  std::vector<float> s(n), v(size_t(n * D));
  for (auto& x : s) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  double m = -INFINITY, sum = 0;
  for (float x : s) m = std::max(m, double(x));
  std::vector<double> ref(D, 0.0);
  for (int i = 0; i < n; ++i) {
    const double p = std::exp(double(s[size_t(i)]) - m);
    sum += p;
    for (int d = 0; d < D; ++d) ref[size_t(d)] += p * v[size_t(i * D + d)];
  }
  const double ref_lse = m + std::log(sum);
  // Four partials, each built key by key.
  const int cuts[5] = {0, 17, 90, 91, 200};
  std::vector<OnlineSoftmax> st(4);
  std::vector<std::vector<float>> acc(4, std::vector<float>(D, 0.f));
  for (int p = 0; p < 4; ++p)
    for (int i = cuts[p]; i < cuts[p + 1]; ++i) {
      const float a = st[size_t(p)].raise_max(s[size_t(i)]);
      const float w = st[size_t(p)].add(s[size_t(i)]);
      for (int d = 0; d < D; ++d) acc[size_t(p)][size_t(d)] = acc[size_t(p)][size_t(d)] * a + w * v[size_t(i * D + d)];
    }
  std::vector<int> order = {0, 1, 2, 3};
  do {
    OnlineSoftmax tot;
    std::vector<float> out(D, 0.f);
    for (int p : order) merge_partial(tot, out.data(), st[size_t(p)], acc[size_t(p)].data(), D);
    EXPECT_NEAR(tot.lse(), ref_lse, 1e-5);
    for (int d = 0; d < D; ++d) EXPECT_NEAR(out[size_t(d)] * tot.inv_sum(), ref[size_t(d)] / sum, 1e-5);
  } while (std::next_permutation(order.begin(), order.end()));
  // Merging an empty partial changes nothing.
  OnlineSoftmax e, x = st[0];
  std::vector<float> ax = acc[0];
  merge_partial(x, ax.data(), e, acc[1].data(), D);
  EXPECT_EQ(x.m, st[0].m);
  EXPECT_EQ(ax, acc[0]);
}

TEST(Params, ValidationNamesField) {
  float buf[64];
  AttentionParams p;
  p.layout = Layout(8, 1, 4);
  p.D = 4;
  p.Hq = 3;
  p.Hkv = 2;
  p.q = p.k = p.v = p.out = TensorView::dense(buf, 4, 3, 4);
  try {
    validate(p);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Hq: must be a positive multiple of Hkv=2 (got 3)"), std::string::npos)
        << e.what();
  }
  p.Hq = 2;
  p.q.row_stride = 3;
  try {
    validate(p);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("q.row_stride"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ksa
