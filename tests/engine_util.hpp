// Helpers shared by the engine tests on the CPU (tests/model) and the GPU (tests/cuda): random text and the
// two ways of feeding a fresh sequence (one prefill; one token at a time).
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "ksa/model.hpp"

namespace ksa::test {

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
