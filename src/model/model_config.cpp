// config.json -> ksa::ModelConfig (see ksa/model_config.hpp for the defaults and accepted variants).
#include "ksa/model_config.hpp"

#include <cmath>
#include <filesystem>

#include "json_fields.hpp"
#include "ksa/enum_name.hpp"
#include "ksa/error.hpp"
#include "ksa/pattern.hpp"

namespace ksa {
namespace {

using detail::Fields;
using detail::Json;

constexpr int64_t kMaxDim = int64_t(1) << 20;
constexpr int64_t kMaxLayers = 4096;
constexpr int64_t kMaxVocab = (int64_t(1) << 31) - 1;
// The context is a count of int32-addressable rows everywhere downstream: the KV cache takes at most
// 2^31-1 text tokens, the GPU layouts index the stream in 32 bits, and plain Qwen3 runs as one chunk of
// k = context + 1 tokens, so every later product or sum stays far inside int64.
constexpr int64_t kMaxContext = (int64_t(1) << 31) - 1;

// q8_0 is a weight storage type, never a config dtype.
const char* dtype_hf_name(DType t) { return enum_name(t, {"float32", "bfloat16", "float16", "?"}); }

// `rope_scaling` / `rope_parameters`: only the default (unscaled) RoPE is supported.
void check_rope_type(const Fields& f, const char* key, const Json& obj) {
  if (obj.is_null()) return;
  if (!obj.is_object()) f.bad(key, "null or an object", obj);
  const Fields r(obj, f.source(), key);
  std::string type = r.string("rope_type", "");
  if (type.empty()) type = r.string("type", "default");
  if (type != "default")
    f.bad_value(key, "RoPE type \"" + type + "\" is not supported (only the default, unscaled RoPE)");
}

// summary_sliding_chunk_num as pattern text: int, list or string (docs/ksa.md: Parameters).
std::string window_text(const Fields& f, const char* key) {
  const Json* v = f.get(key);
  if (!v) return "0";
  if (v->is_string()) return v->get<std::string>();
  if (v->is_number_integer() || v->is_array()) return v->dump();
  f.bad(key, "an integer, a list or a pattern string", *v);
}

// summary_layer_freq (see ModelConfig::summary_layers).
std::vector<uint8_t> summary_layer_flags(const Fields& f, int64_t L, bool use_summary) {
  const char* key = "summary_layer_freq";
  const std::string field = f.source() + ": " + key;
  const Json* v = f.get(key);
  // Absent, 0, false, [] and "" all mean "every layer" (the release tests the value's truthiness).
  const bool falsy = !v || (v->is_boolean() && !v->get<bool>()) || (v->is_number_integer() && v->get<int64_t>() == 0) ||
                     (v->is_array() && v->empty()) || (v->is_string() && v->get<std::string>().empty());
  auto every_nth = [&](int64_t n) {
    std::vector<int64_t> out(static_cast<size_t>(L));
    for (int64_t i = 0; i < L; ++i) out[size_t(i)] = n == 0 ? 1 : (i % n == 0);
    return out;
  };
  std::vector<int64_t> flags;
  if (falsy) {
    flags = every_nth(0);
  } else if (v->is_number_integer()) {
    const int64_t n = f.to_int(key, *v);
    if (n < 0) f.bad(key, "0 (every layer), a positive period, a list or a pattern string", *v);
    flags = every_nth(n);
  } else if (v->is_array()) {
    flags = parse_int_pattern(v->dump(), L, field.c_str(), 0, 1);
  } else if (v->is_string()) {
    const std::string s = v->get<std::string>();
    if (s.find('[') != std::string::npos) flags = parse_int_pattern(s, L, field.c_str(), 0, 1);
    else flags = every_nth(parse_int_pattern(s, 1, field.c_str(), 0, kMaxLayers)[0]);
  } else {
    f.bad(key, "an integer, a list of 0/1 or a pattern string", *v);
  }
  std::vector<uint8_t> out(flags.size());
  for (size_t i = 0; i < flags.size(); ++i) out[i] = uint8_t(flags[i] != 0);
  if (!use_summary) {
    // The release builds a summary layer only when use_summary_attention is true.
    if (!falsy)
      for (size_t i = 0; i < out.size(); ++i)
        if (out[i])
          f.bad_value(key, "layer " + std::to_string(i) + " is a summary layer but use_summary_attention is false");
    std::fill(out.begin(), out.end(), uint8_t(0));
  }
  return out;
}

}  // namespace

ModelConfig ModelConfig::parse(std::string_view json_text, const std::string& source) {
  const Json j = detail::parse_json(json_text, source);
  const Fields f(j, source);
  ModelConfig c;

  c.model_type = f.string("model_type", "qwen3");
  if (c.model_type != "qwen3")
    f.bad_value("model_type", "\"" + c.model_type + "\" is not supported (only \"qwen3\", with or without KSA)");
  if (const Json* a = f.get("architectures")) {
    if (!a->is_array()) f.bad("architectures", "a list", *a);
  }
  const std::string act = f.string("hidden_act", "silu");
  if (act != "silu") f.bad_value("hidden_act", "\"" + act + "\" is not supported (only \"silu\")");
  if (f.boolean("attention_bias", false))
    f.bad_value("attention_bias", "true is not supported (Qwen3 has no q/k/v biases)");
  if (f.boolean("use_sliding_window", false))
    f.bad_value("use_sliding_window",
                "true is not supported (token sliding windows; KSA's window is summary_sliding_chunk_num)");

  c.hidden_size = f.integer("hidden_size");
  c.intermediate_size = f.integer("intermediate_size");
  c.num_hidden_layers = f.integer("num_hidden_layers");
  c.num_attention_heads = f.integer("num_attention_heads");
  c.num_key_value_heads = f.integer("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads >= 1 && c.hidden_size >= 1)
    c.head_dim = f.integer("head_dim", c.hidden_size / c.num_attention_heads);
  else c.head_dim = f.integer("head_dim", 0);
  c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  c.max_position_embeddings = f.integer("max_position_embeddings", 32768);
  c.vocab_size = f.integer("vocab_size");
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.bos_token_id = f.integer("bos_token_id", -1);
  if (const Json* e = f.get("eos_token_id")) {
    if (e->is_array()) {
      for (const Json& x : *e) c.eos_token_ids.push_back(f.to_int("eos_token_id", x));
    } else {
      c.eos_token_ids.push_back(f.to_int("eos_token_id", *e));
    }
  }

  // RoPE: newer transformers write rope_parameters {rope_theta, rope_type}.
  if (const Json* rp = f.get("rope_parameters")) {
    check_rope_type(f, "rope_parameters", *rp);
    const Fields r(*rp, source, "rope_parameters");
    c.rope_theta = r.number("rope_theta", f.number("rope_theta", 10000.0));
  } else {
    c.rope_theta = f.number("rope_theta", 10000.0);
  }
  if (const Json* rs = f.get("rope_scaling")) check_rope_type(f, "rope_scaling", *rs);

  // dtype: `torch_dtype` (older) or `dtype` (newer).
  const char* dkey = f.has("torch_dtype") ? "torch_dtype" : "dtype";
  if (f.has(dkey)) {
    const std::string s = f.string(dkey, "");
    if (!parse_dtype(s, c.dtype)) f.bad_value(dkey, "\"" + s + "\" is not supported (bfloat16, float16 or float32)");
  }

  if (const Json* lt = f.get("layer_types")) {
    if (!lt->is_array()) f.bad("layer_types", "a list of strings", *lt);
    for (const Json& x : *lt) {
      if (!x.is_string()) f.bad("layer_types", "a list of strings", x);
      c.layer_types.push_back(x.get<std::string>());
    }
  }

  // KSA
  c.use_summary_attention = f.boolean("use_summary_attention", false);
  c.summary_chunk_size = f.integer("summary_chunk_size", 8);
  c.summary_token_num = f.integer("summary_token_num", 1);
  c.summary_token_begin = f.integer("summary_token_begin", 151936);
  const std::string text_pos = f.string("summary_chunk_position_ids_type", "origin");
  const std::string summary_pos = f.string("summary_token_position_ids_type", "last_chunk_slice_right");
  try {
    c.text_positions = parse_text_positions(text_pos);
    c.summary_positions = parse_summary_positions(summary_pos);
  } catch (const Error& e) {
    fail(source, ": ", e.what());
  }
  c.summary_independent_parameters = f.boolean("summary_independent_parameters", true);
  c.mix_coeff = f.number("mix_coeff", 0.0);
  c.summary_independent_attention_layernorm = f.boolean("summary_independent_attention_layernorm", false);
  c.truncate_predict_nums = f.integer("truncate_predict_nums", 151936);

  // Shapes must be sane before the per-layer patterns are expanded.
  require(c.num_hidden_layers >= 1 && c.num_hidden_layers <= kMaxLayers, (source + ": num_hidden_layers").c_str(),
          "in [1, 4096]", c.num_hidden_layers);
  c.window_pattern = window_text(f, "summary_sliding_chunk_num");
  try {
    c.windows = parse_layer_pattern(c.window_pattern, c.num_hidden_layers);
  } catch (const Error& e) {
    fail(source, ": ", e.what());
  }
  c.summary_layers = summary_layer_flags(f, c.num_hidden_layers, c.use_summary_attention);

  try {
    c.validate();
  } catch (const Error& e) {
    fail(source, ": ", e.what());
  }
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) {
  // A directory, or anything not naming a .json file, means DIR/config.json.
  std::string p = path;
  const bool json_file = p.size() > 5 && p.compare(p.size() - 5, 5, ".json") == 0;
  std::error_code ec;  // a path that cannot be stat'ed is left to the open's error
  if (std::filesystem::is_directory(p, ec) || !json_file) p = (std::filesystem::path(p) / "config.json").string();
  return parse(detail::read_text_file(p, "config.json"), p);
}

void ModelConfig::validate() const {
  require(hidden_size >= 1 && hidden_size <= kMaxDim, "hidden_size", "in [1, 2^20]", hidden_size);
  require(intermediate_size >= 1 && intermediate_size <= kMaxDim, "intermediate_size", "in [1, 2^20]",
          intermediate_size);
  require(num_hidden_layers >= 1 && num_hidden_layers <= kMaxLayers, "num_hidden_layers", "in [1, 4096]",
          num_hidden_layers);
  require(num_attention_heads >= 1 && num_attention_heads <= 4096, "num_attention_heads", "in [1, 4096]",
          num_attention_heads);
  require(num_key_value_heads >= 1 && num_attention_heads % num_key_value_heads == 0, "num_key_value_heads",
          ("a divisor of num_attention_heads=" + std::to_string(num_attention_heads)).c_str(), num_key_value_heads);
  require(head_dim >= 2 && head_dim <= 1024 && head_dim % 2 == 0, "head_dim", "even and in [2, 1024]", head_dim);
  require(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, "rms_norm_eps", "> 0", rms_norm_eps);
  require(std::isfinite(rope_theta) && rope_theta > 0, "rope_theta", "> 0", rope_theta);
  require(rope_type == "default", "rope_type", "\"default\"", rope_type);
  require(max_position_embeddings >= 1 && max_position_embeddings <= kMaxContext, "max_position_embeddings",
          "in [1, 2^31-1]", max_position_embeddings);
  require(vocab_size >= 1 && vocab_size <= kMaxVocab, "vocab_size", "in [1, 2^31-1]", vocab_size);
  require(bos_token_id >= -1 && bos_token_id < vocab_size, "bos_token_id", "a token id < vocab_size", bos_token_id);
  for (int64_t e : eos_token_ids) require(e >= 0 && e < vocab_size, "eos_token_id", "a token id < vocab_size", e);
  if (!layer_types.empty()) {
    if (int64_t(layer_types.size()) != num_hidden_layers)
      fail("layer_types: has ", layer_types.size(), " entries but the model has ", num_hidden_layers, " layers");
    for (size_t i = 0; i < layer_types.size(); ++i)
      if (layer_types[i] != "full_attention")
        fail("layer_types: layer ", i, " is \"", layer_types[i], "\"; only \"full_attention\" is supported");
  }
  if (int64_t(windows.size()) != num_hidden_layers)
    fail("summary_sliding_chunk_num: has ", windows.size(), " entries but the model has ", num_hidden_layers,
         " layers");
  if (int64_t(summary_layers.size()) != num_hidden_layers)
    fail("summary_layer_freq: has ", summary_layers.size(), " entries but the model has ", num_hidden_layers,
         " layers");
  require(truncate_predict_nums >= 0, "truncate_predict_nums", ">= 0", truncate_predict_nums);
  if (!std::isfinite(mix_coeff) || mix_coeff < 0 || mix_coeff > 1)
    fail("mix_coeff: must be in [0, 1] (got ", mix_coeff, ")");
  if (use_summary_attention) {
    Spec s = layer_spec(0);
    s.validate();
    if (summary_token_begin + summary_token_num > vocab_size)
      fail("summary_token_begin: summary ids ", summary_token_begin, "..", summary_token_begin + summary_token_num - 1,
           " need vocab_size >= ", summary_token_begin + summary_token_num, " (got vocab_size ", vocab_size, ")");
  }
}

int64_t ModelConfig::num_summary_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < num_hidden_layers; ++i) n += is_summary_layer(i);
  return n;
}

Spec ModelConfig::layer_spec(int64_t layer) const {
  if (layer < 0 || layer >= num_hidden_layers) fail("layer: must be in [0, ", num_hidden_layers, ") (got ", layer, ")");
  Spec s;
  s.chunk_size = summary_chunk_size;
  s.S = summary_token_num;
  s.W = windows.empty() ? 0 : windows[size_t(layer)];
  s.text_positions = text_positions;
  s.summary_positions = summary_positions;
  s.summary_token_begin = summary_token_begin;
  return s;
}

std::string ModelConfig::to_json() const {
  nlohmann::ordered_json j;
  j["architectures"] = {"Qwen3ForCausalLM"};
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  else if (!eos_token_ids.empty()) j["eos_token_id"] = eos_token_ids;
  j["head_dim"] = head_dim;
  j["hidden_act"] = "silu";
  j["hidden_size"] = hidden_size;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = intermediate_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["max_window_layers"] = num_hidden_layers;
  j["mix_coeff"] = mix_coeff;
  j["model_type"] = model_type;
  j["num_attention_heads"] = num_attention_heads;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_key_value_heads"] = num_key_value_heads;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_scaling"] = nullptr;
  if (rope_theta == std::floor(rope_theta) && rope_theta < 1e15) j["rope_theta"] = int64_t(rope_theta);
  else j["rope_theta"] = rope_theta;
  j["sliding_window"] = nullptr;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = dtype_hf_name(dtype);
  j["transformers_version"] = "4.51.0";
  j["use_cache"] = true;
  j["use_sliding_window"] = false;
  j["vocab_size"] = vocab_size;
  j["summary_token_begin"] = summary_token_begin;
  j["summary_chunk_size"] = summary_chunk_size;
  j["summary_token_num"] = summary_token_num;
  j["use_summary_attention"] = use_summary_attention;
  j["summary_sliding_chunk_num"] = window_pattern;  // the released form: a pattern string
  bool all_summary = true;
  for (uint8_t x : summary_layers) all_summary = all_summary && x;
  if (use_summary_attention && !all_summary) {
    std::vector<int64_t> v(summary_layers.begin(), summary_layers.end());
    j["summary_layer_freq"] = describe_layer_values(v);
  }
  j["summary_chunk_position_ids_type"] = to_string(text_positions);
  j["summary_token_position_ids_type"] = to_string(summary_positions);
  j["summary_independent_parameters"] = summary_independent_parameters;
  j["summary_independent_attention_layernorm"] = summary_independent_attention_layernorm;
  j["summary_attention_mode"] = "kernel";
  if (truncate_predict_nums != 151936) j["truncate_predict_nums"] = truncate_predict_nums;
  j["auto_map"] = {{"AutoModel", "modeling_qwen3sa.Qwen3Model"},
                   {"AutoModelForCausalLM", "modeling_qwen3sa.Qwen3ForCausalLM"}};
  return j.dump(2) + "\n";
}

std::string describe_layer_values(const std::vector<int64_t>& v) {
  const size_t n = v.size();
  if (n == 0) return "[]";
  // Smallest period p (dividing n) with v[i] == v[i - p].
  size_t period = n;
  for (size_t p = 1; p < n; ++p) {
    if (n % p) continue;
    bool ok = true;
    for (size_t i = p; i < n && ok; ++i) ok = v[i] == v[i - p];
    if (ok) {
      period = p;
      break;
    }
  }
  std::string runs;
  int parts = 0;
  for (size_t i = 0; i < period;) {
    size_t j = i;
    while (j < period && v[j] == v[i]) ++j;
    if (!runs.empty()) runs += "+";
    runs += detail::cat("[", v[i], "]*", j - i);
    ++parts;
    i = j;
  }
  if (period == n) return runs;
  if (parts == 1 && period == 1) return detail::cat("[", v[0], "]*", n);
  return detail::cat("(", runs, ")*", n / period);
}

}  // namespace ksa
