// `ksa bench-gemm`: the matrix products of one decode step of a Qwen3 shape (default: the 4B shape) through
// ksa::cuda::Gemm, the engine's own entry point (the thin kernel for M <= 8 rows, cuBLASLt above), timed with
// CUDA events (median of reps, each behind a 256 MiB memset: cold L2, launch hidden).
//   alone us: one product on one weight matrix;
//   chain us: `layers` products of that kind on as many distinct weight matrices (the weights of a real
//             step are not in L2 either), captured in one CUDA graph, per product: what the product costs
//             between its neighbours in a replayed step (the thin kernel's programmatic launches overlap a
//             product's ramp with its predecessor's tail);
//   GB/s:     weight bytes / chain us (alone us for the head, which a step runs once).
// Last, "step": every layer's qkv, o, gate|up (SwiGLU) and down, then the head, in one graph: the products of
// a decode step without the norms and attention between them, against the weight bytes.
// --gemv-shape compares the thin kernel's block shapes on batch-1 products (Gemm::gemv_shapes()).
#ifdef KSA_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "cuda_bench.hpp"
#include "ksa/cuda.hpp"
#include "ksa/cuda_dense.hpp"
#include "ksa/error.hpp"

namespace ksa::tools {
namespace {

constexpr size_t kFlush = size_t(256) << 20;  // > the 50 MB L2 of an H100/H200

// Median us of the work f queues, captured once into a graph and replayed behind the L2 flush.
double graph_us(cudaStream_t st, int64_t reps, const std::function<void()>& f, const DeviceBuf& flush) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  cuda_check(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), "capture");
  f();
  cuda_check(cudaStreamEndCapture(st, &g), "end capture");
  cuda_check(cudaGraphInstantiate(&ge, g, 0), "instantiate");
  const double us = median_event_ms(
                        st, reps, [&] { cuda_check(cudaGraphLaunch(ge, st), "graph launch"); }, &flush, kFlush) *
                    1e3;
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  return us;
}

struct Product {
  const char* name;
  int64_t N, K;  // W [N, K] (gate|up: [2I, K], run as SwiGLU with I = N / 2)
  bool swiglu;
  DType ydt;
  int64_t copies;  // distinct weight matrices (the chain's length)
};

int run_bench_gemm(int argc, char** argv) {
  cli::Flags f("bench-gemm", "the matrix products of one decode step on the GPU (ksa::cuda::Gemm, CUDA events)");
  int64_t& H = f.i64("--hidden", 2560, "hidden size", 8, 1 << 20);
  int64_t& I = f.i64("--intermediate", 9728, "MLP intermediate size", 8, 1 << 20);
  int64_t& Hq = f.i64("--heads", 32, "query heads", 1, 4096);
  int64_t& Hkv = f.i64("--kv-heads", 8, "key/value heads", 1, 4096);
  int64_t& D = f.i64("--head-dim", 128, "head dim", 8, 1024);
  int64_t& V = f.i64("--vocab", 151936, "vocabulary (the head's rows)", 8, int64_t(1) << 24);
  int64_t& L = f.i64("--layers", 36, "layers (the chain's length and the step's)", 1, 1024);
  int64_t& reps = f.i64("--reps", 20, "timed repetitions (median)", 1, 100000);
  std::vector<int64_t>& Ms = f.i64s("-b,--batch", {1, 64}, "rows of x (sequences of a decode step), a list", 1, 4096);
  std::vector<int64_t>& shapes =
      f.i64s("--gemv-shape", {0}, "thin-kernel block shapes to compare on batch 1 (a list; see the table)", 0, 255);
  bool& no_gemv = f.flag("--no-cuda-gemv", "cuBLASLt for every product (no thin kernel)");
  bool& autotune = f.flag("--gemm-autotune", "cuBLASLt's fastest of its first 8 candidates (Gemm's autotune)");
  if (!f.parse(argc, argv)) return 0;
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench-gemm: no CUDA device visible\n");
    return 1;
  }
  for (int64_t s : shapes)
    if (s >= cuda::Gemm::gemv_shapes())
      throw cli::UsageError("--gemv-shape: " + std::to_string(s) + " is not a shape (0.." +
                            std::to_string(cuda::Gemm::gemv_shapes() - 1) + ")");
  std::printf("device: %s\nshape: hidden %lld, intermediate %lld, %lld/%lld heads x %lld, vocab %lld, %lld layers\n",
              cuda::device_description().c_str(), (long long)H, (long long)I, (long long)Hq, (long long)Hkv,
              (long long)D, (long long)V, (long long)L);
  for (int s = 0; s < cuda::Gemm::gemv_shapes(); ++s)
    std::printf("gemv shape %d: %s%s\n", s, cuda::Gemm::gemv_shape_name(s).c_str(), s == 0 ? " (the engine's)" : "");
  const std::vector<Product> prods = {{"qkv", (Hq + 2 * Hkv) * D, H, false, DType::f32, L},
                                      {"o", H, Hq * D, false, DType::f32, L},
                                      {"gate|up+swiglu", 2 * I, H, true, DType::bf16, L},
                                      {"down", H, I, false, DType::f32, L},
                                      {"head", V, H, false, DType::f32, 1}};
  cudaStream_t st;
  cuda_check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
  {
    DeviceBuf flush(kFlush);
    // Weights: distinct matrices per product kind (a constant bf16 fill: the time does not depend on values).
    std::vector<std::vector<std::unique_ptr<DeviceBuf>>> W(prods.size());
    double weight_bytes = 0;
    for (size_t p = 0; p < prods.size(); ++p) {
      const size_t bytes = size_t(prods[p].N * prods[p].K * 2);
      for (int64_t c = 0; c < prods[p].copies; ++c) {
        W[p].push_back(std::make_unique<DeviceBuf>(bytes));
        cuda_check(cudaMemset(W[p].back()->p, 0x3c, bytes), "fill");
      }
      weight_bytes += double(bytes) * double(p + 1 == prods.size() ? 1 : L);
    }
    int64_t maxM = 1, maxK = 1, maxN = 1;
    for (int64_t m : Ms) maxM = std::max(maxM, m);
    for (const Product& p : prods) maxK = std::max(maxK, p.K), maxN = std::max(maxN, p.N);
    DeviceBuf x(size_t(maxM * maxK * 2)), y(size_t(maxM * maxN * 4));
    cuda_check(cudaMemset(x.p, 0x3c, size_t(maxM * maxK * 2)), "fill x");
    cuda_check(cudaDeviceSynchronize(), "fill");
    cuda::Gemm gemm(st, !no_gemv, autotune);
    auto run = [&](const Product& p, const void* w, int64_t M) {
      if (p.swiglu && gemm.swiglu_fits(x.p, M, p.K, w, p.N / 2)) gemm.run_swiglu(x.p, M, p.K, w, p.N / 2, y.p);
      else gemm.run(x.p, M, p.K, w, p.N, y.p, p.ydt);  // wider: the product alone
    };
    std::printf("%-16s %6s %6s %10s %10s %10s %10s\n", "product", "batch", "shape", "MB", "alone us", "chain us",
                "GB/s");
    for (int64_t M : Ms) {
      for (int64_t sh : shapes) {
        if (sh != 0 && (M != 1 || no_gemv)) continue;  // the shapes apply to batch-1 thin products only
        gemm.set_gemv_shape(int(sh));
        double step_sum = 0;
        // Each product once outside the graphs: the plans (and with --gemm-autotune their timed choices) are made
        // at a product's first use, which a capture cannot time.
        for (size_t pi = 0; pi < prods.size(); ++pi) run(prods[pi], W[pi][0]->p, M);
        cuda_check(cudaStreamSynchronize(st), "warm-up");
        for (size_t pi = 0; pi < prods.size(); ++pi) {
          const Product& p = prods[pi];
          const double mb = double(p.N * p.K * 2) / 1e6;
          const double alone = graph_us(
              st, reps, [&] { run(p, W[pi][0]->p, M); }, flush);
          double chain = alone;
          if (p.copies > 1)
            chain = graph_us(
                        st, reps,
                        [&] {
                          for (auto& w : W[pi]) run(p, w->p, M);
                        },
                        flush) /
                    double(p.copies);
          step_sum += chain * double(p.copies > 1 ? L : 1);
          std::printf("%-16s %6lld %6lld %10.1f %10.2f %10.2f %10.1f\n", p.name, (long long)M, (long long)sh, mb, alone,
                      chain, mb * 1e3 / chain);
        }
        const double step = graph_us(
            st, reps,
            [&] {
              for (int64_t l = 0; l < L; ++l)
                for (size_t pi = 0; pi + 1 < prods.size(); ++pi) run(prods[pi], W[pi][size_t(l)]->p, M);
              run(prods.back(), W.back()[0]->p, M);
            },
            flush);
        std::printf("%-16s %6lld %6lld %10.1f %10s %10.2f %10.1f   (sum of chains %.1f us)\n", "step", (long long)M,
                    (long long)sh, weight_bytes / 1e6, "-", step, weight_bytes / step / 1e3, step_sum);
      }
    }
  }
  cudaStreamDestroy(st);
  return 0;
}

cli::Register reg{{"bench-gemm", "time the matrix products of one decode step on the GPU", run_bench_gemm}};

}  // namespace
}  // namespace ksa::tools
#endif  // KSA_HAVE_CUDA
