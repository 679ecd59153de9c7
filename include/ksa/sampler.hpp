// Token sampling from logits: greedy, temperature, top-k, top-p, min-p, repetition / presence / frequency
// penalties, seeded. Order (as in HF transformers' logits processors): penalties, temperature, top-k,
// top-p, min-p, then a draw from the renormalised distribution.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace ksa {

struct SamplerConfig {
  float temperature = 0.f;         // 0: greedy (argmax; ties to the lowest id)
  int64_t top_k = 0;               // keep the k most likely (0: off)
  float top_p = 1.f;               // keep the smallest set with cumulative probability >= top_p (1: off)
  float min_p = 0.f;               // drop tokens with p < min_p * p_max (0: off)
  float repetition_penalty = 1.f;  // HF: logits of seen tokens divided (if > 0) or multiplied (if < 0) by it
  float presence_penalty = 0.f;    // OpenAI: minus this once for every seen token
  float frequency_penalty = 0.f;   // OpenAI: minus this times the token's count
  uint64_t seed = 0;

  void validate() const;  // throws ksa::Error naming the field
};

// The draw itself: penalties (in place on logits), then greedy or the cut distribution, from which the
// token at cumulative probability u (in [0, 1)) is taken. Sampler and Model::step both call it.
int32_t sample_token(std::span<float> logits, std::span<const int32_t> history, const SamplerConfig& cfg, double u,
                     std::vector<int32_t>& idx_scratch, std::vector<float>& prob_scratch);
// The reproducible u of draw number `draw` of a sequence sampled with `seed` (splitmix64 of both).
double sample_uniform(uint64_t seed, uint64_t draw);

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& cfg);
  // Picks the next token from `logits` (modified in place by the penalties); `history` holds the tokens the
  // penalties look at (prompt and generated so far).
  int32_t sample(std::span<float> logits, std::span<const int32_t> history);
  const SamplerConfig& config() const { return cfg_; }

 private:
  SamplerConfig cfg_;
  std::mt19937_64 rng_;
  std::vector<int32_t> idx_;
  std::vector<float> prob_;
};

}  // namespace ksa
