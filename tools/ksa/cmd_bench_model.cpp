// `ksa bench model`: llama-bench-style throughput of the CPU engine on a checkpoint.
//   pp<P>: prompt processing, one append of P random text ids on a fresh sequence (logits of the last only);
//   tg<N>: token generation, N single-token appends continuing that sequence, each token the argmax of the
//          previous logits (greedy), so the KV cache grows as in real decoding.
// Each repetition starts a new sequence; mean ± sd over the repetitions, after one untimed warm-up.
//
// Decoding one token reads every weight once, so it is bound by memory bandwidth: the bound is
// bandwidth / Model::weight_bytes_per_token() tokens per second. The bandwidth is measured in the same run, with
// the same thread count: a STREAM-like read (sum of 64-bit words) over a buffer much larger than the caches,
// best of several passes. (KV-cache reads and activations are not counted in the bound, so at long contexts
// or for tiny models the percentage understates how close decoding is to the hardware.)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <thread>

#include <omp.h>

#include "bench_model.hpp"
#include "common.hpp"
#include "ksa/model.hpp"
#include "ksa/weights.hpp"

namespace ksa::tools {
namespace {

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      if (c != std::string::npos) {
        size_t b = c + 1;
        while (b < line.size() && line[b] == ' ') ++b;
        return line.substr(b);
      }
    }
  return "unknown CPU";
}

struct Stats {
  double mean = 0, sd = 0;
};
Stats stats(const std::vector<double>& v) {
  Stats s;
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= double(v.size());
  if (v.size() > 1) {
    double q = 0;
    for (double x : v) q += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(q / double(v.size() - 1));
  }
  return s;
}

// Read bandwidth in bytes/s: `bytes` of 64-bit words, first touched by the threads that read them (so the
// pages sit on their NUMA nodes), summed with four independent accumulators per thread; best of `passes`.
double read_bandwidth(int threads, int64_t bytes, int passes) {
  const int64_t n = bytes / 8;
  std::unique_ptr<uint64_t[]> buf(new uint64_t[size_t(n)]);
  uint64_t* p = buf.get();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = uint64_t(i) * 0x9e3779b97f4a7c15ull;
  double best = 0;
  volatile uint64_t sink = 0;
  for (int r = 0; r < passes; ++r) {
    uint64_t total = 0;
    const double t0 = now_s();
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
    for (int64_t blk = 0; blk < n / 4; ++blk) {
      const uint64_t* q = p + blk * 4;
      total += (q[0] + q[1]) + (q[2] + q[3]);
    }
    const double t = now_s() - t0;
    sink = sink + total;
    best = std::max(best, double(n / 4 * 4 * 8) / t);
  }
  (void)sink;
  return best;
}

}  // namespace

int run_bench_model(int argc, char** argv) {
  cli::Flags f("bench model",
               "llama-bench-style CPU engine throughput: pp (prompt processing: one append of P random ids on a\n"
               "fresh sequence) and tg (token generation: N single-token greedy appends continuing it), mean ± sd\n"
               "over repetitions; with the memory read bandwidth measured in the same run and decode speed as a\n"
               "percentage of the bandwidth bound (bandwidth / weight bytes read per token).");
  std::string& dir = f.str("-m,--model", "", "checkpoint directory");
  int64_t& P = f.i64("-p,--n-prompt", 512, "prompt tokens (pp test; 0 = skip, tg then starts from 1 token)", 0, cli::kMaxTokens);
  int64_t& N = f.i64("-n,--n-gen", 128, "generated tokens (tg test; 0 = skip)", 0, cli::kMaxTokens);
  int64_t& reps = f.i64("-r,--repetitions", 3, "timed repetitions (after one untimed warm-up)", 1, 1000000);
  int64_t& threads = f.i64("-t,--threads", 0, "CPU threads for the model and the bandwidth test (0 = all)", 0, cli::kMaxThreads);
  int64_t& bw_mib = f.i64("--bw-mib", 1024, "buffer of the bandwidth test in MiB (0 = skip the test)", 0, 1 << 20);
  bool& kv_f32 = f.flag("--kv-f32", "KV cache in f32 (default bf16)");
  if (!f.parse(argc, argv)) return 0;
  if (dir.empty()) throw cli::UsageError("-m/--model: required");
  if (P + N < 1) throw cli::UsageError("-p, -n: must not both be 0");
  const int nthreads = threads > 0 ? int(threads) : int(std::max(1u, std::thread::hardware_concurrency()));

  ModelOptions mo;
  mo.threads = nthreads;
  mo.kv_dtype = kv_f32 ? DType::f32 : DType::bf16;
  mo.progress = weight_progress();
  const double t0 = now_s();
  Model model = Model::load(dir, mo);
  const double load_s = now_s() - t0;
  const ModelConfig& c = model.config();
  const int64_t first = P > 0 ? P : 1;  // tg needs one token to continue from
  if (first + N > model.max_text_tokens())
    fail("-p + -n = ", first + N, " text tokens, past the model's context limit of ", model.max_text_tokens());

  std::printf("ksa bench model: %s\n", dir.c_str());
  std::printf("  model: %s%s, %lld layers, hidden %lld, intermediate %lld, heads %lld/%lld, head_dim %lld, vocab %lld (logits %lld)%s\n",
              c.model_type.c_str(), c.use_summary_attention ? " + KSA" : "", (long long)c.num_hidden_layers, (long long)c.hidden_size,
              (long long)c.intermediate_size, (long long)c.num_attention_heads, (long long)c.num_key_value_heads,
              (long long)c.head_dim, (long long)c.vocab_size, (long long)model.vocab(), c.tie_word_embeddings ? ", tied" : "");
  if (c.use_summary_attention)
    std::printf("  KSA: k=%lld S=%lld, windows \"%s\"\n", (long long)c.summary_chunk_size, (long long)c.summary_token_num,
                c.window_pattern.c_str());
  std::printf("  params: %.3f M; weights %s (%s read per decoded token); KV cache %s; loaded in %.0f ms\n",
              double(count_parameters(c)) * 1e-6, human_bytes(double(model.weight_bytes())).c_str(),
              human_bytes(double(model.weight_bytes_per_token())).c_str(), dtype_name(mo.kv_dtype), load_s * 1e3);
  std::printf("  cpu: %s, %u hardware threads; %d threads used\n", cpu_name().c_str(), std::thread::hardware_concurrency(), nthreads);
  std::fflush(stdout);

  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int32_t> pick(0, int32_t(model.vocab() - 1));
  std::vector<float> logits(size_t(model.vocab()));
  auto argmax = [&] { return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin()); };

  // One run: returns {pp seconds, tg seconds}.
  auto run_once = [&](int64_t p, int64_t n) {
    std::vector<int32_t> ids(size_t(p > 0 ? p : 1));
    for (auto& t : ids) t = pick(rng);
    const SeqId s = model.new_sequence();
    double a = now_s();
    model.append(s, ids, LogitsFor::last, logits);
    const double pp = now_s() - a;
    a = now_s();
    for (int64_t i = 0; i < n; ++i) {
      const int32_t t = argmax();
      model.append(s, std::span<const int32_t>(&t, 1), LogitsFor::last, logits);
    }
    const double tg = now_s() - a;
    model.release(s);
    return std::pair<double, double>(pp, tg);
  };

  // The bandwidth first: after a prefill, OpenBLAS's worker threads keep spinning for a while and would take
  // cores from the bandwidth test on a small machine.
  double bw = 0;
  if (bw_mib > 0) bw = read_bandwidth(nthreads, bw_mib << 20, 5);
  const double bound = bw > 0 ? bw / double(model.weight_bytes_per_token()) : 0;

  run_once(std::min<int64_t>(first, 64), std::min<int64_t>(N, 8));  // warm-up: page faults, thread pool, buffers
  std::vector<double> pp_rate, tg_rate;
  for (int64_t r = 0; r < reps; ++r) {
    const auto [pp, tg] = run_once(first, N);
    if (P > 0) pp_rate.push_back(double(P) / pp);
    if (N > 0) tg_rate.push_back(double(N) / tg);
  }


  // ("±" is two bytes: the header is written out rather than padded by printf.)
  std::printf("\n| test   | threads | kv       |      t/s (mean ± sd) | per token\n");
  std::printf("|--------|---------|----------|----------------------|----------\n");
  if (P > 0) {
    const Stats s = stats(pp_rate);
    std::printf("| pp%-4lld | %7d | %-8s | %10.2f ± %7.2f | %8.3f ms\n", (long long)P, nthreads, dtype_name(mo.kv_dtype), s.mean, s.sd,
                1e3 / s.mean);
  }
  if (N > 0) {
    const Stats s = stats(tg_rate);
    std::printf("| tg%-4lld | %7d | %-8s | %10.2f ± %7.2f | %8.3f ms\n", (long long)N, nthreads, dtype_name(mo.kv_dtype), s.mean, s.sd,
                1e3 / s.mean);
  }
  std::printf("(%lld repetitions after 1 warm-up; tg continues the pp sequence%s)\n", (long long)reps,
              P > 0 ? "" : " of 1 token");
  if (bw > 0) {
    std::printf("\nmemory read bandwidth: %.1f GB/s (%d threads, %lld MiB buffer, best of 5 passes)\n", bw * 1e-9, nthreads,
                (long long)bw_mib);
    std::printf("bandwidth bound for decode: %.1f GB/s / %s per token = %.1f tok/s\n", bw * 1e-9,
                human_bytes(double(model.weight_bytes_per_token())).c_str(), bound);
    if (N > 0)
      std::printf("decode at %.1f%% of the bandwidth bound (tg %.2f tok/s)\n", 100.0 * stats(tg_rate).mean / bound,
                  stats(tg_rate).mean);
  }
  return 0;
}

}  // namespace ksa::tools
