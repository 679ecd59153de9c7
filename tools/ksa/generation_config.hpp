// generation_config.json of a checkpoint directory: the fields `ksa generate` uses. Hugging Face writes
// `eos_token_id` as an int or a list; a file that is absent or lacks the key leaves the list empty (the
// caller then falls back to config.json's eos ids).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ksa::tools {

struct GenerationConfig {
  bool found = false;                 // the file exists
  std::vector<int64_t> eos_token_ids; // empty: not given
  int64_t bos_token_id = -1;          // -1: not given
};

// Reads DIR/generation_config.json. Throws ksa::Error naming the file and field when it exists but is not
// valid JSON or a field has the wrong type.
GenerationConfig load_generation_config(const std::string& dir);

}  // namespace ksa::tools
