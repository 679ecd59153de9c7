// The weight table and its checks (see ksa/weights.hpp).
#include "ksa/weights.hpp"

#include <map>
#include <set>

#include "ksa/enum_name.hpp"
#include "ksa/error.hpp"

namespace ksa {

const char* to_string(TensorUse u) { return enum_name(u, {"required", "optional", "ignored"}); }

namespace {

using Shape = std::vector<int64_t>;

Shape vocab_hidden(const ModelConfig& c) { return {c.vocab_size, c.hidden_size}; }
Shape hidden(const ModelConfig& c) { return {c.hidden_size}; }
Shape head(const ModelConfig& c) { return {c.head_dim}; }
Shape q_shape(const ModelConfig& c) { return {c.q_dim(), c.hidden_size}; }
Shape kv_shape(const ModelConfig& c) { return {c.kv_dim(), c.hidden_size}; }
Shape o_shape(const ModelConfig& c) { return {c.hidden_size, c.q_dim()}; }
Shape up_shape(const ModelConfig& c) { return {c.intermediate_size, c.hidden_size}; }
Shape down_shape(const ModelConfig& c) { return {c.hidden_size, c.intermediate_size}; }
Shape inv_freq(const ModelConfig& c) { return {c.head_dim / 2}; }

TensorUse required(const ModelConfig&, int64_t) { return TensorUse::required; }
TensorUse ignored(const ModelConfig&, int64_t) { return TensorUse::ignored; }
TensorUse lm_head_use(const ModelConfig& c, int64_t) {
  return c.tie_word_embeddings ? TensorUse::ignored : TensorUse::required;
}
// docs/ksa.md: The model: summary projections blend in only with mix_coeff != 0, on summary-attention layers.
TensorUse summary_proj_use(const ModelConfig& c, int64_t layer) {
  return c.uses_summary_projections() && c.is_summary_layer(layer) ? TensorUse::optional : TensorUse::ignored;
}
TensorUse summary_norm_use(const ModelConfig& c, int64_t layer) {
  return c.uses_summary_layernorm() && c.is_summary_layer(layer) ? TensorUse::optional : TensorUse::ignored;
}

std::string expand(const char* pattern, int64_t layer) {
  std::string s = pattern;
  const size_t p = s.find("{i}");
  if (p != std::string::npos) s.replace(p, 3, std::to_string(layer));
  return s;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::string dtype_str(DType t) { return t == DType::q8_0 ? "U8 (q8_0)" : safetensors_dtype_name(t); }

std::string dtypes_str(uint8_t mask) {
  std::string r;
  for (DType t : {DType::bf16, DType::f16, DType::f32, DType::q8_0})
    if (mask & dtype_bit(t)) {
      if (!r.empty()) r += '/';
      r += dtype_str(t);
    }
  return r;
}

}  // namespace

const std::vector<WeightRule>& weight_rules() {
  static const std::vector<WeightRule> rules = {
      {"model.embed_tokens.weight", false, vocab_hidden, required, kMatrixDTypes},
      {"model.layers.{i}.input_layernorm.weight", true, hidden, required, kFloatDTypes},
      {"model.layers.{i}.input_layernorm_summary.weight", true, hidden, summary_norm_use, kFloatDTypes},
      {"model.layers.{i}.self_attn.q_proj.weight", true, q_shape, required, kMatrixDTypes},
      {"model.layers.{i}.self_attn.k_proj.weight", true, kv_shape, required, kMatrixDTypes},
      {"model.layers.{i}.self_attn.v_proj.weight", true, kv_shape, required, kMatrixDTypes},
      {"model.layers.{i}.self_attn.o_proj.weight", true, o_shape, required, kMatrixDTypes},
      {"model.layers.{i}.self_attn.q_norm.weight", true, head, required, kFloatDTypes},
      {"model.layers.{i}.self_attn.k_norm.weight", true, head, required, kFloatDTypes},
      {"model.layers.{i}.self_attn.q_proj_summary.weight", true, q_shape, summary_proj_use, kMatrixDTypes},
      {"model.layers.{i}.self_attn.k_proj_summary.weight", true, kv_shape, summary_proj_use, kMatrixDTypes},
      {"model.layers.{i}.self_attn.v_proj_summary.weight", true, kv_shape, summary_proj_use, kMatrixDTypes},
      {"model.layers.{i}.self_attn.rotary_emb.inv_freq", true, inv_freq, ignored, kFloatDTypes},  // older exports
      {"model.layers.{i}.post_attention_layernorm.weight", true, hidden, required, kFloatDTypes},
      {"model.layers.{i}.mlp.gate_proj.weight", true, up_shape, required, kMatrixDTypes},
      {"model.layers.{i}.mlp.up_proj.weight", true, up_shape, required, kMatrixDTypes},
      {"model.layers.{i}.mlp.down_proj.weight", true, down_shape, required, kMatrixDTypes},
      {"model.norm.weight", false, hidden, required, kFloatDTypes},
      {"lm_head.weight", false, vocab_hidden, lm_head_use, kMatrixDTypes},
  };
  return rules;
}

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& cfg) {
  std::vector<ExpectedTensor> out;
  const auto& rules = weight_rules();
  auto add = [&](const WeightRule& r, int64_t layer) {
    out.push_back(ExpectedTensor{expand(r.pattern, layer), r.shape(cfg), r.use(cfg, layer), r.dtypes, layer});
  };
  for (const WeightRule& r : rules)
    if (!r.per_layer && std::string(r.pattern) == "model.embed_tokens.weight") add(r, -1);
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i)
    for (const WeightRule& r : rules)
      if (r.per_layer) add(r, i);
  for (const WeightRule& r : rules)
    if (!r.per_layer && std::string(r.pattern) != "model.embed_tokens.weight") add(r, -1);
  return out;
}

void check_weights(const ModelConfig& cfg, const Checkpoint& ckpt) {
  const std::vector<ExpectedTensor> expected = expected_tensors(cfg);
  std::vector<std::string> problems;
  std::set<std::string> known;
  for (const ExpectedTensor& e : expected) {
    known.insert(e.name);
    const TensorInfo* t = ckpt.find(e.name);
    if (!t) {
      if (e.use == TensorUse::required) problems.push_back("missing tensor " + e.name + " " + shape_str(e.shape));
      continue;
    }
    if (t->shape != e.shape)
      problems.push_back(
          e.name + ": shape " + t->shape_str() + ", expected " + shape_str(e.shape) +
          (t->dtype == DType::q8_0 && e.shape.size() == 2 && e.shape[1] % kQ8_0Block != 0
               ? " (q8_0 needs K a multiple of " + std::to_string(kQ8_0Block) + ": keep this matrix in BF16)"
               : ""));
    if (!(e.dtypes & dtype_bit(t->dtype)))
      problems.push_back(e.name + ": dtype " + dtype_str(t->dtype) + ", expected " + dtypes_str(e.dtypes));
  }
  for (const TensorInfo& t : ckpt.tensors())
    if (!known.count(t.name))
      problems.push_back("unexpected tensor " + t.name + " " + t.shape_str() + " (in " + t.file + ")");
  // The summary projections blend q, k and v together: a layer that uses them needs all three.
  if (cfg.uses_summary_projections()) {
    for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
      if (!cfg.is_summary_layer(i)) continue;
      int have = 0;
      std::string missing;
      for (const char* p : {"q", "k", "v"}) {
        const std::string n = "model.layers." + std::to_string(i) + ".self_attn." + p + "_proj_summary.weight";
        if (ckpt.find(n)) ++have;
        else missing += std::string(missing.empty() ? "" : ", ") + p + "_proj_summary";
      }
      if (have != 0 && have != 3)
        problems.push_back("layer " + std::to_string(i) + ": has some summary projections but not " + missing +
                           " (all three or none)");
    }
  }
  if (problems.empty()) return;
  std::string msg = ckpt.dir() + ": checkpoint does not match config.json (" + std::to_string(problems.size()) +
                    (problems.size() == 1 ? " problem):" : " problems):");
  constexpr size_t kShown = 40;
  for (size_t i = 0; i < problems.size() && i < kShown; ++i) msg += "\n  " + problems[i];
  if (problems.size() > kShown) msg += "\n  ... and " + std::to_string(problems.size() - kShown) + " more";
  throw Error(msg);
}

ModelWeights bind_weights(const ModelConfig& cfg, const Checkpoint& ckpt) {
  check_weights(cfg, ckpt);
  ModelWeights w;
  auto used = [&](const ExpectedTensor& e) -> const TensorInfo* {
    return e.use == TensorUse::ignored ? nullptr : ckpt.find(e.name);
  };
  w.layers.resize(size_t(cfg.num_hidden_layers));
  for (const ExpectedTensor& e : expected_tensors(cfg)) {
    const TensorInfo* t = used(e);
    if (t) w.parameters += t->numel();
    if (e.layer < 0) {
      if (e.name == "model.embed_tokens.weight") w.embed_tokens = t;
      else if (e.name == "model.norm.weight") w.norm = t;
      else if (e.name == "lm_head.weight") w.lm_head = t;
      continue;
    }
    LayerWeights& L = w.layers[size_t(e.layer)];
    const std::string prefix = "model.layers." + std::to_string(e.layer) + ".";
    const std::string n = e.name.substr(prefix.size());
    const std::map<std::string, const TensorInfo**> slots = {
        {"input_layernorm.weight", &L.input_layernorm},
        {"input_layernorm_summary.weight", &L.input_layernorm_summary},
        {"self_attn.q_proj.weight", &L.q_proj},
        {"self_attn.k_proj.weight", &L.k_proj},
        {"self_attn.v_proj.weight", &L.v_proj},
        {"self_attn.o_proj.weight", &L.o_proj},
        {"self_attn.q_norm.weight", &L.q_norm},
        {"self_attn.k_norm.weight", &L.k_norm},
        {"self_attn.q_proj_summary.weight", &L.q_proj_summary},
        {"self_attn.k_proj_summary.weight", &L.k_proj_summary},
        {"self_attn.v_proj_summary.weight", &L.v_proj_summary},
        {"post_attention_layernorm.weight", &L.post_attention_layernorm},
        {"mlp.gate_proj.weight", &L.gate_proj},
        {"mlp.up_proj.weight", &L.up_proj},
        {"mlp.down_proj.weight", &L.down_proj},
    };
    auto it = slots.find(n);
    if (it != slots.end()) *it->second = t;
  }
  if (cfg.tie_word_embeddings) w.lm_head = w.embed_tokens;
  return w;
}

int64_t count_parameters(const ModelConfig& cfg) {
  int64_t n = 0;
  for (const ExpectedTensor& e : expected_tensors(cfg)) {
    if (e.use == TensorUse::ignored) continue;
    int64_t x = 1;
    for (int64_t d : e.shape) x *= d;
    n += x;
  }
  return n;
}

}  // namespace ksa
