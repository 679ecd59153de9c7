// generation_config.json of a checkpoint directory: the fields `ksa generate` and `ksa serve` use. Hugging Face
// writes `eos_token_id` as an int or a list; a file that is absent or lacks the key leaves the list empty (the
// caller then falls back to config.json's eos ids). The sampling fields are the checkpoint's recommended
// defaults (Qwen3 ships temperature 0.6, top_p 0.95, top_k 20); absent ones stay unset.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ksa {

struct GenerationConfig {
  bool found = false;                  // the file exists
  std::vector<int64_t> eos_token_ids;  // empty: not given
  int64_t bos_token_id = -1;           // -1: not given
  std::optional<double> temperature, top_p, min_p, repetition_penalty;
  std::optional<int64_t> top_k;
};

// Reads DIR/generation_config.json. Throws ksa::Error naming the file and field when it exists but is not
// valid JSON or a field has the wrong type.
GenerationConfig load_generation_config(const std::string& dir);

}  // namespace ksa
