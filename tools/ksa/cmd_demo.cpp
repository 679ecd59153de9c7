// `ksa demo`: KSA attention on a synthetic sequence on the CPU, checked against the oracle on sampled rows.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "common.hpp"
#include "ksa/cache.hpp"
#include "ksa/cpu.hpp"
#include "ksa/spec.hpp"

namespace ksa::tools {
namespace {

int run_demo(int argc, char** argv) {
  cli::Flags f("demo",
               "KSA attention (one layer, random q/k/v) over a synthetic text on the CPU: times the fast forward,\n"
               "checks sampled rows against the double-precision oracle, and prints visible pairs and KV-cache\n"
               "bytes against full causal attention.");
  int64_t& T = f.i64("-T,--tokens", 32768, "text tokens", 1, int64_t(1) << 24);
  int64_t& k = f.i64("-k,--chunk", 8, "k: text tokens per chunk (summary_chunk_size)", 1, Spec::kMaxChunk);
  int64_t& S = f.i64("-S,--summaries", 1, "S: summary tokens per chunk (summary_token_num)", 1, Spec::kMaxSummaries);
  int64_t& W = f.i64("-W,--window", 128, "W: window in chunks (summary_sliding_chunk_num)", 0, Spec::kMaxWindow);
  std::string& heads = f.str("--heads", "8/8", "query/KV heads, e.g. 32/8");
  int64_t& D = f.i64("--dim", 128, "head dimension", 1, 1024);
  std::string& dt = f.str("--dtype", "f32", "f32 or bf16");
  int64_t& samples = f.i64("--check-rows", 64, "rows checked against the oracle (0 = none)", 0, int64_t(1) << 24);
  int64_t& threads = f.i64("-t,--threads", 0, "CPU threads (0 = all)", 0, cli::kMaxThreads);
  int64_t& seed = f.i64("--seed", 1, "random seed", cli::kAnyInt64Min, cli::kAnyInt64Max);
  if (!f.parse(argc, argv)) return 0;

  Spec spec;
  spec.chunk_size = k;
  spec.S = S;
  spec.W = W;
  spec.validate();
  int64_t Hq, Hkv;
  parse_heads(heads, Hq, Hkv);
  const DType dtype = parse_dtype_flag(dt);
  if (dtype == DType::f16) throw cli::UsageError("--dtype: the CPU kernels take f32 or bf16");

  const Layout lay = Layout::of(spec, T);
  const int64_t L = lay.length();
  std::mt19937_64 rng{static_cast<uint64_t>(seed)};
  auto q = random_tensor(dtype, L * Hq * D, rng), kk = random_tensor(dtype, L * Hkv * D, rng),
       v = random_tensor(dtype, L * Hkv * D, rng);
  std::vector<uint8_t> out(size_t(L * Hq * D * dtype_size(dtype)));
  std::vector<float> lse(size_t(L * Hq));

  AttentionParams p =
      dense_params(lay, W, 1, Hq, Hkv, D, dtype, {q.data(), kk.data(), v.data(), out.data(), lse.data()});
  p.num_threads = int(threads);

  std::printf("ksa demo: T=%lld text tokens -> stream L=%lld (k=%lld, S=%lld, W=%lld), heads %lld/%lld, D=%lld, %s\n",
              (long long)T, (long long)L, (long long)k, (long long)S, (long long)W, (long long)Hq, (long long)Hkv,
              (long long)D, dtype_name(dtype));
  const double t0 = now_s();
  cpu::attention_forward(p);
  const double secs = now_s() - t0;
  const int64_t pairs = count_visible_pairs(lay, W), causal = count_causal_pairs(T);
  const double flops = 4.0 * double(D) * double(pairs) * double(Hq);
  std::printf("forward (CPU):       %.1f ms, %.1f GFLOP/s useful\n", secs * 1e3, flops / secs * 1e-9);
  std::printf("visible pairs/head:  %lld vs %lld for full causal attention over the text (%.2fx fewer)\n",
              (long long)pairs, (long long)causal, double(causal) / double(pairs));

  // KV cache for decoding after this text (docs/ksa.md: The compressed cache): one layer, all KV heads, K and V,
  // measured on a KvCache filled by prefill from this stream's k/v (it copies only the rows decoding still reads).
  KvCacheConfig ccfg;
  ccfg.spec = spec;
  ccfg.Hkv = Hkv;
  ccfg.D = D;
  ccfg.dtype = dtype;
  ccfg.max_text_tokens = T + 1;  // the text and the next token
  KvCache cache(ccfg);
  const SeqId seq = cache.add_sequence();
  cache.prefill(seq, KvRows::dense(kk.data(), L, Hkv, D, dtype), KvRows::dense(v.data(), L, Hkv, D, dtype));
  const int64_t row_bytes = ccfg.row_bytes(), cache_bytes = cache.bytes_in_use(seq);
  const CacheRows rows = cache_rows(spec, T, ccfg.stores_summaries());
  std::printf(
      "KV cache per layer:  %s in a KvCache (%lld text + %lld summary rows, blocks of %lld) vs %s for full attention "
      "(%.2fx smaller)\n",
      human_bytes(double(cache_bytes)).c_str(), (long long)rows.text, (long long)rows.summaries,
      (long long)ccfg.block_rows, human_bytes(double(T * row_bytes)).c_str(),
      double(T * row_bytes) / double(cache_bytes));

  bool ok = true;
  for (float x : lse) ok = ok && std::isfinite(x);
  if (samples > 0) {
    std::vector<int64_t> sample;
    std::uniform_int_distribution<int64_t> pick(0, L - 1);
    sample.push_back(0);
    sample.push_back(L - 1);
    while (int64_t(sample.size()) < std::min(samples, L)) sample.push_back(pick(rng));
    const auto ref = cpu::attention_reference(p, sample);
    double max_err = 0, max_lse = 0;
    for (size_t r = 0; r < sample.size(); ++r)
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t row = sample[r];
        for (int64_t d = 0; d < D; ++d) {
          const double got = load_as_float(dtype, out.data(), (row * Hq + h) * D + d);
          const double err = std::abs(got - ref.out[(r * size_t(Hq) + size_t(h)) * size_t(D) + size_t(d)]);
          if (!(err <= max_err)) max_err = std::isnan(err) ? INFINITY : err;
        }
        max_lse = std::max(max_lse, std::abs(double(lse[size_t(row * Hq + h)]) - ref.lse[r * size_t(Hq) + size_t(h)]));
      }
    // fp32: well under 1e-4 on unit-variance data; bf16 output: one rounding of |out| < 1, 2^-8.
    const double tol = dtype == DType::f32 ? 1e-4 : 1e-2;
    ok = ok && max_err <= tol && max_lse <= 1e-3;
    std::printf(
        "oracle check:        %zu rows x %lld heads, max |out-ref| = %.3g (tol %.0e), max |lse-ref| = %.3g: %s\n",
        sample.size(), (long long)Hq, max_err, tol, max_lse, ok ? "OK" : "FAILED");
  }
  return ok ? 0 : 1;
}

cli::Register reg{{"demo", "KSA attention on a synthetic sequence (CPU), checked against the oracle", run_demo}};

}  // namespace
}  // namespace ksa::tools
