// `ksa info`: what this build and machine can do, and the KSA arithmetic for a configuration; with -m, a
// summary of a checkpoint directory (config, weights, tokenizer) and its KV-cache arithmetic.
#include <cstdio>
#include <filesystem>
#include <map>
#include <thread>

#include "common.hpp"
#include "ksa/chat_template.hpp"
#include "ksa/dense.hpp"
#include "ksa/model_config.hpp"
#include "ksa/safetensors.hpp"
#include "ksa/spec.hpp"
#include "ksa/tokenizer.hpp"
#include "ksa/weights.hpp"
#ifdef KSA_HAVE_CUDA
#include "ksa/cuda.hpp"
#endif

namespace ksa::tools {
namespace {

// "0-2, 4-6, 8" for a sorted list of layer indices.
std::string ranges(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(v[i]);
    if (j > i) {
      s += '-';
      s += std::to_string(v[j]);
    }
    i = j + 1;
  }
  return s;
}

std::string with_commas(int64_t x) {
  std::string d = std::to_string(x), out;
  for (size_t i = 0; i < d.size(); ++i) {
    if (i && (d.size() - i) % 3 == 0) out += ',';
    out += d[i];
  }
  return out;
}

// KV-cache rows of one layer at T text tokens (docs/ksa.md: The compressed cache): a summary layer keeps its window,
// the current chunk and the summaries (those only when they can become visible, W*k < T); a plain layer keeps all text.
int64_t layer_cache_rows(const ModelConfig& c, int64_t layer, int64_t T) {
  if (!c.is_summary_layer(layer)) return T;
  const Spec s = c.layer_spec(layer);
  return cache_rows(s, T, s.W * s.chunk_size < T).total();
}

int info_model(const std::string& dir) {
  const ModelConfig c = ModelConfig::load(dir);
  const Checkpoint ckpt = Checkpoint::open(dir);
  const ModelWeights w = bind_weights(c, ckpt);

  std::printf("model: %s\n", dir.c_str());
  std::printf(
      "  architecture: %s%s, %lld layers, hidden %lld, intermediate %lld, heads %lld/%lld (GQA %lld), head_dim %lld\n",
      c.model_type.c_str(), c.use_summary_attention ? " + KSA" : " (summary attention off)",
      (long long)c.num_hidden_layers, (long long)c.hidden_size, (long long)c.intermediate_size,
      (long long)c.num_attention_heads, (long long)c.num_key_value_heads,
      (long long)(c.num_attention_heads / c.num_key_value_heads), (long long)c.head_dim);
  std::printf("  vocab %lld (logits %lld), %s embeddings, %s, rope_theta %g, max positions %lld, rms_norm_eps %g\n",
              (long long)c.vocab_size, (long long)c.logits_size(), c.tie_word_embeddings ? "tied" : "untied",
              dtype_name(c.dtype), c.rope_theta, (long long)c.max_position_embeddings, c.rms_norm_eps);
  if (c.use_summary_attention) {
    std::printf("  KSA: k=%lld S=%lld, summary ids %lld..%lld, text positions %s, summary positions %s\n",
                (long long)c.summary_chunk_size, (long long)c.summary_token_num, (long long)c.summary_token_begin,
                (long long)(c.summary_token_begin + c.summary_token_num - 1), to_string(c.text_positions),
                to_string(c.summary_positions));
    std::printf("       independent parameters %s, mix_coeff %g (summary projections %s), independent layernorm %s\n",
                c.summary_independent_parameters ? "yes" : "no", c.mix_coeff,
                c.uses_summary_projections() ? (w.layers[0].q_proj_summary ? "used" : "absent, skipped") : "unused",
                c.uses_summary_layernorm() ? "yes" : "no");
  }
  std::printf("  parameters: %s (%zu tensors, %s in %zu file%s)\n", with_commas(w.parameters).c_str(),
              ckpt.tensors().size(), human_bytes(double(ckpt.total_bytes())).c_str(), ckpt.files().size(),
              ckpt.files().size() == 1 ? "" : "s");
  const std::string format = describe_weight_format(ckpt);
  std::printf(
      "  weights: %s%s\n", format.c_str(),
      format.rfind("q8_0", 0) == 0 ? ": 8-bit matrices, run by the CPU engine only (docs/quantization.md)" : "");

  // Per-layer windows, grouped by value.
  std::printf("  layers: summary_sliding_chunk_num = \"%s\"\n", c.window_pattern.c_str());
  std::map<int64_t, std::vector<int64_t>> by_w;
  std::vector<int64_t> plain;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    if (c.is_summary_layer(i)) by_w[c.windows[size_t(i)]].push_back(i);
    else plain.push_back(i);
  }
  for (const auto& [W, layers] : by_w)
    std::printf("    W=%-7lld (%s text tokens seen as text): layers %s\n", (long long)W,
                with_commas(W * c.summary_chunk_size).c_str(), ranges(layers).c_str());
  if (!plain.empty())
    std::printf("    plain causal attention%s: layers %s\n",
                c.use_summary_attention ? " (summary tokens pass through)" : "", ranges(plain).c_str());

  // KV cache: K and V of every KV head, in the model's dtype.
  const int64_t row_bytes = 2 * c.num_key_value_heads * c.head_dim * dtype_size(c.dtype);
  std::printf("  KV cache (%s, %lld bytes per token per layer):\n", dtype_name(c.dtype), (long long)row_bytes);
  std::printf("    %8s %14s %14s %16s %16s %7s\n", "context", "full attention", "KSA", "full bytes/token",
              "KSA bytes/token", "ratio");
  for (int64_t T : {8192, 32768, 131072}) {
    int64_t full = 0, ksa = 0;
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      full += T;
      ksa += layer_cache_rows(c, i, T);
    }
    std::printf("    %7lldK %14s %14s %16lld %16.0f %6.2fx\n", (long long)(T / 1024),
                human_bytes(double(full * row_bytes)).c_str(), human_bytes(double(ksa * row_bytes)).c_str(),
                (long long)(full * row_bytes / T), double(ksa * row_bytes) / double(T), double(full) / double(ksa));
  }

  const std::filesystem::path tj = std::filesystem::path(dir) / "tokenizer.json";
  if (std::filesystem::exists(tj)) {
    const Tokenizer tok = Tokenizer::load(tj.string());
    std::printf("  tokenizer: vocabulary %lld (%lld merges, %zu added tokens)\n", (long long)tok.vocab_size(),
                (long long)tok.num_merges(), tok.added_tokens().size());
    const std::filesystem::path tc = std::filesystem::path(dir) / "tokenizer_config.json";
    if (std::filesystem::exists(tc)) {
      const ChatTemplate t = ChatTemplate::load(tc.string());
      std::printf("  chat template: %s\n",
                  t.recognized() ? "Qwen3 (rendered exactly)" : "not the known Qwen3 template (rendered as Qwen3's)");
    }
  } else {
    std::printf("  tokenizer: none (%s has no tokenizer.json)\n", dir.c_str());
  }
  return 0;
}

int run_info(int argc, char** argv) {
  cli::Flags f("info",
               "Build and machine capabilities, and KSA's visible pairs and KV-cache rows for a configuration.");
  int64_t& k = f.i64("-k,--chunk", 8, "k: text tokens per chunk", 1, Spec::kMaxChunk);
  int64_t& S = f.i64("-S,--summaries", 1, "S: summary tokens per chunk", 1, Spec::kMaxSummaries);
  int64_t& W = f.i64("-W,--window", 128, "W: window in chunks", 0, Spec::kMaxWindow);
  std::string& model =
      f.str("-m,--model", "", "a checkpoint directory: architecture, parameters, windows, KV cache, tokenizer");
  if (!f.parse(argc, argv)) return 0;
  model = model_dir_arg(model);
  if (!model.empty()) return info_model(model);
  Spec spec;
  spec.chunk_size = k;
  spec.S = S;
  spec.W = W;
  spec.validate();

  std::printf("ksa %s\n", cli::version());
#if defined(__x86_64__) || defined(__i386__)
  std::printf("cpu:   %u hardware threads; avx2 %s, avx512f %s, avx512bf16 %s; SIMD kernels: %s; bf16 products: %s\n",
              std::thread::hardware_concurrency(), __builtin_cpu_supports("avx2") ? "yes" : "no",
              __builtin_cpu_supports("avx512f") ? "yes" : "no", __builtin_cpu_supports("avx512bf16") ? "yes" : "no",
              cpu::simd_target(), cpu::bf16_products() ? "bf16 dot (x rounded to bf16)" : "fp32 (widened weights, sgemm)");
#else
  std::printf("cpu:   %u hardware threads; SIMD kernels: %s\n", std::thread::hardware_concurrency(),
              cpu::simd_target());
#endif
#ifdef KSA_HAVE_CUDA
  const int n = cuda::device_count();
  if (n > 0) std::printf("cuda:  built; %d device(s), %s\n", n, cuda::device_description().c_str());
  else std::printf("cuda:  built; no device visible\n");
#else
  std::printf("cuda:  not built (nvcc not found or KSA_CUDA=OFF)\n");
#endif
  std::printf("\nKSA k=%lld S=%lld W=%lld (per head, one layer):\n", (long long)k, (long long)S, (long long)W);
  std::printf("  %10s %16s %16s %8s %14s %14s\n", "T", "visible pairs", "causal pairs", "ratio", "cache rows",
              "full rows");
  for (int64_t T : {8192, 32768, 131072}) {
    const Layout lay = Layout::of(spec, T);
    const int64_t p = count_visible_pairs(lay, W), c = count_causal_pairs(T);
    std::printf("  %10lld %16lld %16lld %7.2fx %14lld %14lld\n", (long long)T, (long long)p, (long long)c,
                double(c) / double(p), (long long)cache_rows(spec, T).total(), (long long)T);
  }
  return 0;
}

cli::Register reg{{"info", "build, machine and KSA arithmetic", run_info}};

}  // namespace
}  // namespace ksa::tools
