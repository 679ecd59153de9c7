// `ksa info`: what this build and machine can do, and the KSA arithmetic for a configuration.
#include <cstdio>
#include <thread>

#include "common.hpp"
#include "ksa/spec.hpp"
#ifdef KSA_HAVE_CUDA
#include "ksa/cuda.hpp"
#endif

namespace ksa::tools {
namespace {

int run_info(int argc, char** argv) {
  cli::Flags f("info", "Build and machine capabilities, and KSA's visible pairs and KV-cache rows for a configuration.");
  int64_t& k = f.i64("-k,--chunk", 8, "k: text tokens per chunk");
  int64_t& S = f.i64("-S,--summaries", 1, "S: summary tokens per chunk");
  int64_t& W = f.i64("-W,--window", 128, "W: window in chunks");
  if (!f.parse(argc, argv)) return 0;
  Spec spec;
  spec.k = k;
  spec.S = S;
  spec.W = W;
  spec.validate();

  std::printf("ksa 0.1.0\n");
  std::printf("cpu:   %u hardware threads; avx2 %s, avx512f %s, avx512bf16 %s\n", std::thread::hardware_concurrency(),
              __builtin_cpu_supports("avx2") ? "yes" : "no", __builtin_cpu_supports("avx512f") ? "yes" : "no",
              __builtin_cpu_supports("avx512bf16") ? "yes" : "no");
#ifdef KSA_HAVE_CUDA
  const int n = cuda::device_count();
  if (n > 0) std::printf("cuda:  built; %d device(s), %s\n", n, cuda::device_description().c_str());
  else std::printf("cuda:  built; no device visible\n");
#else
  std::printf("cuda:  not built (nvcc not found or KSA_CUDA=OFF)\n");
#endif
  std::printf("\nKSA k=%lld S=%lld W=%lld (per head, one layer):\n", (long long)k, (long long)S, (long long)W);
  std::printf("  %10s %16s %16s %8s %14s %14s\n", "T", "visible pairs", "causal pairs", "ratio", "cache rows", "full rows");
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
