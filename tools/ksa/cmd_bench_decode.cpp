// `ksa bench-decode`: one decode step through the compressed cache on the GPU (KvCacheGpu +
// ksa::cuda::attention_decode), timed with CUDA events (median of reps after a warm-up), for B=1 at T=16K and
// 128K and B=64 sequences of mixed lengths 4K..128K. Effective GB/s counts the K/V bytes the step's tokens
// actually see (visible key rows x Hkv x D x 2 tensors x 2 bytes). run() alone is timed; the plan's host
// work (with its one upload queued) is printed separately, the median of plan + cancel after a first plan
// that allocates the workspaces. run() repeated rewrites the same rows, so it is idempotent. The same run is
// also captured in a CUDA graph and replayed: on an idle GPU (the host's launch included), and behind a
// memset that flushes L2 and hides the launch (the GPU's time for the step; triton.testing.do_bench's
// convention, which the PyTorch reference in bench/gpu/decode_ref.py uses too); and run() itself queued behind
// that memset (do_bench calls a function eagerly).
#ifdef KSA_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cli.hpp"
#include "common.hpp"
#include "cuda_bench.hpp"
#include "ksa/cuda.hpp"
#include "ksa/cuda_cache.hpp"
#include "ksa/error.hpp"

namespace ksa::tools {
namespace {

struct Result {
  double us = 0, graph_us = 0, step_us = 0, eager_us = 0, gbs = 0, plan_us = 0;
  int64_t units = 0, key_rows = 0;
};

Result bench_case(const std::vector<int64_t>& T, int64_t Hq, int64_t Hkv, int64_t D, int64_t k, int64_t S, int64_t W,
                  int64_t P, int64_t reps, int64_t split_rows) {
  cudaStream_t st;
  cuda_check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
  const int64_t tmax = *std::max_element(T.begin(), T.end());
  KvCacheConfig cfg;
  cfg.spec.chunk_size = k, cfg.spec.S = S, cfg.spec.W = W;
  cfg.Hkv = Hkv, cfg.D = D, cfg.dtype = DType::bf16, cfg.max_text_tokens = tmax + 64, cfg.block_rows = P;
  cfg.ring_slack_rows = 64;
  Result res;
  {
    cuda::KvCacheGpuOptions opt;
    opt.split_rows = split_rows;
    cuda::KvCacheGpu cache(cfg, st, opt);
    // One source stream (the longest) reused for every sequence's prefill.
    const int64_t Lmax = Layout(k, S, tmax).length(), row = Hkv * D;
    std::mt19937_64 rng(1);
    DeviceBuf src(size_t(Lmax * row * 2));
    cuda_check(cudaMemcpy(src.p, random_tensor(DType::bf16, Lmax * row, rng).data(), size_t(Lmax * row * 2),
                          cudaMemcpyHostToDevice),
               "upload");
    std::vector<SeqId> ids;
    std::vector<int64_t> n;
    for (int64_t t : T) {
      const SeqId id = cache.add_sequence();
      const int64_t L = Layout(k, S, t).length();
      const KvRows r = KvRows::dense(src.p, L, Hkv, D, DType::bf16);
      cache.prefill(id, r, r);
      ids.push_back(id);
      n.push_back(1);
    }
    const int64_t B = int64_t(T.size());
    DeviceBuf q(size_t(B * Hq * D * 2)), kv(size_t(B * Hkv * D * 2)), out(size_t(B * Hq * D * 2)),
        lse(size_t(B * Hq * 4));
    cuda_check(cudaMemcpy(q.p, random_tensor(DType::bf16, B * Hq * D, rng).data(), size_t(B * Hq * D * 2),
                          cudaMemcpyHostToDevice),
               "q");
    cuda_check(cudaMemcpy(kv.p, random_tensor(DType::bf16, B * Hkv * D, rng).data(), size_t(B * Hkv * D * 2),
                          cudaMemcpyHostToDevice),
               "kv");
    DecodeIO io;
    io.Hq = Hq;
    io.dtype = DType::bf16;
    io.q = TensorView::dense(q.p, B, Hq, D);
    io.k = io.v = TensorView::dense(kv.p, B, Hkv, D);
    io.out = TensorView::dense(out.p, B, Hq, D);
    io.lse = static_cast<float*>(lse.p);
    cuda_check(cudaStreamSynchronize(st), "prefill");
    // The plan's host work in steady state: the first plan allocates the workspaces (not timed), then
    // plan + cancel repeated, median.
    cache.plan_decode(ids, n, io);
    cache.cancel_decode();
    std::vector<double> pt;
    for (int64_t r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      cache.plan_decode(ids, n, io);
      pt.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      cache.cancel_decode();
    }
    std::sort(pt.begin(), pt.end());
    res.plan_us = pt[pt.size() / 2];
    cache.plan_decode(ids, n, io);
    const auto stats = cache.plan_stats();
    res.units = stats.units;
    res.key_rows = stats.key_rows;
    auto time = [&](auto&& f) { return median_event_ms(st, reps, f) * 1e3; };  // us
    res.us = time([&] { cache.run(); });
    cudaGraph_t g;
    cudaGraphExec_t ge;
    cuda_check(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), "capture");
    cache.run();
    cuda_check(cudaStreamEndCapture(st, &g), "end capture");
    cuda_check(cudaGraphInstantiate(&ge, g, 0), "instantiate");
    res.graph_us = time([&] { cuda_check(cudaGraphLaunch(ge, st), "graph launch"); });
    {
      constexpr size_t kFlush = size_t(256) << 20;  // > the 50 MB L2 of an H100/H200
      DeviceBuf flush(kFlush);
      res.step_us = median_event_ms(
                        st, reps, [&] { cuda_check(cudaGraphLaunch(ge, st), "graph launch"); }, &flush, kFlush) *
                    1e3;
      res.eager_us = median_event_ms(
                         st, reps, [&] { cache.run(); }, &flush, kFlush) *
                     1e3;
    }
    cache.commit_decode();
    cuda_check(cudaStreamSynchronize(st), "sync");
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    const double bytes = double(stats.key_rows) * double(Hkv * D * 2 * 2);
    res.gbs = bytes / (res.step_us * 1e-6) / 1e9;
  }
  cudaStreamDestroy(st);
  return res;
}

int run_bench_decode(int argc, char** argv) {
  cli::Flags f("bench-decode", "one decode step through the compressed cache on the GPU (CUDA events)");
  int64_t& reps = f.i64("--reps", 50, "timed repetitions (median)", 1, 1000000);
  int64_t& P = f.i64("--block-rows", 64, "cache block rows", 1, 65536);
  int64_t& batch = f.i64("--batch", 64, "sequences of the mixed-length case", 1, 4096);
  int64_t& split =
      f.i64("--split-rows", 0, "keys per attention work unit (0 = the plan's choice; at most 255 x block rows)", 0,
            255 * 65536);
  int64_t& only =
      f.i64("--case", 0, "run one case only: 1 = B=1 T=16K, 2 = B=1 T=128K, 3 = the batch case (0 = all)", 0, 3);
  int64_t& context = f.i64("--context", 0, "the batch case's context per sequence (0 = lengths drawn from 4K..128K)", 0,
                           int64_t(1) << 30);
  int64_t& window = f.i64("--window", 128,
                          "text window W in chunks (0 = a full-attention layer: W·k covers the context, every "
                          "earlier text row visible, no summaries stored, as the engine's hybrid layers)",
                          0, int64_t(1) << 30);
  if (!f.parse(argc, argv)) return 0;
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench-decode: no CUDA device visible\n");
    return 1;
  }
  std::printf("device: %s\nshape: 32/8 heads, D=128, bf16, k=8, S=1, W=%s, block_rows=%lld\n",
              cuda::device_description().c_str(), window == 0 ? "full" : std::to_string(window).c_str(), (long long)P);
  std::printf(
      "run us / graph us: run() / its graph launched on an idle GPU (includes the host's launch);\n"
      "step us: the graph behind a 256 MiB memset (cold L2, launch overlapped: GPU time, as do_bench);\n"
      "eager us: run() itself behind the memset (do_bench's call of a function); GB/s: visible K/V bytes / "
      "step us\n");
  std::printf("%-26s %10s %10s %10s %10s %10s %10s %8s %12s\n", "case", "run us", "graph us", "step us", "eager us",
              "GB/s", "plan us", "units", "key rows");
  std::mt19937_64 rng(7);
  std::vector<int64_t> mixed;
  for (int64_t i = 0; i < batch; ++i)
    mixed.push_back(context ? context : std::uniform_int_distribution<int64_t>(4096, 131072)(rng));
  struct Case {
    std::string name;
    std::vector<int64_t> T;
  } cases[] = {{"B=1 T=16K", {16384}},
               {"B=1 T=128K", {131072}},
               {context ? "B=" + std::to_string(batch) + " T=" + std::to_string(context)
                        : "B=" + std::to_string(batch) + " mixed 4K-128K",
                mixed}};
  for (const Case& c : cases) {
    if (only != 0 && &c != &cases[only - 1]) continue;
    // W = 0: the engine's full-attention layers (model.cpp: W·k >= the context limit).
    const int64_t W = window != 0 ? window : (*std::max_element(c.T.begin(), c.T.end()) + 64) / 8 + 2;
    const Result r = bench_case(c.T, 32, 8, 128, 8, 1, W, P, reps, split);
    std::printf("%-26s %10.2f %10.2f %10.2f %10.2f %10.1f %10.1f %8lld %12lld\n", c.name.c_str(), r.us, r.graph_us,
                r.step_us, r.eager_us, r.gbs, r.plan_us, (long long)r.units, (long long)r.key_rows);
  }
  std::printf(
      "targets (H200, on step us: the timing of the issue's PyTorch reference numbers): B=1 T=128K <= 25 us; "
      "B=1 T=16K <= 8 us; B=64 mixed >= 3225 GB/s (75%% of 4.3 TB/s)\n");
  return 0;
}

cli::Register reg{{"bench-decode", "time one GPU decode step through the compressed KV cache", run_bench_decode}};

}  // namespace
}  // namespace ksa::tools
#endif  // KSA_HAVE_CUDA
