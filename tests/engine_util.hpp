// Helpers shared by the engine tests on the CPU (tests/model) and the GPU (tests/cuda): random text and the
// two ways of feeding a fresh sequence (one prefill; one token at a time).
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "ksa/model.hpp"
#include "ksa/model_config.hpp"
#include "ksa/model_writer.hpp"
#include "ksa/pattern.hpp"

namespace ksa::test {

// The KSA knobs of a test model on the "tiny" shape (4 layers, hidden 64, intermediate 192) with a small
// vocabulary: text ids [0, text_vocab), the summary ids after them.
struct TinyModel {
  int64_t D = 16, Hq = 4, Hkv = 2;  // head_dim, query heads, KV heads
  int64_t k = 4, S = 1;
  double mix = 0.0;
  bool tied = true;
  std::string windows = "[1]*4";
  std::vector<uint8_t> summary_layers;  // empty: every layer a summary-attention layer
  TextPositions tp = TextPositions::origin;
  SummaryPositions sp = SummaryPositions::last_chunk_slice_right;
  bool summary_layernorm = false;
  bool summary_attention = true;  // false: plain Qwen3 (use_summary_attention false)
};

inline ModelConfig tiny_config(const TinyModel& c, int64_t text_vocab) {
  ModelConfig cfg = model_shape_config("tiny");
  cfg.head_dim = c.D;
  cfg.num_attention_heads = c.Hq;
  cfg.num_key_value_heads = c.Hkv;
  cfg.tie_word_embeddings = c.tied;
  cfg.bos_token_id = 1;
  cfg.eos_token_ids = {2};
  cfg.window_pattern = c.windows;
  cfg.windows = parse_layer_pattern(c.windows, cfg.num_hidden_layers);
  cfg.use_summary_attention = c.summary_attention;
  const size_t layers = size_t(cfg.num_hidden_layers);
  if (c.summary_attention) {
    cfg.summary_chunk_size = c.k;
    cfg.summary_token_num = c.S;
    cfg.summary_token_begin = text_vocab;
    cfg.vocab_size = text_vocab + c.S;  // the summary rows follow the text rows
    cfg.truncate_predict_nums = text_vocab;
    cfg.mix_coeff = c.mix;
    cfg.text_positions = c.tp;
    cfg.summary_positions = c.sp;
    cfg.summary_independent_attention_layernorm = c.summary_layernorm;
    cfg.summary_layers = c.summary_layers.empty() ? std::vector<uint8_t>(layers, 1) : c.summary_layers;
  } else {
    cfg.vocab_size = text_vocab;
    cfg.truncate_predict_nums = 0;
    cfg.mix_coeff = 0;
    cfg.summary_independent_attention_layernorm = false;
    cfg.summary_layers.assign(layers, 0);
  }
  cfg.validate();
  return cfg;
}

// n token ids uniform in [0, vocab).
inline std::vector<int32_t> random_text(std::mt19937_64& rng, int64_t n, int64_t vocab) {
  std::uniform_int_distribution<int32_t> d(0, int32_t(vocab - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = d(rng);
  return t;
}

// One prefill of a fresh sequence; logits of every token.
inline std::vector<float> prefill(Model& m, std::span<const int32_t> text) {
  const SeqId id = m.new_sequence();
  std::vector<float> out(text.size() * size_t(m.vocab()));
  m.append(id, text, LogitsFor::all, out);
  m.release(id);
  return out;
}

// A fresh sequence fed one token at a time (the first through the prefill path, the rest through the
// cache); the last-token logits of each step stacked.
inline std::vector<float> stepwise(Model& m, std::span<const int32_t> text) {
  const SeqId id = m.new_sequence();
  const size_t V = size_t(m.vocab());
  std::vector<float> out(text.size() * V);
  for (size_t i = 0; i < text.size(); ++i)
    m.append(id, text.subspan(i, 1), LogitsFor::last, std::span<float>(out).subspan(i * V, V));
  m.release(id);
  return out;
}

}  // namespace ksa::test
