// config.json of a Qwen3 / Qwen3-KSA checkpoint (docs/ksa.md: Parameters, The model) as a plain struct with defaults
// and validation (docs/design.md: model I/O). Every key the forward needs is read; unknown keys are ignored, as HF
// does.
//
// Defaults: Qwen3 fields follow transformers' Qwen3Config where a key may be absent (num_key_value_heads =
// num_attention_heads, head_dim = hidden_size / num_attention_heads, rms_norm_eps 1e-6, rope_theta 10000,
// ...); the shape keys hidden_size, intermediate_size, num_hidden_layers, num_attention_heads and
// vocab_size are required. KSA fields default to the released values of docs/ksa.md: Parameters (k=8, S=1, begin
// 151936, origin, last_chunk_slice_right, independent parameters, mix_coeff 0, no independent layernorm);
// `use_summary_attention` defaults to false and `summary_sliding_chunk_num` to 0, as in the release's
// inference code (getattr defaults); `truncate_predict_nums` to 151936.
//
// Variants of real files that are accepted: `rope_parameters: {rope_theta, rope_type}` instead of a top-level
// `rope_theta`; `dtype` instead of `torch_dtype`; `layer_types`; `eos_token_id` as an int or a list;
// `summary_layer_freq` absent, an int, a list or a pattern string.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ksa/dtype.hpp"
#include "ksa/spec.hpp"

namespace ksa {

struct ModelConfig {
  // --- Qwen3 ---
  std::string model_type = "qwen3";
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // 0 in a file = num_attention_heads
  int64_t head_dim = 0;             // 0 in a file = hidden_size / num_attention_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::string rope_type = "default";  // only "default" (no scaling) is supported
  int64_t max_position_embeddings = 32768;
  int64_t vocab_size = 0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;             // -1: none
  std::vector<int64_t> eos_token_ids;    // `eos_token_id`, an int or a list
  DType dtype = DType::bf16;             // `torch_dtype` / `dtype`
  std::vector<std::string> layer_types;  // `layer_types` when present ("full_attention" only)

  // --- KSA (docs/ksa.md: Parameters) ---
  bool use_summary_attention = false;
  int64_t summary_chunk_size = 8;  // k
  int64_t summary_token_num = 1;   // S
  int64_t summary_token_begin = 151936;
  TextPositions text_positions = TextPositions::origin;                           // summary_chunk_position_ids_type
  SummaryPositions summary_positions = SummaryPositions::last_chunk_slice_right;  // summary_token_position_ids_type
  bool summary_independent_parameters = true;
  double mix_coeff = 0.0;
  bool summary_independent_attention_layernorm = false;
  std::string window_pattern = "0";  // summary_sliding_chunk_num as written (pattern string, int or list)
  std::vector<int64_t> windows;      // W per layer (parsed by ksa::parse_layer_pattern)
  // Per layer: 1 = summary-attention layer, 0 = plain causal layer in which summary tokens pass through
  // attention and MLP unchanged (the training framework's hybrid). From `summary_layer_freq`: absent or 0 =
  // every layer (when use_summary_attention), int N > 0 = layers with i % N == 0 (the framework's rule),
  // list or pattern string = one 0/1 per layer. All 0 when use_summary_attention is false.
  std::vector<uint8_t> summary_layers;
  int64_t truncate_predict_nums = 151936;  // logits keep the first n entries (<= 0: all)

  // Parses config.json text; `source` names the file in errors ("DIR/config.json: hidden_size: ...").
  // Throws ksa::Error naming the field and the bad value.
  static ModelConfig parse(std::string_view json_text, const std::string& source = "config.json");
  // Reads and parses a file (a directory means DIR/config.json).
  static ModelConfig load(const std::string& path);
  // The released format (docs/ksa.md: Parameters: the window pattern as a string), for the checkpoint writer.
  std::string to_json() const;

  // Cross-field checks (parse calls it). Throws ksa::Error naming the field and the value.
  void validate() const;

  bool is_summary_layer(int64_t layer) const { return use_summary_attention && summary_layers[size_t(layer)] != 0; }
  int64_t num_summary_layers() const;
  // The KSA parameters of one layer (W of that layer).
  Spec layer_spec(int64_t layer) const;
  // Rows of the q, k, v projections.
  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  // Logits the model produces: vocab_size truncated to truncate_predict_nums when that is > 0.
  int64_t logits_size() const {
    return truncate_predict_nums > 0 && truncate_predict_nums < vocab_size ? truncate_predict_nums : vocab_size;
  }
  // Whether the summary q/k/v projections take part (independent parameters and mix_coeff != 0).
  bool uses_summary_projections() const {
    return use_summary_attention && summary_independent_parameters && mix_coeff != 0.0;
  }
  bool uses_summary_layernorm() const { return use_summary_attention && summary_independent_attention_layernorm; }
};

// "([128]*3+[16768]*1)*9"-style compact text of a per-layer list (runs of equal values), for display.
std::string describe_layer_values(const std::vector<int64_t>& values);

}  // namespace ksa
