// `ksa bench attn --device cuda`: the CUDA kernels timed with CUDA events (median of reps after a warm-up),
// useful TFLOP/s from the exact pair count, and an oracle check of sampled forward rows.
#ifdef KSA_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bench_attn.hpp"
#include "common.hpp"
#include "cuda_bench.hpp"
#include "ksa/cpu.hpp"
#include "ksa/cuda.hpp"
#include "ksa/cuda_env.hpp"

namespace ksa::tools {

int run_attn_cuda(const AttnArgs& a) {
  if (cuda::device_count() == 0) fail("--device cuda: no CUDA device visible");
  const Layout lay(a.k, a.S, a.T, a.tail);
  const int64_t L = lay.length(), es = dtype_size(a.dtype);
  const int64_t nq = a.B * L * a.Hq * a.D, nkv = a.B * L * a.Hkv * a.D;
  std::mt19937_64 rng(1);
  auto q = random_tensor(a.dtype, nq, rng), k = random_tensor(a.dtype, nkv, rng), v = random_tensor(a.dtype, nkv, rng);
  auto dout = random_tensor(a.dtype, nq, rng);
  DeviceBuf dq_(size_t(nq * es)), dk_(size_t(nkv * es)), dv_(size_t(nkv * es)), dout_(size_t(nq * es)),
      dO(size_t(nq * es)), dlse(size_t(a.B * L * a.Hq * 4)), gq(size_t(nq * es)), gk(size_t(nkv * es)),
      gv(size_t(nkv * es));
  cuda_check(cudaMemcpy(dq_.p, q.data(), q.size(), cudaMemcpyHostToDevice), "copy q");
  cuda_check(cudaMemcpy(dk_.p, k.data(), k.size(), cudaMemcpyHostToDevice), "copy k");
  cuda_check(cudaMemcpy(dv_.p, v.data(), v.size(), cudaMemcpyHostToDevice), "copy v");
  cuda_check(cudaMemcpy(dout_.p, dout.data(), dout.size(), cudaMemcpyHostToDevice), "copy dout");

  const AttentionBackwardParams p =
      dense_params(lay, a.W, a.B, a.Hq, a.Hkv, a.D, a.dtype,
                   {dq_.p, dk_.p, dv_.p, dO.p, static_cast<float*>(dlse.p), dout_.p, gq.p, gk.p, gv.p});

  // KSA_CUDA_FWD_CONFIG, KSA_CUDA_BWD_* (include/ksa/cuda_env.hpp): kernel variants for comparisons.
  const cuda::KernelOptions opts = cuda::kernel_options_from_env();
  const int64_t pairs = count_visible_pairs(lay, a.W);
  const double fwd_flops = 4.0 * double(a.D) * double(pairs) * double(a.Hq) * double(a.B);
  std::printf(
      "ksa bench attn: device cuda (%s), T=%lld -> L=%lld (k=%lld S=%lld W=%lld%s), B=%lld, heads %lld/%lld, "
      "D=%lld, %s\n",
      cuda::device_description().c_str(), (long long)a.T, (long long)L, (long long)a.k, (long long)a.S, (long long)a.W,
      a.tail ? " tail" : "", (long long)a.B, (long long)a.Hq, (long long)a.Hkv, (long long)a.D, dtype_name(a.dtype));
  std::printf("forward kernel: configuration %d%s\n", cuda::pick_forward(a.D, opts),
              opts.forward_config >= 0 ? " (KSA_CUDA_FWD_CONFIG)" : "");
  const double fms = median_event_ms(nullptr, a.reps, [&] { cuda::attention_forward(p, nullptr, opts); });
  std::printf("forward:  median %9.3f ms (%lld reps after 1 warm-up)  %8.1f TFLOP/s useful\n", fms, (long long)a.reps,
              fwd_flops / (fms * 1e-3) * 1e-12);
  if (a.bwd) {
    const double bms = median_event_ms(nullptr, a.reps, [&] { cuda::attention_backward(p, nullptr, opts); });
    std::printf("backward: median %9.3f ms (%lld reps after 1 warm-up)  %8.1f TFLOP/s useful (2.5 x fwd FLOPs)\n", bms,
                (long long)a.reps, 2.5 * fwd_flops / (bms * 1e-3) * 1e-12);
  }

  // Oracle check of sampled forward rows (first, last, random) of batch entry 0.
  std::vector<uint8_t> out(size_t(nq * es));
  std::vector<float> lse(size_t(a.B * L * a.Hq));
  cuda_check(cudaMemcpy(out.data(), dO.p, out.size(), cudaMemcpyDeviceToHost), "copy out");
  cuda_check(cudaMemcpy(lse.data(), dlse.p, lse.size() * 4, cudaMemcpyDeviceToHost), "copy lse");
  AttentionParams hp = p;
  hp.B = 1;
  hp.q.data = q.data();
  hp.k.data = k.data();
  hp.v.data = v.data();
  hp.out.data = out.data();
  std::vector<int64_t> rows = {0, L - 1};
  std::uniform_int_distribution<int64_t> pick(0, L - 1);
  while (rows.size() < 16) rows.push_back(pick(rng));
  const auto ref = cpu::attention_reference(hp, rows);
  double err = 0;
  for (size_t r = 0; r < rows.size(); ++r)
    for (int64_t h = 0; h < a.Hq; ++h)
      for (int64_t d = 0; d < a.D; ++d) {
        const double got = load_as_float(a.dtype, out.data(), (rows[r] * a.Hq + h) * a.D + d);
        const double e = std::abs(got - ref.out[(r * size_t(a.Hq) + size_t(h)) * size_t(a.D) + size_t(d)]);
        err = std::isnan(e) ? INFINITY : std::max(err, e);
      }
  std::printf("oracle check: %zu rows x %lld heads, max |out - ref| = %.3g\n", rows.size(), (long long)a.Hq, err);
  return err <= 0.05 ? 0 : 1;
}

}  // namespace ksa::tools
#endif
