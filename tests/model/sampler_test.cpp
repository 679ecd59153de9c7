// Sampling: each filter, the penalties, seeding, and the distribution of plain temperature sampling.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

#include "ksa/error.hpp"
#include "ksa/sampler.hpp"

namespace ksa {
namespace {

std::vector<float> logits() { return {1.0f, 3.0f, 2.5f, -1.0f, 2.9f, 0.0f}; }

int32_t draw(SamplerConfig c, std::vector<float> l, std::vector<int32_t> hist = {}) {
  Sampler s(c);
  return s.sample(l, hist);
}

TEST(Sampler, GreedyIsArgmax) {
  EXPECT_EQ(draw({}, logits()), 1);
  SamplerConfig c;
  c.temperature = 0.8f;
  c.top_k = 1;
  EXPECT_EQ(draw(c, logits()), 1);
  c.top_k = 0;
  c.top_p = 1e-6f;
  EXPECT_EQ(draw(c, logits()), 1);
  c.top_p = 1.f;
  c.min_p = 0.999f;
  EXPECT_EQ(draw(c, logits()), 1);
}

TEST(Sampler, FiltersKeepOnlyAllowedTokens) {
  SamplerConfig c;
  c.temperature = 1.f;
  c.top_k = 3;  // {1, 4, 2}
  Sampler s(c);
  std::map<int32_t, int> seen;
  for (int i = 0; i < 3000; ++i) {
    auto l = logits();
    ++seen[s.sample(l, {})];
  }
  EXPECT_EQ(seen.size(), 3u);
  EXPECT_TRUE(seen.count(1) && seen.count(4) && seen.count(2));
  // min_p 0.5: p(2)/p(1) = e^-0.5 = 0.61 stays, p(0)/p(1) = e^-2 goes.
  c.top_k = 0;
  c.min_p = 0.5f;
  Sampler s2(c);
  seen.clear();
  for (int i = 0; i < 3000; ++i) {
    auto l = logits();
    ++seen[s2.sample(l, {})];
  }
  EXPECT_EQ(seen.size(), 3u);
  EXPECT_FALSE(seen.count(0));
}

TEST(Sampler, TemperatureSamplingFollowsSoftmax) {
  SamplerConfig c;
  c.temperature = 0.7f;
  c.seed = 42;
  Sampler s(c);
  const auto l0 = logits();
  std::vector<double> p(l0.size());
  double z = 0;
  for (size_t i = 0; i < l0.size(); ++i) z += p[i] = std::exp(l0[i] / 0.7);
  std::vector<int> n(l0.size(), 0);
  const int draws = 40000;
  for (int i = 0; i < draws; ++i) {
    auto l = l0;
    ++n[size_t(s.sample(l, {}))];
  }
  for (size_t i = 0; i < l0.size(); ++i) {
    const double want = p[i] / z, sd = std::sqrt(want * (1 - want) / draws);
    EXPECT_NEAR(double(n[i]) / draws, want, 5 * sd + 1e-4) << "token " << i;  // 5 sigma
  }
}

TEST(Sampler, SameSeedSameTokens) {
  SamplerConfig c;
  c.temperature = 1.2f;
  c.top_p = 0.9f;
  c.seed = 7;
  Sampler a(c), b(c);
  for (int i = 0; i < 200; ++i) {
    auto l1 = logits(), l2 = logits();
    ASSERT_EQ(a.sample(l1, {}), b.sample(l2, {}));
  }
}

TEST(Sampler, Penalties) {
  SamplerConfig c;
  c.repetition_penalty = 2.f;
  auto l = logits();
  Sampler s(c);
  EXPECT_EQ(s.sample(l, std::vector<int32_t>{1, 3}), 4);  // 3.0 -> 1.5, so 2.9 wins
  EXPECT_FLOAT_EQ(l[1], 1.5f);
  EXPECT_FLOAT_EQ(l[3], -2.f);  // negative logits are multiplied
  SamplerConfig f;
  f.presence_penalty = 0.5f;
  f.frequency_penalty = 0.25f;
  auto l2 = logits();
  Sampler s2(f);
  s2.sample(l2, std::vector<int32_t>{4, 4, 4, 2});
  EXPECT_FLOAT_EQ(l2[4], 2.9f - 0.5f - 0.75f);
  EXPECT_FLOAT_EQ(l2[2], 2.5f - 0.5f - 0.25f);
  EXPECT_FLOAT_EQ(l2[0], 1.0f);
}

TEST(Sampler, BadConfigNamesField) {
  SamplerConfig c;
  c.top_p = 0.f;
  try {
    Sampler s(c);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("top_p"), std::string::npos);
  }
  c = SamplerConfig{};
  c.temperature = -1.f;
  EXPECT_THROW(Sampler{c}, Error);
}

}  // namespace
}  // namespace ksa
