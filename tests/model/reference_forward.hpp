// An independent, naive reference forward of Qwen3-KSA (docs/ksa.md: The model), the oracle the engine (ksa::Model) is
// tested against (docs/design.md: the oracle): plain loops over the whole stream, a dense visibility mask from the ONE
// rule (ksa::visible over ksa::build_stream's layout), a full probability row per query, weights read as
// float from the checkpoint (bf16 and f32 widen exactly), and no KV cache. Nothing of the engine, the
// kernels or the dense ops is used.
//
// The same loops run in double (the oracle) or in float (a naive same-precision computation: its distance
// from the double result is the error scale the engine's fp32 arithmetic is measured against).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ksa/model_config.hpp"

namespace ksa::test {

class ReferenceModel {
 public:
  // Reads DIR/config.json and the checkpoint in DIR, widening every tensor the forward reads to float.
  explicit ReferenceModel(const std::string& dir);

  const ModelConfig& config() const { return cfg_; }
  int64_t vocab() const { return cfg_.logits_size(); }

  // Logits of every text token of `text` (a fresh sequence): [T, vocab()], row-major.
  std::vector<double> logits(std::span<const int32_t> text) const;
  // The same computation with float arithmetic throughout (accumulation, softmax, norms, RoPE angles).
  std::vector<double> logits_f32(std::span<const int32_t> text) const;

  struct Layer {
    std::vector<float> in_norm, in_norm_summary, q, k, v, o, q_norm, k_norm, q_s, k_s, v_s, post_norm, gate, up, down;
    bool blend = false;         // summary tokens blend their own q/k/v projections (mix_coeff)
    bool summary_norm = false;  // summary tokens use input_layernorm_summary
  };

 private:
  template <class R>
  std::vector<double> run(std::span<const int32_t> text) const;

  ModelConfig cfg_;
  std::vector<float> embed_, norm_, lm_head_;  // lm_head_ empty when tied (embed_ is used)
  std::vector<Layer> layers_;
};

}  // namespace ksa::test
