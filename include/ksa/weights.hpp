// The tensors a Qwen3-KSA checkpoint must hold (docs/ksa.md: The model), as a declarative table (docs/design.md: model
// I/O): name pattern, shape computed from the config, allowed dtypes, and whether the tensor is required, optional
// (used when present) or ignored (accepted, never read) under a given config. check_weights compares a
// checkpoint with the table and reports every problem in one message; bind_weights hands the forward a
// pointer per tensor.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ksa/model_config.hpp"
#include "ksa/safetensors.hpp"

namespace ksa {

enum class TensorUse : uint8_t {
  required,  // must be present
  optional,  // used when present
  ignored,   // accepted when present, never read (e.g. *_proj_summary when mix_coeff = 0, a tied lm_head)
};
const char* to_string(TensorUse u);

// Bit mask of allowed dtypes.
constexpr uint8_t dtype_bit(DType t) { return uint8_t(1u << unsigned(t)); }
constexpr uint8_t kFloatDTypes = dtype_bit(DType::bf16) | dtype_bit(DType::f16) | dtype_bit(DType::f32);
// Weight matrices (projections, embeddings, lm_head) may also be 8-bit (docs/quantization.md); norms may not.
constexpr uint8_t kMatrixDTypes = kFloatDTypes | dtype_bit(DType::q8_0);

struct WeightRule {
  const char* pattern;  // tensor name; "{i}" stands for the layer index in per-layer rules
  bool per_layer;
  std::vector<int64_t> (*shape)(const ModelConfig&);
  TensorUse (*use)(const ModelConfig&, int64_t layer);  // layer = -1 for global rules
  uint8_t dtypes;
};
// The table (docs/ksa.md: The model tensor names).
const std::vector<WeightRule>& weight_rules();

struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
  TensorUse use = TensorUse::required;
  uint8_t dtypes = kFloatDTypes;
  int64_t layer = -1;
};
// The table expanded for a config: every name a checkpoint may hold, in table order, layer by layer.
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& cfg);

// Throws ksa::Error listing every problem, one per line: missing required tensors, unknown extra tensors,
// wrong shapes, disallowed dtypes, and a layer holding only some of its summary projections.
void check_weights(const ModelConfig& cfg, const Checkpoint& ckpt);

// The tensors of one decoder layer; null when absent, or when present but not used under the config.
struct LayerWeights {
  const TensorInfo* input_layernorm = nullptr;          // [hidden]
  const TensorInfo* input_layernorm_summary = nullptr;  // [hidden], when summary_independent_attention_layernorm
  const TensorInfo* q_proj = nullptr;                   // [Hq*D, hidden]
  const TensorInfo* k_proj = nullptr;                   // [Hkv*D, hidden]
  const TensorInfo* v_proj = nullptr;                   // [Hkv*D, hidden]
  const TensorInfo* o_proj = nullptr;                   // [hidden, Hq*D]
  const TensorInfo* q_norm = nullptr;                   // [D]
  const TensorInfo* k_norm = nullptr;                   // [D]
  const TensorInfo* q_proj_summary = nullptr;           // as q_proj, when mix_coeff != 0 and present
  const TensorInfo* k_proj_summary = nullptr;
  const TensorInfo* v_proj_summary = nullptr;
  const TensorInfo* post_attention_layernorm = nullptr;  // [hidden]
  const TensorInfo* gate_proj = nullptr;                 // [intermediate, hidden]
  const TensorInfo* up_proj = nullptr;                   // [intermediate, hidden]
  const TensorInfo* down_proj = nullptr;                 // [hidden, intermediate]
};

struct ModelWeights {
  const TensorInfo* embed_tokens = nullptr;  // [vocab, hidden]
  const TensorInfo* norm = nullptr;          // [hidden]
  const TensorInfo* lm_head = nullptr;       // [vocab, hidden]; = embed_tokens when tie_word_embeddings
  std::vector<LayerWeights> layers;
  int64_t parameters = 0;  // elements of the tensors used (a tied lm_head counted once)
};

// check_weights, then the pointers (valid while `ckpt` lives).
ModelWeights bind_weights(const ModelConfig& cfg, const Checkpoint& ckpt);

// Parameters the config implies (required tensors, plus the optional ones the config uses).
int64_t count_parameters(const ModelConfig& cfg);

}  // namespace ksa
