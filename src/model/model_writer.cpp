// Random-weight checkpoints (see ksa/model_writer.hpp).
#include "ksa/model_writer.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include "core/splitmix.hpp"
#include "ksa/error.hpp"
#include "ksa/pattern.hpp"
#include "ksa/safetensors.hpp"
#include "ksa/weights.hpp"

namespace ksa {
namespace {

namespace fs = std::filesystem;

using detail::splitmix64;

uint64_t hash_name(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// Element i of a tensor: center + uniform(-a, a) with a = sd * sqrt(3), from a counter-based generator so
// that any slice can be produced independently.
struct UniformInit {
  uint64_t key;
  float center, half_width;
  DType dtype;
  void operator()(int64_t first, int64_t n, void* dst) const {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t r = splitmix64(key ^ splitmix64(uint64_t(first + i)));
      const float u = float(double(r >> 11) * (1.0 / 9007199254740992.0)) * 2.f - 1.f;  // [-1, 1)
      store_from_float(dtype, dst, i, center + half_width * u);
    }
  }
};

void set_windows(ModelConfig& c, const std::string& pattern) {
  c.window_pattern = pattern;
  c.windows = parse_layer_pattern(pattern, c.num_hidden_layers);
  c.summary_layers.assign(size_t(c.num_hidden_layers), 1);
}

void copy_into(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
  if (ec) fail(to.string(), ": cannot copy from ", from.string(), ": ", ec.message());
}

}  // namespace

ModelConfig model_shape_config(const std::string& shape) {
  ModelConfig c;
  c.vocab_size = 151937;  // Qwen3's 151936 rows plus the summary token's
  c.bos_token_id = 151643;
  c.eos_token_ids = {151643};
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 1000000;
  c.use_summary_attention = true;
  c.summary_chunk_size = 8;
  c.summary_token_num = 1;
  c.summary_token_begin = 151936;
  c.summary_independent_parameters = true;
  c.dtype = DType::bf16;
  // The shapes that differ, one row each; `small` has a head dim the CUDA kernels take (64 or 128), so it
  // runs on both engines.
  struct Preset {
    const char* name;
    int64_t hidden, intermediate, layers, heads, kv_heads, head_dim, max_positions;
    bool tie_embeddings;
    double mix_coeff;
    bool summary_layernorm;
    const char* windows;
  };
  static constexpr Preset kPresets[] = {
      {"tiny", 64, 192, 4, 4, 2, 16, 4096, true, 0.5, true, "([2]*3+[64]*1)*1"},
      {"small", 256, 768, 8, 8, 4, 64, 32768, false, 0.0, false, "([16]*3+[512]*1)*2"},
      {"4b", 2560, 9728, 36, 32, 8, 128, 131072, true, 0.0, false, "([128]*3+[16768]*1)*9"},
  };
  const auto it =
      std::find_if(std::begin(kPresets), std::end(kPresets), [&](const Preset& p) { return shape == p.name; });
  if (it == std::end(kPresets)) fail("shape: must be tiny, small or 4b (got \"", shape, "\")");
  c.hidden_size = it->hidden;
  c.intermediate_size = it->intermediate;
  c.num_hidden_layers = it->layers;
  c.num_attention_heads = it->heads;
  c.num_key_value_heads = it->kv_heads;
  c.head_dim = it->head_dim;
  c.max_position_embeddings = it->max_positions;
  c.tie_word_embeddings = it->tie_embeddings;
  c.mix_coeff = it->mix_coeff;
  c.summary_independent_attention_layernorm = it->summary_layernorm;
  set_windows(c, it->windows);
  c.validate();
  return c;
}

WrittenModel write_random_model(const ModelConfig& cfg, const std::string& dir, const RandomModelOptions& opt) {
  cfg.validate();
  if (opt.max_shard_bytes < 1) fail("max_shard_bytes: must be >= 1 (got ", opt.max_shard_bytes, ")");
  if (!opt.tokenizer_dir.empty() && !fs::exists(fs::path(opt.tokenizer_dir) / "tokenizer.json"))
    fail(opt.tokenizer_dir, ": has no tokenizer.json to copy");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir, ": cannot create the directory: ", ec.message());

  SafetensorsWriter w;
  // UniformInit is counter-based: any range can be filled on its own, so all cores fill (a 4B checkpoint's
  // 8 GB of random numbers take minutes on one core).
  w.set_fill_threads(int(std::max(1u, std::thread::hardware_concurrency())));
  w.set_metadata("format", "pt");
  WrittenModel out;
  const double residual_scale = 1.0 / std::sqrt(2.0 * double(cfg.num_hidden_layers));
  for (const ExpectedTensor& e : expected_tensors(cfg)) {
    const bool is_summary_proj = e.name.find("_proj_summary") != std::string::npos;
    if (e.name.find("rotary_emb") != std::string::npos) continue;
    if (e.name == "lm_head.weight" && cfg.tie_word_embeddings) continue;
    if (is_summary_proj && !(opt.summary_projections && cfg.use_summary_attention &&
                             cfg.summary_independent_parameters && (e.layer < 0 || cfg.is_summary_layer(e.layer))))
      continue;
    if (e.name.find("input_layernorm_summary") != std::string::npos && !cfg.uses_summary_layernorm()) continue;
    float center = 0.f, sd;
    if (e.shape.size() == 1) {  // norm weights: near 1
      center = 1.f;
      sd = 0.05f;
    } else if (e.name == "model.embed_tokens.weight") {
      sd = 0.02f;
    } else {
      sd = float(1.0 / std::sqrt(double(e.shape[1])));
      if (e.name.find("o_proj") != std::string::npos || e.name.find("down_proj") != std::string::npos)
        sd *= float(residual_scale);
    }
    int64_t n = 1;
    for (int64_t d : e.shape) n *= d;
    out.parameters += n;
    out.bytes += n * dtype_size(opt.dtype);
    w.add(e.name, opt.dtype, e.shape,
          UniformInit{splitmix64(opt.seed ^ hash_name(e.name)), center, sd * std::sqrt(3.f), opt.dtype});
  }
  out.files = w.write_checkpoint(dir, opt.max_shard_bytes);

  ModelConfig c = cfg;
  c.dtype = opt.dtype;
  const fs::path cfg_path = fs::path(dir) / "config.json";
  {
    std::ofstream f(cfg_path, std::ios::trunc);
    f << c.to_json();
    if (!f) fail(cfg_path.string(), ": write error");
  }
  out.files.push_back(cfg_path.string());
  const fs::path gen_path = fs::path(dir) / "generation_config.json";
  {
    std::ofstream f(gen_path, std::ios::trunc);
    f << "{\n  \"bos_token_id\": " << (cfg.bos_token_id >= 0 ? cfg.bos_token_id : 151643)
      << ",\n  \"eos_token_id\": " << (cfg.eos_token_ids.empty() ? 151643 : cfg.eos_token_ids[0])
      << ",\n  \"transformers_version\": \"4.51.0\"\n}\n";
    if (!f) fail(gen_path.string(), ": write error");
  }
  out.files.push_back(gen_path.string());

  if (!opt.tokenizer_dir.empty()) {
    const fs::path src(opt.tokenizer_dir);
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
      if (!fs::exists(src / name)) continue;
      copy_into(src / name, fs::path(dir) / name);
      out.files.push_back((fs::path(dir) / name).string());
    }
    out.tokenizer_copied = true;
  }
  return out;
}

}  // namespace ksa
