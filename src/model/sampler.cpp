#include "ksa/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>

#include "core/splitmix.hpp"
#include "ksa/error.hpp"

namespace ksa {

void SamplerConfig::validate() const {
  if (!(temperature >= 0.f) || !std::isfinite(temperature)) fail("temperature: must be >= 0 (got ", temperature, ")");
  require(top_k >= 0, "top_k", ">= 0", top_k);
  if (!(top_p > 0.f && top_p <= 1.f)) fail("top_p: must be in (0, 1] (got ", top_p, ")");
  if (!(min_p >= 0.f && min_p <= 1.f)) fail("min_p: must be in [0, 1] (got ", min_p, ")");
  if (!(repetition_penalty > 0.f) || !std::isfinite(repetition_penalty))
    fail("repetition_penalty: must be > 0 (got ", repetition_penalty, ")");
  if (!std::isfinite(presence_penalty)) fail("presence_penalty: must be finite (got ", presence_penalty, ")");
  if (!std::isfinite(frequency_penalty)) fail("frequency_penalty: must be finite (got ", frequency_penalty, ")");
}

Sampler::Sampler(const SamplerConfig& cfg) : cfg_(cfg), rng_(cfg.seed) { cfg_.validate(); }

int32_t Sampler::sample(std::span<float> logits, std::span<const int32_t> history) {
  const double u = cfg_.temperature == 0.f ? 0.0 : std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  return sample_token(logits, history, cfg_, u, idx_, prob_);
}

double sample_uniform(uint64_t seed, uint64_t draw) {
  const uint64_t h = detail::splitmix64(seed ^ detail::splitmix64(draw));
  return double(h >> 11) * 0x1p-53;
}

int32_t sample_token(std::span<float> logits, std::span<const int32_t> history, const SamplerConfig& cfg, double u,
                     std::vector<int32_t>& idx_, std::vector<float>& prob_) {
  const SamplerConfig& cfg_ = cfg;
  const int64_t V = int64_t(logits.size());
  if (V == 0) fail("sampler: empty logits");
  // Penalties over the distinct seen tokens.
  if (cfg_.repetition_penalty != 1.f || cfg_.presence_penalty != 0.f || cfg_.frequency_penalty != 0.f) {
    std::unordered_map<int32_t, int64_t> count;
    for (int32_t t : history)
      if (t >= 0 && t < V) ++count[t];
    for (const auto& [t, c] : count) {
      float& x = logits[size_t(t)];
      if (cfg_.repetition_penalty != 1.f) x = x > 0.f ? x / cfg_.repetition_penalty : x * cfg_.repetition_penalty;
      x -= cfg_.presence_penalty + cfg_.frequency_penalty * float(c);
    }
  }
  if (cfg_.temperature == 0.f) {
    int64_t best = 0;
    for (int64_t i = 1; i < V; ++i)
      if (logits[size_t(i)] > logits[size_t(best)]) best = i;
    return int32_t(best);
  }
  // Candidates sorted by logit (descending; ties by id), cut to top_k.
  idx_.resize(size_t(V));
  std::iota(idx_.begin(), idx_.end(), 0);
  const int64_t k = (cfg_.top_k > 0 && cfg_.top_k < V) ? cfg_.top_k : V;
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b);
  };
  std::partial_sort(idx_.begin(), idx_.begin() + k, idx_.end(), by_logit);
  idx_.resize(size_t(k));
  // Softmax at the temperature.
  prob_.resize(size_t(k));
  const double m = logits[size_t(idx_[0])];
  double sum = 0;
  for (int64_t i = 0; i < k; ++i)
    sum += prob_[size_t(i)] = float(std::exp((logits[size_t(idx_[size_t(i)])] - m) / cfg_.temperature));
  int64_t n = k;
  if (cfg_.top_p < 1.f) {  // smallest prefix with cumulative probability >= top_p (at least one token)
    double cum = 0;
    for (int64_t i = 0; i < k; ++i) {
      cum += prob_[size_t(i)] / sum;
      if (cum >= cfg_.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  if (cfg_.min_p > 0.f) {
    const float cut = cfg_.min_p * prob_[0];
    int64_t keep = 1;
    while (keep < n && prob_[size_t(keep)] >= cut) ++keep;
    n = keep;
  }
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += prob_[size_t(i)];
  double r = u * total;
  for (int64_t i = 0; i < n; ++i) {
    r -= prob_[size_t(i)];
    if (r < 0) return idx_[size_t(i)];
  }
  return idx_[size_t(n - 1)];
}

}  // namespace ksa
