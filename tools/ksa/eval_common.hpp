// Shared by `ksa perplexity` and `ksa eval passkey`: reading a text file, loading a checkpoint with its
// tokenizer, the log-softmax of a logits row, and the passkey prompt (the same pieces as the training
// recipe's python/ksa_train/data.py; docs/training.md).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "common.hpp"
#include "ksa/model.hpp"
#include "ksa/tokenizer.hpp"

namespace ksa::tools {

inline std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot read the ", what);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline Tokenizer load_model_tokenizer(const std::string& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) fail("model directory '", dir, "' does not exist or is not a directory");
  const fs::path p = fs::path(dir) / "tokenizer.json";
  if (!fs::exists(p)) fail(dir, " has no tokenizer.json");
  return Tokenizer::load(p.string());
}

// The engine flags both commands take (--device, -t, --kv-f32, --no-mmap), registered in that order, and the
// ModelOptions they give.
struct EngineFlags {
  std::string& device;
  int64_t& threads;
  bool& kv_f32;
  bool& no_mmap;

  explicit EngineFlags(cli::Flags& f)
      : device(f.str("--device", "auto", "cpu, cuda, or auto")),
        threads(f.i64("-t,--threads", 0, "CPU threads (0 = all)", 0, cli::kMaxThreads)),
        kv_f32(f.flag("--kv-f32", "keep the KV cache in f32 (default bf16)")),
        no_mmap(f.flag("--no-mmap", cli::kNoMmapHelp)) {}

  ModelOptions options(const std::string& dir) const {
    ModelOptions mo;
    mo.device = parse_device_flag(device, dir);
    if (mo.device == Device::cuda && kv_f32)
      throw cli::UsageError("--kv-f32: the CUDA engine keeps the KV cache in bf16");
    mo.threads = int(threads);
    mo.kv_dtype = kv_f32 ? DType::f32 : DType::bf16;
    if (no_mmap) mo.load = FileLoad::copy;
    return mo;
  }
};

// log p(target) under softmax(row), in double.
inline double log_prob(std::span<const float> row, int32_t target) {
  double mx = -INFINITY;
  for (float v : row) mx = std::max(mx, double(v));
  double s = 0;
  for (float v : row) s += std::exp(double(v) - mx);
  return double(row[size_t(target)]) - mx - std::log(s);
}

inline int32_t argmax(std::span<const float> row) {
  return int32_t(std::max_element(row.begin(), row.end()) - row.begin());
}

// The passkey prompt (python/ksa_train/data.py: NEEDLE_PRE, NEEDLE_POST, QUESTION; keep them equal):
//   filler[s, s+a) + enc(NEEDLE_PRE) + key + enc(NEEDLE_POST) + filler[s+a, s+a+f) + enc(QUESTION)
// each piece encoded alone; the key is kKeyDigits digits, one token each. The distance d is the number of
// tokens from the needle's first key digit to the first answer digit: d = kKeyDigits + |post| + f + |question|.
inline constexpr const char* kNeedlePre = "\nThe pass key is ";
inline constexpr const char* kNeedlePost = ". Remember it.\n";
inline constexpr const char* kQuestion = "\nWhat is the pass key? The pass key is ";
inline constexpr int kKeyDigits = 5;

struct PasskeyPieces {
  std::vector<int32_t> pre, post, question;
  int32_t digit[10] = {};
  explicit PasskeyPieces(const Tokenizer& tok) {
    pre = tok.encode(kNeedlePre);
    post = tok.encode(kNeedlePost);
    question = tok.encode(kQuestion);
    for (int d = 0; d < 10; ++d) {
      const std::vector<int32_t> ids = tok.encode(std::string(1, char('0' + d)));
      if (ids.size() != 1)
        fail("the tokenizer encodes the digit ", d, " as ", ids.size(), " tokens; the passkey task needs one");
      digit[d] = ids[0];
    }
  }
  // The shortest distance a prompt can have (no filler between the needle and the question).
  int64_t min_distance() const { return kKeyDigits + int64_t(post.size() + question.size()); }
};

struct PasskeyPrompt {
  std::vector<int32_t> ids, key;  // the prompt and the key's digit tokens (the expected answer)
  std::string key_text;           // the key as digits
  int64_t needle_at = 0;          // index of the needle's first key digit in ids
};

// Trial `trial` of distance `dist`: everything random comes from splitmix64 over (seed, dist, trial).
inline PasskeyPrompt make_passkey_prompt(const PasskeyPieces& pk, std::span<const int32_t> filler, int64_t dist,
                                         int64_t max_before, uint64_t seed, int64_t trial) {
  uint64_t state =
      detail::splitmix64(seed ^ detail::splitmix64(uint64_t(dist) * 0x9e3779b97f4a7c15ull + uint64_t(trial)));
  auto draw = [&state](uint64_t n) {
    state = detail::splitmix64(state);
    return n ? state % n : 0;
  };
  const int64_t f = dist - pk.min_distance();
  if (f < 0) fail("distance ", dist, " is shorter than the prompt's fixed pieces (at least ", pk.min_distance(), ")");
  PasskeyPrompt p;
  for (int i = 0; i < kKeyDigits; ++i) {
    const int d = int(draw(10));
    p.key.push_back(pk.digit[d]);
    p.key_text += char('0' + d);
  }
  const int64_t a = int64_t(draw(uint64_t(max_before) + 1));
  if (int64_t(filler.size()) <= a + f)
    fail("the filler text has ", filler.size(), " tokens; distance ", dist, " needs more than ", a + f);
  const int64_t s = int64_t(draw(uint64_t(int64_t(filler.size()) - a - f)));
  auto put = [&p](auto first, auto last) { p.ids.insert(p.ids.end(), first, last); };
  put(filler.begin() + s, filler.begin() + s + a);
  put(pk.pre.begin(), pk.pre.end());
  p.needle_at = int64_t(p.ids.size());
  put(p.key.begin(), p.key.end());
  put(pk.post.begin(), pk.post.end());
  put(filler.begin() + s + a, filler.begin() + s + a + f);
  put(pk.question.begin(), pk.question.end());
  return p;
}

}  // namespace ksa::tools
