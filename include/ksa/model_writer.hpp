// Random-weight checkpoints in the released layout (docs/ksa.md: The model), for tests and tools (`ksa make-model`):
// config.json in the released format (window pattern as a string), model.safetensors or shards with an
// index, generation_config.json, and the tokenizer files copied from a folder when one is given.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ksa/dtype.hpp"
#include "ksa/model_config.hpp"

namespace ksa {

// The config of a named shape: "tiny" (4 layers, hidden 64; every optional tensor present and used),
// "small" (8 layers, hidden 256, 8/4 heads of 64, untied lm_head, summary projections present but ignored: mix_coeff 0)
// or "4b" (KSA-4B-base: 36 layers, hidden 2560, pattern "([128]*3+[16768]*1)*9"). All use the Qwen3 vocabulary plus one
// summary token (vocab_size 151937). Throws ksa::Error for an unknown name.
ModelConfig model_shape_config(const std::string& shape);

struct RandomModelOptions {
  uint64_t seed = 0;
  DType dtype = DType::bf16;
  int64_t max_shard_bytes = int64_t(4) << 30;  // larger checkpoints are sharded
  bool summary_projections = true;             // write *_proj_summary when summary_independent_parameters
  std::string tokenizer_dir;                   // copy tokenizer.json / tokenizer_config.json from here; "" = none
};

struct WrittenModel {
  std::vector<std::string> files;
  int64_t parameters = 0;  // elements written
  int64_t bytes = 0;       // tensor bytes written
  bool tokenizer_copied = false;
};

// Writes the checkpoint into `dir` (created if needed). Weights are uniform random with the scale of a
// standard init (embeddings 0.02, projections 1/sqrt(fan_in), output projections further divided by
// sqrt(2 * layers), norms near 1), so that activations of a forward pass stay finite. Deterministic in seed.
WrittenModel write_random_model(const ModelConfig& cfg, const std::string& dir, const RandomModelOptions& opt = {});

}  // namespace ksa
