// `ksa bench attn`: times the KSA prefill kernels (forward, optionally backward) on random data and puts the
// useful GFLOP/s next to a dense ceiling measured in the same run: OpenBLAS sgemm on the same thread count.
//
// Useful FLOPs come from the core's exact pair count: forward 4*D*pairs*Hq*B (QK^T and PV, 2 FLOPs per
// multiply-add); backward 2.5x the forward (FlashAttention's convention: 5 matmuls against 2).
//
// The ceiling must be fair: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE may be set in the environment (to keep old
// OpenBLAS builds safe on new CPUs), which pins OpenBLAS to a slower kernel. OpenBLAS reads them when it is
// loaded, so the sgemm is measured twice: in this process (environment as given) and in a child process
// (this binary re-executed as `ksa bench sgemm`) with those two variables removed. The ceiling is the faster
// of the two, and the core each one used is printed.
//
// Devices: one runner per device behind `--device`; a binary built without a device says so (exit code 2).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_attn.hpp"
#include "bench_model.hpp"
#include "common.hpp"
#include "cpu/attention_tiles.hpp"
#include "ksa/cpu.hpp"
#include "ksa/spec.hpp"

#if defined(KSA_HAVE_OPENBLAS)
// The few OpenBLAS entry points used here (C ABI; declared here rather than through a cblas.h whose path
// differs between distributions and BLAS flavours).
extern "C" {
void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
char* openblas_get_corename(void);
char* openblas_get_config(void);
void openblas_set_num_threads(int n);
}
#endif

extern char** environ;

namespace ksa::tools {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs f once to warm up, then `reps` times; returns the times in seconds.
template <class F>
std::vector<double> time_reps(int64_t reps, F&& f) {
  f();
  std::vector<double> t;
  for (int64_t r = 0; r < reps; ++r) {
    const double t0 = now_s();
    f();
    t.push_back(now_s() - t0);
  }
  return t;
}

struct SgemmResult {
  bool ok = false;
  double gflops = 0;
  std::string core, config, note;
};

#if defined(KSA_HAVE_OPENBLAS)
SgemmResult sgemm_here(int64_t n, int threads, int64_t reps) {
  openblas_set_num_threads(threads);
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> a(size_t(n * n)), b(size_t(n * n)), c(size_t(n * n));
  for (auto& x : a) x = u(rng);
  for (auto& x : b) x = u(rng);
  const auto t = time_reps(reps, [&] {
    cblas_sgemm(101 /*row major*/, 111 /*no trans*/, 111, int(n), int(n), int(n), 1.f, a.data(), int(n), b.data(),
                int(n), 0.f, c.data(), int(n));
  });
  SgemmResult r;
  r.ok = std::isfinite(c[0]);
  r.gflops = 2.0 * double(n) * double(n) * double(n) / median(t) * 1e-9;
  r.core = openblas_get_corename();
  r.config = openblas_get_config();
  return r;
}
#endif

// The sgemm of a child process whose environment lacks OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE.
SgemmResult sgemm_child(int64_t n, int threads, int64_t reps) {
  SgemmResult r;
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "OPENBLAS_CORETYPE=", 18) != 0 && std::strncmp(*e, "OPENBLAS_L2_SIZE=", 17) != 0)
      env.push_back(*e);
  std::vector<char*> envp;
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = {
      "ksa", "bench", "sgemm", "--n", std::to_string(n), "-t", std::to_string(threads), "--reps", std::to_string(reps)};
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  int fd[2];
  if (pipe(fd) != 0) {
    r.note = "pipe failed";
    return r;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fd[1], 1);
  posix_spawn_file_actions_addclose(&fa, fd[0]);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, "/proc/self/exe", &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  close(fd[1]);
  std::string out;
  if (rc == 0) {
    char buf[4096];
    ssize_t k;
    while ((k = read(fd[0], buf, sizeof buf)) > 0) out.append(buf, size_t(k));
  }
  close(fd[0]);
  int status = 0;
  if (rc != 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    r.note = rc != 0 ? "could not start the child" : "the child failed";
    return r;
  }
  // One line: "gflops=<x>\tcore=<name>\tconfig=<text>".
  const size_t g = out.find("gflops="), c = out.find("\tcore="), f = out.find("\tconfig=");
  if (g == std::string::npos || c == std::string::npos || f == std::string::npos) {
    r.note = "unreadable child output";
    return r;
  }
  r.gflops = std::atof(out.c_str() + g + 7);
  r.core = out.substr(c + 6, f - c - 6);
  r.config = out.substr(f + 8);
  while (!r.config.empty() && (r.config.back() == '\n' || r.config.back() == '\r')) r.config.pop_back();
  r.ok = r.gflops > 0;
  return r;
}

int run_sgemm(int argc, char** argv) {
  cli::Flags f("bench sgemm",
               "OpenBLAS sgemm GFLOP/s (M=N=K=n); prints one machine-readable line. Used by `bench attn`.");
  int64_t& n = f.i64("--n", 2048, "matrix size", 1, 16384);
  int64_t& threads = f.i64("-t,--threads", 0, "threads (0 = all)", 0, cli::kMaxThreads);
  int64_t& reps = f.i64("--reps", 5, "timed repetitions after one warm-up", 1, 1000000);
  if (!f.parse(argc, argv)) return 0;
#if defined(KSA_HAVE_OPENBLAS)
  const SgemmResult r = sgemm_here(n, cpu::detail::resolve_threads(int(threads)), std::max<int64_t>(1, reps));
  std::printf("gflops=%.3f\tcore=%s\tconfig=%s\n", r.gflops, r.core.c_str(), r.config.c_str());
  return r.ok ? 0 : 1;
#else
  std::fprintf(stderr, "ksa bench sgemm: OpenBLAS is not built into this binary\n");
  return 2;
#endif
}

struct Timing {
  double median_s = 0, min_s = 0, max_s = 0;
};
Timing summarize(const std::vector<double>& t) {
  return Timing{median(t), *std::min_element(t.begin(), t.end()), *std::max_element(t.begin(), t.end())};
}

int run_attn_cpu(const AttnArgs& a) {
  const Layout lay(a.k, a.S, a.T, a.tail);
  const int64_t L = lay.length();
  const int threads = cpu::detail::resolve_threads(int(a.threads));
  std::mt19937_64 rng(1);
  auto q = random_tensor(a.dtype, a.B * L * a.Hq * a.D, rng), k = random_tensor(a.dtype, a.B * L * a.Hkv * a.D, rng),
       v = random_tensor(a.dtype, a.B * L * a.Hkv * a.D, rng), dout = random_tensor(a.dtype, a.B * L * a.Hq * a.D, rng);
  std::vector<uint8_t> out(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(size_t(a.B * L * a.Hq));
  AttentionBackwardParams p = dense_params(
      lay, a.W, a.B, a.Hq, a.Hkv, a.D, a.dtype,
      {q.data(), k.data(), v.data(), out.data(), lse.data(), dout.data(), dq.data(), dk.data(), dv.data()});
  p.num_threads = threads;

  const int64_t pairs = count_visible_pairs(lay, a.W);
  const double fwd_flops = 4.0 * double(a.D) * double(pairs) * double(a.Hq) * double(a.B);
  std::printf(
      "ksa bench attn: device cpu (%d threads, %s tile primitives), T=%lld -> L=%lld (k=%lld S=%lld W=%lld%s), "
      "B=%lld, heads %lld/%lld, D=%lld, %s\n",
      threads, cpu::detail::tile_kernels().name, (long long)a.T, (long long)L, (long long)a.k, (long long)a.S,
      (long long)a.W, a.tail ? " tail" : "", (long long)a.B, (long long)a.Hq, (long long)a.Hkv, (long long)a.D,
      dtype_name(a.dtype));
  std::printf(
      "visible pairs/head: %lld (%.2fx fewer than causal over the text); FLOPs: fwd = 4*D*pairs*Hq*B = %.3g, "
      "bwd = 2.5 x fwd (FlashAttention convention)\n",
      (long long)pairs, double(count_causal_pairs(a.T)) / double(pairs), fwd_flops);

  const Timing tf = summarize(time_reps(a.reps, [&] { cpu::attention_forward(p); }));
  const double fwd_gf = fwd_flops / tf.median_s * 1e-9;
  std::printf("forward:  median %9.2f ms (min %.2f, max %.2f, %lld reps after 1 warm-up)  %8.1f GFLOP/s useful\n",
              tf.median_s * 1e3, tf.min_s * 1e3, tf.max_s * 1e3, (long long)a.reps, fwd_gf);
  double bwd_gf = 0;
  if (a.bwd) {
    const Timing tb = summarize(time_reps(a.reps, [&] { cpu::attention_backward(p); }));
    bwd_gf = 2.5 * fwd_flops / tb.median_s * 1e-9;
    std::printf("backward: median %9.2f ms (min %.2f, max %.2f, %lld reps after 1 warm-up)  %8.1f GFLOP/s useful\n",
                tb.median_s * 1e3, tb.min_s * 1e3, tb.max_s * 1e3, (long long)a.reps, bwd_gf);
  }
  if (!a.ceiling) return 0;

#if defined(KSA_HAVE_OPENBLAS)
  const int64_t gemm_reps = std::max<int64_t>(3, a.reps);
  const SgemmResult here = sgemm_here(a.gemm_n, threads, gemm_reps);
  const SgemmResult child = sgemm_child(a.gemm_n, threads, gemm_reps);
  const char* ct = std::getenv("OPENBLAS_CORETYPE");
  const char* l2 = std::getenv("OPENBLAS_L2_SIZE");
  std::printf("sgemm ceiling: OpenBLAS cblas_sgemm M=N=K=%lld, fp32, %d threads, median of %lld after 1 warm-up\n",
              (long long)a.gemm_n, threads, (long long)gemm_reps);
  std::printf("  this process (OPENBLAS_CORETYPE=%s, OPENBLAS_L2_SIZE=%s): core %s, %.1f GFLOP/s  [%s]\n",
              ct ? ct : "(unset)", l2 ? l2 : "(unset)", here.core.c_str(), here.gflops, here.config.c_str());
  if (child.ok)
    std::printf("  child without OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE: core %s, %.1f GFLOP/s  [%s]\n", child.core.c_str(),
                child.gflops, child.config.c_str());
  else std::printf("  child without OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE: %s\n", child.note.c_str());
  const bool use_child = child.ok && child.gflops > here.gflops;
  const double ceil = use_child ? child.gflops : here.gflops;
  std::printf("ceiling: %.1f GFLOP/s (core %s)\n", ceil, use_child ? child.core.c_str() : here.core.c_str());
  std::printf("forward:  %5.1f%% of the sgemm ceiling (target >= 50%%)\n", 100.0 * fwd_gf / ceil);
  if (a.bwd) std::printf("backward: %5.1f%% of the sgemm ceiling (target >= 35%%)\n", 100.0 * bwd_gf / ceil);
#else
  std::printf("sgemm ceiling: OpenBLAS is not built into this binary\n");
#endif
  return 0;
}

// "3374,31219" -> {3374, 31219}: each a positive text length; "" -> {}.
std::vector<int64_t> parse_docs(const std::string& s) {
  std::vector<int64_t> out;
  if (s.empty()) return out;
  size_t i = 0;
  while (i <= s.size()) {
    const size_t j = std::min(s.find(',', i), s.size());
    const std::string item = s.substr(i, j - i);
    size_t used = 0;
    int64_t n = 0;
    try {
      n = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || n < 1 || n > (int64_t(1) << 24))
      throw cli::UsageError("--docs: expected comma-separated text lengths in [1, 16777216] (got '" + item + "')");
    out.push_back(n);
    i = j + 1;
  }
  return out;
}

int run_attn(int argc, char** argv) {
  cli::Flags f(
      "bench attn",
      "Times the KSA prefill attention kernels (random data) and reports useful GFLOP/s from the exact\n"
      "visible-pair count, next to an OpenBLAS sgemm ceiling measured in the same run.\n"
      "KSA_CPU_PRIMITIVES=portable (the lowest SIMD target compiled in) or =AVX2, AVX3, SSE4, NEON, ... in the\n"
      "environment times another SIMD target than the best one this CPU runs.");
  std::string& device = f.str("--device", "cpu", "cpu or cuda (when built in; bf16/f16, times with CUDA events)");
  int64_t& T = f.i64("-T,--T", 8192, "text tokens", 1, int64_t(1) << 24);
  int64_t& k = f.i64("--k", 8, "text tokens per chunk", 1, Spec::kMaxChunk);
  int64_t& S = f.i64("--S", 1, "summary tokens per chunk", 1, Spec::kMaxSummaries);
  int64_t& W = f.i64("--W", 128, "window in chunks", 0, Spec::kMaxWindow);
  bool& tail = f.flag("--tail", "summarise a trailing partial chunk");
  int64_t& B = f.i64("--batch", 1, "batch size", 1, 4096);
  std::string& heads = f.str("--heads", "8/8", "query/KV heads, e.g. 32/8");
  int64_t& D = f.i64("--dim", 128, "head dimension", 1, 1024);
  std::string& dt = f.str("--dtype", "f32", "f32 or bf16");
  bool& bwd = f.flag("--bwd", "also time the backward");
  int64_t& reps = f.i64("--reps", 5, "timed repetitions after one warm-up", 1, 1000000);
  int64_t& threads =
      f.i64("-t,--threads", 0, "CPU threads for the kernels and for the sgemm (0 = all)", 0, cli::kMaxThreads);
  int64_t& gemm_n = f.i64("--gemm-n", 2048, "size of the square sgemm ceiling", 16, 16384);
  bool& no_ceiling = f.flag("--no-ceiling", "skip the sgemm ceiling");
  std::string& docs = f.str("--docs", "",
                            "packed documents, their text tokens comma-separated (e.g. 3374,31219,...): times one "
                            "packed call (cu_seqlens) and one stream of the same visible pairs; -T and --batch are "
                            "ignored (CUDA only)");
  if (!f.parse(argc, argv)) return 0;

  AttnArgs a{};
  a.T = T, a.k = k, a.S = S, a.W = W, a.B = B, a.D = D, a.reps = reps, a.threads = threads, a.gemm_n = gemm_n;
  a.bwd = bwd, a.tail = tail, a.ceiling = !no_ceiling;
  parse_heads(heads, a.Hq, a.Hkv);
  a.dtype = parse_dtype_flag(dt);
  a.docs = parse_docs(docs);
  Spec spec;
  spec.chunk_size = k, spec.S = S, spec.W = W;
  spec.validate();

  if (device == "cpu") {
    if (a.dtype == DType::f16) throw cli::UsageError("--dtype: the CPU kernels take f32 or bf16");
    if (!a.docs.empty()) throw cli::UsageError("--docs: packed documents are timed with --device cuda only");
    return run_attn_cpu(a);
  }
  if (device == "cuda") {
#ifdef KSA_HAVE_CUDA
    if (a.dtype == DType::f32) throw cli::UsageError("--dtype: the CUDA kernels take bf16 or f16");
    return run_attn_cuda(a);
#else
    std::fprintf(stderr, "ksa bench attn: --device cuda: not built in this binary\n");
    return 2;
#endif
  }
  throw cli::UsageError("--device: expected cpu or cuda (got '" + device + "')");
}

int run_bench(int argc, char** argv) {
  const std::string what = argc > 0 ? argv[0] : "";
  if (what == "attn") return run_attn(argc - 1, argv + 1);
  if (what == "sgemm") return run_sgemm(argc - 1, argv + 1);
#ifdef KSA_HAVE_ENGINE
  if (what == "model") return run_bench_model(argc - 1, argv + 1);
#endif
  if (what == "-h" || what == "--help") {
    std::printf(
        "usage: ksa bench attn [flags]    (ksa bench attn --help for the flags)\n"
#ifdef KSA_HAVE_ENGINE
        "       ksa bench model [flags]   engine pp/tg tok/s vs memory bandwidth (ksa bench model --help)\n"
#endif
        "       ksa bench sgemm [flags]   OpenBLAS sgemm alone (the ceiling's child process)\n");
    return 0;
  }
#ifdef KSA_HAVE_ENGINE
  const std::string names = "attn, model or sgemm";
#else
  const std::string names = "attn or sgemm; `model` needs a build with KSA_ENGINE=ON";
#endif
  throw cli::UsageError(what.empty() ? "expected a benchmark: " + names
                                     : "unknown benchmark '" + what + "' (expected " + names + ")");
}

cli::Register reg{{"bench",
                   "benchmarks: `bench attn` (KSA prefill kernels vs an sgemm ceiling), `bench model` (engine tok/s)",
                   run_bench}};

}  // namespace
}  // namespace ksa::tools
