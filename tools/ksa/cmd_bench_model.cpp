// `ksa bench model`: llama-bench-style throughput of the engine (GPU or CPU) on a checkpoint.
//   pp<P>: prompt processing: each of the batch's B sequences gets P random text ids in one step on a fresh
//          sequence (one sequence at a time); tok/s = B*P / time.
//   tg<N>: token generation: N batched steps of one token for each of the B sequences, each token sampled
//          greedily by the engine (on the device with CUDA), so the KV caches grow as in real decoding;
//          tok/s = B*N / time.
// Each repetition starts new sequences; mean ± sd over the repetitions, after one untimed warm-up.
//
// A decode step reads every weight once and, per sequence, the K/V rows its token sees: the bound is
// bandwidth / (weight bytes per step + visible KV bytes per step) steps per second, with the KV bytes at the
// middle of the tg run. The bandwidth is measured in the same run: on the GPU a device-to-device copy (bytes
// read + written per second), on the CPU a STREAM-like read with the same thread count (best of passes).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <thread>

#include "bench_model.hpp"
#include "common.hpp"
#include "cpu/bandwidth.hpp"
#include "ksa/dense.hpp"
#include "ksa/model.hpp"
#include "ksa/stream_geometry.hpp"
#include "ksa/weights.hpp"
#ifdef KSA_HAVE_CUDA
#include "ksa/cuda.hpp"
#endif

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

// Read bandwidth in bytes/s over `bytes` of fresh memory (cpu/bandwidth.hpp).
double read_bandwidth(int threads, int64_t bytes, int passes) {
  const int64_t n = bytes / 8;
  std::unique_ptr<uint64_t[]> buf(new uint64_t[size_t(n)]);
  return cpu::detail::read_bandwidth(buf.get(), n, threads, passes);
}

}  // namespace

// K/V rows the text token at index t sees in each layer, summed over the layers (the core's rule).
int64_t visible_rows(const ModelConfig& c, int64_t t) {
  int64_t rows = 0;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    if (!c.use_summary_attention || !c.is_summary_layer(i)) {
      rows += t + 1;
      continue;
    }
    const StreamGeometry geo = StreamGeometry::of(c.layer_spec(i));
    const DecodeKeys d = geo.decode_keys(geo.text_position(t));
    for (int r = 0; r < d.n; ++r) rows += d.range[r].end - d.range[r].begin;
  }
  return rows;
}

int run_bench_model(int argc, char** argv) {
  cli::Flags f(
      "bench model",
      "llama-bench-style engine throughput: pp (prompt processing: P random ids on a fresh sequence, for each\n"
      "of --batch sequences) and tg (token generation: N batched greedy steps of one token per sequence),\n"
      "mean ± sd over repetitions; with the memory bandwidth measured in the same run and decode speed as a\n"
      "percentage of the bandwidth bound ((weight bytes + visible KV bytes) per step / bandwidth).");
  std::string& dir = f.str("-m,--model", "", "checkpoint directory, or a file in it");
  std::string& device = f.str(
      "--device", "auto",
      "cpu, cuda, or auto (cuda when a GPU is visible, the build has CUDA and the model's head dim is 64 or 128)");
  std::vector<int64_t>& Ps =
      f.i64s("-p,--n-prompt", {512},
             "prompt tokens per sequence (pp test; 0 = skip, tg then starts from 1 token); a list runs each", 0,
             cli::kMaxTokens);
  std::vector<int64_t>& Ns = f.i64s(
      "-n,--n-gen", {128}, "generated tokens per sequence (tg test; 0 = skip); a list runs each", 0, cli::kMaxTokens);
  std::vector<int64_t>& Bs = f.i64s("-b,--batch", {1}, "sequences decoded together; a list runs each", 1, 4096);
  std::string& output = f.str("-o,--output", "md", "md (tables) or json (one document on stdout; the rest on stderr)");
  int64_t& reps = f.i64("-r,--repetitions", 3, "timed repetitions (after one untimed warm-up)", 1, 1000000);
  int64_t& threads =
      f.i64("-t,--threads", 0, "CPU threads for the model and the bandwidth test (0 = all)", 0, cli::kMaxThreads);
  int64_t& bw_mib = f.i64("--bw-mib", 1024, "buffer of the bandwidth test in MiB (0 = skip the test)", 0, 1 << 20);
  int64_t& ctx = f.i64("--ctx", 0, "context limit in text tokens (0 = -p + -n)", 0, cli::kMaxTokens);
  bool& kv_f32 = f.flag("--kv-f32", "KV cache in f32 (CPU only; default bf16)");
  bool& no_mmap = f.flag("--no-mmap", cli::kNoMmapHelp);
  const CudaEngineFlags cuda_flags(f);
  bool& no_gemv = f.flag("--no-cuda-gemv", "CUDA: cuBLASLt for every matrix product (no GEMV kernel for <= 8 rows)");
  bool& autotune = f.flag("--gemm-autotune", cli::kGemmAutotuneHelp);
  int64_t& gemv_shape = f.i64("--cuda-gemv-shape", 0,
                              "CUDA: the GEMV's block shape for batch-1 products (ksa bench-gemm lists them)", 0, 63);
  if (!f.parse(argc, argv)) return 0;
  dir = model_dir_arg(dir);
  if (dir.empty()) throw cli::UsageError("-m/--model: required");
  for (int64_t P : Ps)
    for (int64_t N : Ns)
      if (P + N < 1) throw cli::UsageError("-p, -n: must not both be 0");
  if (output != "md" && output != "json")
    throw cli::UsageError("-o/--output: must be md or json (got \"" + output + "\")");
  const bool json = output == "json";
  // With -o json, everything but the document goes to stderr.
  FILE* info = json ? stderr : stdout;
  const int nthreads = threads > 0 ? int(threads) : int(std::max(1u, std::thread::hardware_concurrency()));

  ModelOptions mo;
  mo.device = parse_device_flag(device, dir);
  if (mo.device == Device::cuda && kv_f32)
    throw cli::UsageError("--kv-f32: the CUDA engine keeps the KV cache in bf16");
  mo.threads = nthreads;
  mo.kv_dtype = kv_f32 ? DType::f32 : DType::bf16;
  if (no_mmap) mo.load = FileLoad::copy;
  cuda_flags.apply(mo);
  mo.cuda_gemv = !no_gemv;
  mo.cuda_gemm_autotune = autotune;
  mo.cuda_gemv_shape = int(gemv_shape);
  mo.progress = weight_progress();
  int64_t longest = 0;  // text tokens of the longest case
  for (int64_t P : Ps)
    for (int64_t N : Ns) longest = std::max(longest, std::max<int64_t>(P, 1) + N);
  mo.max_text_tokens = ctx > 0 ? ctx : longest;
  const double t0 = now_s();
  Model model = Model::load(dir, mo);
  const double load_s = now_s() - t0;
  const ModelConfig& c = model.config();
  if (longest > model.max_text_tokens())
    fail("-p + -n = ", longest, " text tokens, past the model's context limit of ", model.max_text_tokens());

  std::fprintf(info, "ksa bench model: %s\n", dir.c_str());
  std::fprintf(info,
               "  model: %s%s, %lld layers, hidden %lld, intermediate %lld, heads %lld/%lld, head_dim %lld, vocab %lld "
               "(logits %lld)%s\n",
               c.model_type.c_str(), c.use_summary_attention ? " + KSA" : "", (long long)c.num_hidden_layers,
               (long long)c.hidden_size, (long long)c.intermediate_size, (long long)c.num_attention_heads,
               (long long)c.num_key_value_heads, (long long)c.head_dim, (long long)c.vocab_size,
               (long long)model.vocab(), c.tie_word_embeddings ? ", tied" : "");
  if (c.use_summary_attention)
    std::fprintf(info, "  KSA: k=%lld S=%lld, windows \"%s\"\n", (long long)c.summary_chunk_size,
                 (long long)c.summary_token_num, c.window_pattern.c_str());
  std::fprintf(info, "  params: %.3f M; weights %s %s (%s read per decode step); KV cache %s; loaded in %.0f ms\n",
               double(count_parameters(c)) * 1e-6, human_bytes(double(model.weight_bytes())).c_str(),
               model.weight_format().c_str(), human_bytes(double(model.weight_bytes_per_token())).c_str(),
               dtype_name(mo.kv_dtype), load_s * 1e3);
  std::fprintf(info, "  backend: %s", model.backend_name().c_str());
  if (mo.device == Device::cpu)
    std::fprintf(info, " on %s, %u hardware threads; SIMD %s; products of >= 12 rows: %s", cpu_name().c_str(),
                 std::thread::hardware_concurrency(), cpu::simd_target(),
                 cpu::bf16_products() ? "bf16 dot" : "fp32 sgemm");
  std::fprintf(info, "\n");
  std::fflush(info);

  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int32_t> pick(0, int32_t(std::min<int64_t>(model.vocab(), c.vocab_size) - 1));
  SamplerConfig greedy;  // temperature 0: argmax, on the device with CUDA
  int64_t kv_bytes = 0, kv_full = 0;
  ReplayTimes tg_times;  // replayed steps of the timed tg loops of the current case

  // One run of B sequences: returns {pp seconds, tg seconds}.
  auto run_once = [&](int64_t B, int64_t p, int64_t n, bool record) {
    std::vector<SeqId> ids;
    std::vector<int32_t> next(static_cast<size_t>(B));
    StepResult r;
    double pp = 0;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int32_t> prompt(size_t(p > 0 ? p : 1));
      for (auto& t : prompt) t = pick(rng);
      ids.push_back(model.new_sequence());
      const StepItem it{ids.back(), prompt, LogitsFor::none, &greedy, {}};
      const double a = now_s();
      model.step(std::span<const StepItem>(&it, 1), r);
      pp += now_s() - a;
      next[size_t(b)] = r.next[0];
    }
    std::vector<StepItem> items(static_cast<size_t>(B));
    const ReplayTimes t0 = model.replay_times();
    const double a = now_s();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t b = 0; b < B; ++b)
        items[size_t(b)] =
            StepItem{ids[size_t(b)], std::span<const int32_t>(&next[size_t(b)], 1), LogitsFor::none, &greedy, {}};
      model.step(items, r);
      for (int64_t b = 0; b < B; ++b) next[size_t(b)] = r.next[size_t(b)];
    }
    const double tg = now_s() - a;
    tg_times.add_difference(t0, model.replay_times());
    if (record) {
      kv_bytes = model.kv_bytes(ids[0]);
      kv_full = model.kv_bytes_full_attention(ids[0]);
    }
    for (SeqId s : ids) model.release(s);
    return std::pair<double, double>(pp, tg);
  };

  double bw = 0;
  std::string bw_what;
  if (bw_mib > 0) {
#ifdef KSA_HAVE_CUDA
    if (mo.device == Device::cuda) {
      bw = cuda::copy_bandwidth(bw_mib << 20);
      bw_what = "device-to-device copy, bytes read + written";
    }
#endif
    if (mo.device == Device::cpu) {
      // After a prefill, OpenBLAS's worker threads keep spinning for a while and would take cores from the
      // bandwidth test on a small machine: measure first.
      bw = read_bandwidth(nthreads, bw_mib << 20, 5);
      bw_what = "STREAM-like read, " + std::to_string(nthreads) + " threads";
    }
  }
  const std::string dev = mo.device == Device::cuda ? "cuda" : std::to_string(nthreads) + " thr";
  const int64_t row_bytes = 2 * c.num_key_value_heads * c.head_dim * dtype_size(mo.kv_dtype);
  std::string doc;  // -o json: the results
  auto num = [](double v) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.6g", std::isfinite(v) ? v : 0.0);
    return std::string(buf);
  };
  bool warmed = false;
  for (int64_t B : Bs)
    for (int64_t P : Ps)
      for (int64_t N : Ns) {
        const int64_t first = P > 0 ? P : 1;  // tg needs one token to continue from
        // Bytes per decode step at the middle of the tg run: weights once, plus each sequence's visible K/V.
        const int64_t kv_step = B * visible_rows(c, first + N / 2) * row_bytes;
        const int64_t step_bytes = model.weight_bytes_per_token() + kv_step;
        const double bound = bw > 0 ? bw / double(step_bytes) * double(B) : 0;                   // tok/s
        if (!warmed) run_once(B, std::min<int64_t>(first, 64), std::min<int64_t>(N, 8), false);  // buffers, algorithms
        warmed = true;
        tg_times = ReplayTimes{};
        std::vector<double> pp_rate, tg_rate;
        for (int64_t r = 0; r < reps; ++r) {
          const auto [pp, tg] = run_once(B, first, N, r == 0);
          if (P > 0) pp_rate.push_back(double(B * P) / pp);
          if (N > 0) tg_rate.push_back(double(B * N) / tg);
        }
        const Stats sp = P > 0 ? stats(pp_rate) : Stats{}, st = N > 0 ? stats(tg_rate) : Stats{};
        if (json) {
          doc += std::string(doc.empty() ? "" : ",\n") + "    {\"n_prompt\": " + std::to_string(P) +
                 ", \"n_gen\": " + std::to_string(N) + ", \"batch\": " + std::to_string(B) +
                 ", \"pp_tok_s\": " + num(sp.mean) + ", \"pp_tok_s_sd\": " + num(sp.sd) +
                 ", \"tg_tok_s\": " + num(st.mean) + ", \"tg_tok_s_sd\": " + num(st.sd) +
                 ", \"bound_tok_s\": " + num(bound) + ", \"step_bytes\": " + std::to_string(step_bytes) +
                 ", \"kv_bytes\": " + std::to_string(kv_bytes) +
                 ", \"kv_bytes_full_attention\": " + std::to_string(kv_full) + "}";
          continue;
        }
        // ("±" is two bytes: the header is written out rather than padded by printf.)
        std::printf("\n| test          | batch | device  |      t/s (mean ± sd) | per token\n");
        std::printf("|---------------|-------|---------|----------------------|----------\n");
        if (P > 0)
          std::printf("| pp%-11lld | %5lld | %-7s | %10.2f ± %7.2f | %8.3f ms\n", (long long)P, (long long)B,
                      dev.c_str(), sp.mean, sp.sd, 1e3 / sp.mean);
        if (N > 0)
          std::printf("| tg%-4lld @ %-5lld | %5lld | %-7s | %10.2f ± %7.2f | %8.3f ms\n", (long long)N,
                      (long long)first, (long long)B, dev.c_str(), st.mean, st.sd, 1e3 / st.mean);
        std::printf("(%lld repetitions after 1 warm-up; tg continues each pp sequence%s)\n", (long long)reps,
                    P > 0 ? "" : " of 1 token");
        std::printf("\nKV cache of one sequence at %lld text tokens: %s (%.1f MiB)\n", (long long)(first + N),
                    kv_comparison(kv_bytes, kv_full, c.use_summary_attention).c_str(), double(kv_bytes) / (1 << 20));
        if (bw > 0) {
          std::printf("bytes per decode step: %s weights + %s visible KV (%lld sequences at %lld tokens) = %s\n",
                      human_bytes(double(model.weight_bytes_per_token())).c_str(), human_bytes(double(kv_step)).c_str(),
                      (long long)B, (long long)(first + N / 2), human_bytes(double(step_bytes)).c_str());
          std::printf("bandwidth bound for decode: %.1f tok/s\n", bound);
          if (N > 0)
            std::printf("decode at %.1f%% of the bandwidth bound (tg %.2f tok/s)\n", 100.0 * st.mean / bound, st.mean);
        }
        if (tg_times.steps > 0) {
          const double k = 1e6 / double(tg_times.steps);
          std::printf(
              "replayed tg steps (%lld, means): %.1f us each from start to end of wait (host: %.1f before the graph's "
              "launch, %.1f planning the next step, %.1f waiting, %.1f in the model between steps); device: %.1f us "
              "of step work = %.1f before the graph + the graph %.1f + %.1f after it; the next step's plans landed "
              "%.1f us after the step before's launches (negative: under its graph; %lld steps began before they had)\n",
              (long long)tg_times.steps, k * tg_times.wall, k * tg_times.host_before_launch, k * tg_times.host_ahead,
              k * tg_times.host_wait, k * tg_times.host_between, k * tg_times.device, k * tg_times.before_graph,
              k * tg_times.graph, k * tg_times.after_graph, k * tg_times.ahead_uploads, (long long)tg_times.ahead_late);
        }
        std::fflush(stdout);
      }
  if (mo.device == Device::cuda) {
    const int64_t peak = model.device_bytes_peak(), wb = model.weight_bytes();
    const Model::DeviceMemory m = model.device_memory_at_peak();
    const auto mib = [](int64_t b) { return double(b) / (1 << 20); };
    std::fprintf(info, "peak device memory: %s = %.1f MiB (weights %s = %.1f MiB)\n", human_bytes(double(peak)).c_str(),
                 mib(peak), human_bytes(double(wb)).c_str(), mib(wb));
    if (m.total > 0)
      std::fprintf(info,
                   "after the step of the most: %.1f MiB = weights %.1f + KV-cache slabs %.1f + step activations "
                   "%.1f + prefill key buffer %.1f + the rest %.1f (CUDA runtime, libraries, plans)\n",
                   mib(m.total), mib(wb), mib(m.kv_cache), mib(m.activations), mib(m.prefill_keys),
                   mib(m.total - wb - m.kv_cache - m.activations - m.prefill_keys));
    const GraphStats g = model.graph_stats();
    std::fprintf(info,
                 "CUDA graphs: %s (%lld steps replayed; %lld graphs captured: %lld new shapes, %lld after the "
                 "activation arena grew, %lld after a decode plan workspace grew, %lld outgrown by the attention's "
                 "work, %lld for the other plan slot, %lld times all dropped; eager steps: %lld a shape's first, "
                 "%lld with a prompt piece); GEMV kernel for <= 8 rows: %s (batch-1 shape %d); cuBLASLt: %s; "
                 "planning ahead: %s (plans used at %lld steps, dropped %lld times)\n",
                 mo.cuda_graphs ? "on" : "off", (long long)g.replays, (long long)g.captures, (long long)g.new_shape,
                 (long long)g.arena_moved, (long long)g.plans_moved, (long long)g.over_units, (long long)g.other_slot,
                 (long long)g.cleared, (long long)g.eager_first, (long long)g.eager_prompt,
                 mo.cuda_gemv ? "on" : "off (cuBLASLt)", mo.cuda_gemv_shape,
                 mo.cuda_gemm_autotune ? "autotuned" : "its first choices", mo.cuda_plan_ahead ? "on" : "off",
                 (long long)model.plans_ahead_used(), (long long)model.plans_ahead_dropped());
  }
  if (bw > 0)
    std::fprintf(info, "memory bandwidth: %.1f GB/s (%s, %lld MiB)\n", bw * 1e-9, bw_what.c_str(), (long long)bw_mib);
  if (json) {
    std::string esc;
    for (char ch : dir) {
      if (ch == '"' || ch == '\\') esc += '\\';
      if (static_cast<unsigned char>(ch) >= 0x20) esc += ch;
    }
    std::printf(
        "{\n  \"model\": \"%s\", \"weights\": \"%s\", \"device\": \"%s\", \"repetitions\": %lld, "
        "\"bandwidth_gb_s\": %s,\n  \"results\": [\n%s\n  ]\n}\n",
        esc.c_str(), model.weight_format().c_str(), dev.c_str(), (long long)reps, num(bw * 1e-9).c_str(), doc.c_str());
  }
  return 0;
}

}  // namespace ksa::tools
