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
namespace {

struct CallTimes {
  double fwd_ms = 0, bwd_ms = 0;  // bwd_ms: 0 without --bwd
  bool ok = false;                // the oracle check passed
};

// One call shape timed: a single stream of layout `lay` (B entries), or with `cu` the packed streams of those
// row boundaries (B = 1; lay gives k, S, tail). pairs: its visible pairs per head and batch entry.
CallTimes time_call(const AttnArgs& a, const Layout& lay, const std::vector<int64_t>* cu, int64_t pairs) {
  const int64_t B = cu ? 1 : a.B, L = cu ? cu->back() : lay.length(), es = dtype_size(a.dtype);
  const int64_t nq = B * L * a.Hq * a.D, nkv = B * L * a.Hkv * a.D;
  std::mt19937_64 rng(1);
  auto q = random_tensor(a.dtype, nq, rng), k = random_tensor(a.dtype, nkv, rng), v = random_tensor(a.dtype, nkv, rng);
  auto dout = random_tensor(a.dtype, nq, rng);
  DeviceBuf dq_(size_t(nq * es)), dk_(size_t(nkv * es)), dv_(size_t(nkv * es)), dout_(size_t(nq * es)),
      dO(size_t(nq * es)), dlse(size_t(B * L * a.Hq * 4)), gq(size_t(nq * es)), gk(size_t(nkv * es)),
      gv(size_t(nkv * es));
  cuda_check(cudaMemcpy(dq_.p, q.data(), q.size(), cudaMemcpyHostToDevice), "copy q");
  cuda_check(cudaMemcpy(dk_.p, k.data(), k.size(), cudaMemcpyHostToDevice), "copy k");
  cuda_check(cudaMemcpy(dv_.p, v.data(), v.size(), cudaMemcpyHostToDevice), "copy v");
  cuda_check(cudaMemcpy(dout_.p, dout.data(), dout.size(), cudaMemcpyHostToDevice), "copy dout");

  AttentionBackwardParams p =
      dense_params(lay, a.W, B, a.Hq, a.Hkv, a.D, a.dtype,
                   {dq_.p, dk_.p, dv_.p, dO.p, static_cast<float*>(dlse.p), dout_.p, gq.p, gk.p, gv.p});
  if (cu) {  // the same buffers as L rows of packed streams
    p.cu_seqlens = cu->data();
    p.num_seqs = int64_t(cu->size()) - 1;
    for (TensorView* t : {&p.q, &p.out, &p.dout, &p.dq}) *t = TensorView::dense(t->data, L, a.Hq, a.D);
    for (TensorView* t : {&p.k, &p.v, &p.dk, &p.dv}) *t = TensorView::dense(t->data, L, a.Hkv, a.D);
  }

  // KSA_CUDA_FWD_CONFIG, KSA_CUDA_BWD_* (include/ksa/cuda_env.hpp): kernel variants for comparisons.
  const cuda::KernelOptions opts = cuda::kernel_options_from_env();
  const double fwd_flops = 4.0 * double(a.D) * double(pairs) * double(a.Hq) * double(B);
  CallTimes t;
  t.fwd_ms = median_event_ms(nullptr, a.reps, [&] { cuda::attention_forward(p, nullptr, opts); });
  std::printf("forward:  median %9.3f ms (%lld reps after 1 warm-up)  %8.1f TFLOP/s useful\n", t.fwd_ms,
              (long long)a.reps, fwd_flops / (t.fwd_ms * 1e-3) * 1e-12);
  if (a.bwd) {
    t.bwd_ms = median_event_ms(nullptr, a.reps, [&] { cuda::attention_backward(p, nullptr, opts); });
    std::printf("backward: median %9.3f ms (%lld reps after 1 warm-up)  %8.1f TFLOP/s useful (2.5 x fwd FLOPs)\n",
                t.bwd_ms, (long long)a.reps, 2.5 * fwd_flops / (t.bwd_ms * 1e-3) * 1e-12);
  }

  // Oracle check of sampled forward rows (first, last, random) of batch entry 0.
  std::vector<uint8_t> out(size_t(nq * es));
  cuda_check(cudaMemcpy(out.data(), dO.p, out.size(), cudaMemcpyDeviceToHost), "copy out");
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
  t.ok = err <= 0.05;
  return t;
}

// The fewest text tokens whose single stream has at least `pairs` visible pairs.
int64_t text_for_pairs(const AttnArgs& a, int64_t pairs) {
  int64_t lo = 1, hi = 1;
  while (count_visible_pairs(Layout(a.k, a.S, hi, a.tail), a.W) < pairs) hi *= 2;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (count_visible_pairs(Layout(a.k, a.S, mid, a.tail), a.W) < pairs) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

void print_shape(const AttnArgs& a, const Layout& lay, int64_t B) {
  std::printf("T=%lld -> L=%lld (k=%lld S=%lld W=%lld%s), B=%lld, heads %lld/%lld, D=%lld, %s\n", (long long)lay.T,
              (long long)lay.length(), (long long)a.k, (long long)a.S, (long long)a.W, a.tail ? " tail" : "",
              (long long)B, (long long)a.Hq, (long long)a.Hkv, (long long)a.D, dtype_name(a.dtype));
}

}  // namespace

int run_attn_cuda(const AttnArgs& a) {
  if (cuda::device_count() == 0) fail("--device cuda: no CUDA device visible");
  const cuda::KernelOptions opts = cuda::kernel_options_from_env();
  std::printf("ksa bench attn: device cuda (%s)\n", cuda::device_description().c_str());
  std::printf("forward kernel: configuration %d%s\n", cuda::pick_forward(a.D, opts),
              opts.forward_config >= 0 ? " (KSA_CUDA_FWD_CONFIG)" : "");
  if (a.docs.empty()) {
    const Layout lay(a.k, a.S, a.T, a.tail);
    print_shape(a, lay, a.B);
    return time_call(a, lay, nullptr, count_visible_pairs(lay, a.W)).ok ? 0 : 1;
  }
  // --docs: the documents as packed streams, then one stream with the same visible pairs.
  std::vector<int64_t> cu{0};
  int64_t pairs = 0, text = 0;
  for (int64_t T : a.docs) {
    const Layout d(a.k, a.S, T, a.tail);
    cu.push_back(cu.back() + d.length());
    pairs += count_visible_pairs(d, a.W);
    text += T;
  }
  std::printf("packed: %zu documents, %lld text tokens, %lld stream rows (k=%lld S=%lld W=%lld%s), heads %lld/%lld, "
              "D=%lld, %s; %lld visible pairs per head\n",
              a.docs.size(), (long long)text, (long long)cu.back(), (long long)a.k, (long long)a.S, (long long)a.W,
              a.tail ? " tail" : "", (long long)a.Hq, (long long)a.Hkv, (long long)a.D, dtype_name(a.dtype),
              (long long)pairs);
  const CallTimes packed = time_call(a, Layout(a.k, a.S, 0, a.tail), &cu, pairs);
  const Layout one(a.k, a.S, text_for_pairs(a, pairs), a.tail);
  std::printf("one stream of the same visible pairs (%lld): ", (long long)count_visible_pairs(one, a.W));
  print_shape(a, one, 1);
  AttnArgs a1 = a;
  a1.B = 1;
  const CallTimes single = time_call(a1, one, nullptr, count_visible_pairs(one, a.W));
  std::printf("packed / one stream: forward %.3fx", packed.fwd_ms / single.fwd_ms);
  if (a.bwd)
    std::printf(", backward %.3fx, forward+backward %.3fx", packed.bwd_ms / single.bwd_ms,
                (packed.fwd_ms + packed.bwd_ms) / (single.fwd_ms + single.bwd_ms));
  std::printf("\n");
  return packed.ok && single.ok ? 0 : 1;
}

}  // namespace ksa::tools
#endif
