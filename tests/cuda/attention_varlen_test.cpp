// Packed sequences (AttentionParams::cu_seqlens) in the CUDA kernels: one packed call against one call per
// stream (sequence_params) on the same buffers, and against the CPU oracle. Every CUDA path that supports()
// accepts: the default (the sm_90a wgmma kernels on compute capability 9.0), the portable forward configs
// (KernelOptions::forward_config 0..4), the portable backward passes (backward_sm90a false), the fused dQ.
//
// Bitwise where the per-tile arithmetic is the same: a packed CTA runs its tile exactly as the call on its
// stream alone (varlen_plan.hpp), so out, lse and (deterministic) dq are bitwise equal; dk and dv are too when
// both calls split the dK/dV lists alike (backward_split forced: the automatic split depends on the whole
// call's work). Otherwise (the fused dQ's fp32 reduce-adds, an automatic split) the two differ only in the
// order of an fp32 sum before the final rounding to the input dtype: at most about one unit in the last place
// per element, so relative L2 <= 2^-7 (bf16) / 2^-10 (f16). Skipped (with a message) without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention_bwd_plan.hpp"
#include "gpu_test_util.hpp"
#include "ksa/cpu.hpp"
#include "ksa/cuda.hpp"
#include "ksa/error.hpp"

namespace ksa {
namespace {

struct VarlenCase {
  std::vector<int64_t> texts;  // text tokens of each stream
  int64_t k, S, W;
  bool tail;
  int64_t Hq, Hkv, D;
  DType dt;
  int64_t rpad;  // elements of padding after every row of every tensor (a multiple of 8): strided views
};

std::string describe(const VarlenCase& c) {
  std::string s = "texts=";
  for (int64_t T : c.texts) s += std::to_string(T) + ",";
  char buf[200];
  std::snprintf(buf, sizeof buf, " k=%lld S=%lld W=%lld tail=%d H=%lld/%lld D=%lld %s rpad=%lld", (long long)c.k,
                (long long)c.S, (long long)c.W, int(c.tail), (long long)c.Hq, (long long)c.Hkv, (long long)c.D,
                dtype_name(c.dt), (long long)c.rpad);
  return s + buf;
}

// Streams of 1, 7 (shorter than a chunk), 9, 130 and 1000 text tokens mixed, empty streams, one stream
// alone, S = 1 and 2, tail summaries, W = 0 and W >= #chunks, GQA 2 and 4 and 8, D = 64 and 128, bf16 and
// f16, strided rows, k = 1 (long summary lists: split), many short streams.
std::vector<VarlenCase> cases() {
  const DType bf = DType::bf16, hf = DType::f16;
  std::vector<VarlenCase> c = {
      {{1, 7, 9, 130, 1000}, 8, 1, 2, false, 4, 2, 128, bf, 0},
      {{1000, 9, 1, 130, 7}, 8, 2, 3, true, 4, 2, 64, bf, 8},
      {{0, 5, 0, 300, 1, 0}, 8, 1, 0, false, 2, 1, 128, hf, 0},
      {{7, 1000, 1}, 4, 2, 1000, false, 8, 1, 64, hf, 16},                  // W >= #chunks: causal text
      {{2000}, 8, 1, 16, false, 4, 2, 128, bf, 0},                          // one stream
      {{400, 1, 300}, 1, 1, 2, false, 2, 1, 128, bf, 8},                    // k = 1: long summary lists
      {{3, 64, 65, 1, 127, 128, 129, 5}, 64, 1, 1, true, 2, 2, 64, bf, 0},  // chunks larger than a tile
  };
  std::mt19937_64 rng(77);
  VarlenCase many{{}, 8, 1, 4, false, 4, 2, 128, bf, 0};
  for (int i = 0; i < 40; ++i) many.texts.push_back(int64_t(rng() % 60));
  c.push_back(many);
  return c;
}

// The tensors of a packed call, all [1, L, H, D] with rows of H * D + rpad elements, on the device: inputs
// q, k, v, dout; two sets of outputs (0: the packed call, 1: the calls per stream), NaN-poisoned.
struct Problem {
  VarlenCase c;
  std::vector<int64_t> cu{0};
  int64_t L = 0;
  std::vector<uint16_t> hq, hk, hv, hdout;
  std::unique_ptr<test::DevMem> q, k, v, dout, out[2], lse[2], dq[2], dk[2], dv[2];
  cuda::KernelOptions opts;  // the kernel variant every call of this problem runs

  Problem(const VarlenCase& c_, uint64_t seed) : c(c_) {
    for (int64_t T : c.texts) cu.push_back(cu.back() + Layout(c.k, c.S, T, c.tail).length());
    L = cu.back();
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    auto input = [&](std::vector<uint16_t>& h, std::unique_ptr<test::DevMem>& d, int64_t H) {
      h.assign(size_t(L * row(H)), 0);
      for (auto& x : h) store_from_float(c.dt, &x, 0, nd(rng));
      d = std::make_unique<test::DevMem>(h.size() * 2);
      if (d->p) cudaMemcpy(d->p, h.data(), h.size() * 2, cudaMemcpyHostToDevice);
    };
    input(hq, q, c.Hq), input(hk, k, c.Hkv), input(hv, v, c.Hkv), input(hdout, dout, c.Hq);
    for (int i = 0; i < 2; ++i) {
      out[i] = std::make_unique<test::DevMem>(size_t(L * row(c.Hq)) * 2);
      lse[i] = std::make_unique<test::DevMem>(size_t(L * c.Hq) * 4);
      dq[i] = std::make_unique<test::DevMem>(size_t(L * row(c.Hq)) * 2);
      dk[i] = std::make_unique<test::DevMem>(size_t(L * row(c.Hkv)) * 2);
      dv[i] = std::make_unique<test::DevMem>(size_t(L * row(c.Hkv)) * 2);
    }
  }
  bool allocated() const {
    for (int i = 0; i < 2; ++i)
      if (!out[i]->p || !lse[i]->p || !dq[i]->p || !dk[i]->p || !dv[i]->p) return false;
    return q->p && k->p && v->p && dout->p;
  }
  int64_t row(int64_t H) const { return H * c.D + c.rpad; }
  TensorView view(const test::DevMem& m, int64_t H) const { return TensorView{m.p, L * row(H), row(H), c.D}; }
  // Packed params: the forward writes out/lse of set `fs`; the backward reads out/lse of set `fs` and writes
  // the gradients of set `bs`.
  AttentionBackwardParams params(int fs, int bs, bool deterministic = false) const {
    AttentionBackwardParams p;
    p.layout = Layout(c.k, c.S, 0, c.tail);
    p.W = c.W;
    p.Hq = c.Hq, p.Hkv = c.Hkv, p.D = c.D, p.dtype = c.dt;
    p.q = view(*q, c.Hq), p.k = view(*k, c.Hkv), p.v = view(*v, c.Hkv), p.dout = view(*dout, c.Hq);
    p.out = view(*out[fs], c.Hq), p.lse = lse[fs]->as<float>();
    p.dq = view(*dq[bs], c.Hq), p.dk = view(*dk[bs], c.Hkv), p.dv = view(*dv[bs], c.Hkv);
    p.cu_seqlens = cu.data();
    p.num_seqs = int64_t(c.texts.size());
    p.deterministic = deterministic;
    return p;
  }
  void poison_forward() const {
    for (int i = 0; i < 2; ++i) {
      cudaMemset(out[i]->p, 0xff, size_t(L * row(c.Hq)) * 2);
      cudaMemset(lse[i]->p, 0xff, size_t(L * c.Hq) * 4);
    }
  }
  void poison_backward() const {
    for (int i = 0; i < 2; ++i) {
      cudaMemset(dq[i]->p, 0xff, size_t(L * row(c.Hq)) * 2);
      cudaMemset(dk[i]->p, 0xff, size_t(L * row(c.Hkv)) * 2);
      cudaMemset(dv[i]->p, 0xff, size_t(L * row(c.Hkv)) * 2);
    }
  }
  // One call on the packed params, and one call per stream (sequence_params) on the same buffers.
  void forward_both() const {
    cuda::attention_forward(params(0, 0), nullptr, opts);
    const AttentionBackwardParams each = params(1, 1);
    for (int64_t s = 0; s < each.sequences(); ++s) cuda::attention_forward(sequence_params(each, s), nullptr, opts);
  }
  // Both backward calls read out/lse of set 0 (the packed forward's).
  void backward_both(bool deterministic) const {
    cuda::attention_backward(params(0, 0, deterministic), nullptr, opts);
    const AttentionBackwardParams each = params(0, 1, deterministic);
    for (int64_t s = 0; s < each.sequences(); ++s) cuda::attention_backward(sequence_params(each, s), nullptr, opts);
  }
};

template <class X>
std::vector<X> download(const test::DevMem& m, size_t n) {
  std::vector<X> h(n);
  cudaMemcpy(h.data(), m.p, n * sizeof(X), cudaMemcpyDeviceToHost);
  return h;
}

// The elements of a [L, H, D] tensor with padded rows (the padding is never written, so left out).
std::vector<float> elements(const Problem& pr, const test::DevMem& m, int64_t H) {
  const std::vector<uint16_t> raw = download<uint16_t>(m, size_t(pr.L * pr.row(H)));
  std::vector<float> x;
  x.reserve(size_t(pr.L * H * pr.c.D));
  for (int64_t i = 0; i < pr.L; ++i)
    for (int64_t j = 0; j < H * pr.c.D; ++j) x.push_back(load_as_float(pr.c.dt, raw.data(), i * pr.row(H) + j));
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Relative L2 distance (NaN: infinite).
double rel_l2(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += want[i] * want[i];
  }
  const double r = std::sqrt(num / std::max(den, 1e-300));
  return std::isnan(r) ? INFINITY : r;
}
std::vector<double> as_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }

// The bound between two results that differ only in the order of an fp32 sum (file comment).
double order_tolerance(DType dt) { return dt == DType::bf16 ? 1.0 / 128 : 1.0 / 1024; }

// Worst row of got against want ([rows, D]), relative to max(the row's norm, the RMS row norm).
double worst_row(const std::vector<float>& got, const std::vector<double>& want, int64_t D) {
  const int64_t rows = int64_t(want.size()) / D;
  double den = 0;
  for (double w : want) den += w * w;
  const double rms = std::sqrt(den / double(std::max<int64_t>(rows, 1)));
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double e = 0, n = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double x = got[size_t(r * D + d)], w = want[size_t(r * D + d)];
      e += (x - w) * (x - w);
      n += w * w;
    }
    const double v = std::sqrt(e) / std::max(std::sqrt(n), rms);
    if (!(v <= worst)) worst = std::isnan(v) ? INFINITY : v;
  }
  return worst;
}

// Host params over host copies of the inputs (dense rows of H * D + rpad), for the oracle.
struct HostInputs {
  std::vector<uint16_t> q, k, v, dout, scratch;
  AttentionBackwardParams p;
  explicit HostInputs(const Problem& pr) : q(pr.hq), k(pr.hk), v(pr.hv), dout(pr.hdout) {
    p = pr.params(0, 0);
    auto hv = [&](std::vector<uint16_t>& b, int64_t H) {
      return TensorView{b.data(), pr.L * pr.row(H), pr.row(H), pr.c.D};
    };
    scratch.assign(size_t(pr.L * pr.row(pr.c.Hq)) + 1, 0);
    p.q = hv(q, pr.c.Hq), p.k = hv(k, pr.c.Hkv), p.v = hv(v, pr.c.Hkv), p.dout = hv(dout, pr.c.Hq);
    p.out = p.dq = hv(scratch, pr.c.Hq);  // validated, never read or written by the oracle
    p.dk = p.dv = TensorView{scratch.data(), pr.L * pr.row(pr.c.Hkv), pr.row(pr.c.Hkv), pr.c.D};
    p.lse = nullptr;
  }
};

// Forward: packed == per stream, bitwise (out, lse); packed against the packed oracle (tolerances of
// attention_fwd_test.cpp: max |err| <= 4 ulp of the dtype, relative L2 <= 1e-2 / 2e-3, lse within 1e-3).
void check_forward(const VarlenCase& c, uint64_t seed, bool against_oracle, const cuda::KernelOptions& o = {}) {
  SCOPED_TRACE(describe(c) + " seed " + std::to_string(seed));
  Problem pr(c, seed);
  pr.opts = o;
  ASSERT_TRUE(pr.allocated()) << "cudaMalloc";
  pr.poison_forward();
  pr.forward_both();
  CK(cudaDeviceSynchronize());
  const std::vector<float> out0 = elements(pr, *pr.out[0], c.Hq), out1 = elements(pr, *pr.out[1], c.Hq);
  const std::vector<float> lse0 = download<float>(*pr.lse[0], size_t(pr.L * c.Hq));
  const std::vector<float> lse1 = download<float>(*pr.lse[1], size_t(pr.L * c.Hq));
  EXPECT_TRUE(same_bits(out0, out1)) << "out: packed != per stream";
  EXPECT_TRUE(same_bits(lse0, lse1)) << "lse: packed != per stream";
  for (float x : lse0) ASSERT_TRUE(std::isfinite(x)) << "an lse entry was not written";
  if (!against_oracle) return;
  HostInputs hi(pr);
  const cpu::ReferenceOutput ref = cpu::attention_reference(hi.p);
  const double ulp = c.dt == DType::bf16 ? 1.0 / 256 : 1.0 / 2048;
  double max_err = 0, max_lse = 0;
  for (size_t i = 0; i < out0.size(); ++i) {
    const double e = std::abs(double(out0[i]) - ref.out[i]);
    max_err = std::isnan(e) ? INFINITY : std::max(max_err, e);
  }
  for (size_t i = 0; i < lse0.size(); ++i) {
    const double e = std::abs(double(lse0[i]) - ref.lse[i]);
    max_lse = std::isnan(e) ? INFINITY : std::max(max_lse, e);
  }
  EXPECT_LE(max_err, 4 * ulp);
  EXPECT_LE(rel_l2(out0, ref.out), c.dt == DType::bf16 ? 1e-2 : 2e-3);
  EXPECT_LE(max_lse, 1e-3);
}

// Backward on the packed forward's out and lse. bitwise_dq / bitwise_dkdv: packed == per stream bitwise,
// else within order_tolerance. Against the packed oracle (its own forward from q, k, v; tolerances of
// attention_bwd_test.cpp: relative L2 <= 2e-2 / 5e-3, worst row 4x that).
void check_backward(const VarlenCase& c, uint64_t seed, bool deterministic, bool bitwise_dq, bool bitwise_dkdv,
                    bool against_oracle, const cuda::KernelOptions& o = {}) {
  SCOPED_TRACE(describe(c) + " seed " + std::to_string(seed) + " deterministic " + std::to_string(deterministic));
  Problem pr(c, seed);
  pr.opts = o;
  ASSERT_TRUE(pr.allocated()) << "cudaMalloc";
  cuda::attention_forward(pr.params(0, 0), nullptr, o);
  pr.poison_backward();
  pr.backward_both(deterministic);
  CK(cudaDeviceSynchronize());
  const struct {
    const char* name;
    int64_t H;
    bool bitwise;
    std::unique_ptr<test::DevMem>* m;
  } grads[3] = {
      {"dq", c.Hq, bitwise_dq, pr.dq}, {"dk", c.Hkv, bitwise_dkdv, pr.dk}, {"dv", c.Hkv, bitwise_dkdv, pr.dv}};
  std::vector<float> got[3];
  for (int g = 0; g < 3; ++g) {
    got[g] = elements(pr, *grads[g].m[0], grads[g].H);
    const std::vector<float> each = elements(pr, *grads[g].m[1], grads[g].H);
    for (float x : got[g]) ASSERT_FALSE(std::isnan(x)) << grads[g].name << ": an element was not written";
    if (grads[g].bitwise) {
      EXPECT_TRUE(same_bits(got[g], each)) << grads[g].name << ": packed != per stream";
    } else {
      EXPECT_LE(rel_l2(got[g], as_double(each)), order_tolerance(c.dt)) << grads[g].name << ": packed vs per stream";
    }
  }
  if (!against_oracle) return;
  HostInputs hi(pr);
  const cpu::ReferenceGrads ref = cpu::attention_reference_backward(hi.p);
  const double tol = c.dt == DType::bf16 ? 2e-2 : 5e-3;
  const std::vector<double>* want[3] = {&ref.dq, &ref.dk, &ref.dv};
  for (int g = 0; g < 3; ++g) {
    EXPECT_LE(rel_l2(got[g], *want[g]), tol) << grads[g].name << ": relative L2 against the oracle";
    EXPECT_LE(worst_row(got[g], *want[g], c.D), 4 * tol) << grads[g].name << ": worst row against the oracle";
  }
}

TEST(CudaVarlen, ForwardPackedEqualsPerStream) {
  REQUIRE_GPU();
  std::printf("device: %s\n", cuda::device_description().c_str());
  uint64_t seed = 500;
  for (const VarlenCase& c : cases()) check_forward(c, seed++, true);
}

// Many more work items (query tile, head) than a GPU has SMs (the sm_90a forward is persistent from 8 items
// per SM on: over 1,056 on 132 SMs), in the packed call and in the longest streams' own calls: its CTAs take
// several items each, the producer running ahead across item boundaries (the next item's K/V and Q loads
// under the current one's last tile); the shorter streams' own calls (fewer items) run one CTA per item.
TEST(CudaVarlen, ForwardManyItemsPerCtaPackedEqualsPerStream) {
  REQUIRE_GPU();
  check_forward(VarlenCase{{30000, 50, 25000, 1, 700, 129}, 8, 1, 16, false, 8, 2, 128, DType::bf16, 0}, 550, false);
  check_forward(VarlenCase{{40000, 0, 1700, 9}, 8, 2, 5, true, 16, 4, 64, DType::f16, 8}, 551, false);
}

// The portable kernel's tile configurations (where the sm_90a kernel is the default, they run only when
// asked for).
TEST(CudaVarlen, ForwardPortableConfigsPackedEqualsPerStream) {
  REQUIRE_GPU();
  const std::vector<VarlenCase> cs = cases();
  for (int config : {0, 1, 2, 3, 4}) {
    cuda::KernelOptions o;
    o.forward_config = config;
    SCOPED_TRACE("forward_config " + std::to_string(config));
    check_forward(cs[0], 600, false, o);
    check_forward(cs[1], 601, true, o);
    check_forward(cs[7], 602, false, o);
  }
}

// Deterministic: the separate dQ pass; with the lists split alike, every gradient bitwise.
TEST(CudaVarlen, BackwardDeterministicPackedEqualsPerStream) {
  REQUIRE_GPU();
  uint64_t seed = 700;
  for (int split : {2, 1000000000}) {
    cuda::KernelOptions o;
    o.backward_split = split;
    SCOPED_TRACE("backward_split " + std::to_string(split));
    for (const VarlenCase& c : cases()) check_backward(c, seed++, true, true, true, split == 2, o);
  }
}

// The default: the fused dQ on sm_90a with D = 128 (dq within the order tolerance), the automatic split (dk,
// dv within it too; bitwise when forced alike).
TEST(CudaVarlen, BackwardDefaultPackedMatchesPerStream) {
  REQUIRE_GPU();
  uint64_t seed = 800;
  for (const VarlenCase& c : cases()) check_backward(c, seed++, false, false, false, true);
  cuda::KernelOptions split3;
  split3.backward_split = 3;
  for (const VarlenCase& c : cases()) check_backward(c, seed++, false, false, true, false, split3);
}

// The portable dK/dV and dQ passes where the sm_90a ones would run (backward_sm90a false).
TEST(CudaVarlen, BackwardPortablePassesPackedEqualsPerStream) {
  REQUIRE_GPU();
  cuda::KernelOptions o;
  o.backward_sm90a = false;
  o.backward_split = 2;
  uint64_t seed = 900;
  for (const VarlenCase& c : cases()) {
    check_backward(c, seed, true, true, true, seed % 2 == 0, o);  // the oracle on every other case
    ++seed;
  }
}

// Deterministic packed backward: two runs, the same bits (the automatic split).
TEST(CudaVarlen, BackwardDeterministicIsDeterministic) {
  REQUIRE_GPU();
  const VarlenCase c = cases()[0];
  Problem pr(c, 950);
  ASSERT_TRUE(pr.allocated()) << "cudaMalloc";
  cuda::attention_forward(pr.params(0, 0));
  std::vector<float> runs[2][3];
  for (int r = 0; r < 2; ++r) {
    pr.poison_backward();
    cuda::attention_backward(pr.params(0, 0, true));
    CK(cudaDeviceSynchronize());
    runs[r][0] = elements(pr, *pr.dq[0], c.Hq);
    runs[r][1] = elements(pr, *pr.dk[0], c.Hkv);
    runs[r][2] = elements(pr, *pr.dv[0], c.Hkv);
  }
  for (int g = 0; g < 3; ++g) EXPECT_TRUE(same_bits(runs[0][g], runs[1][g])) << "gradient " << g << " differs";
}

// The dK/dV plan of a packed call, built on the device (spans, runs, schedule with the streams' tables): each
// key tile's runs are those of the plan of its stream alone (its query tiles numbered from 0); the items cover
// every key tile's list once, in order, each split tile with its own slots; with a forced split, each key
// tile's segments are those of its stream's own plan.
TEST(CudaVarlen, BackwardPlanIsEachStreamsPlan) {
  REQUIRE_GPU();
  for (const VarlenCase& c : cases())
    for (int64_t D : {64, 128})
      for (int split : {0, 1, 3}) {
        SCOPED_TRACE(describe(c) + " plan D=" + std::to_string(D) + " split=" + std::to_string(split));
        std::vector<int64_t> cu{0};
        for (int64_t T : c.texts) cu.push_back(cu.back() + Layout(c.k, c.S, T, c.tail).length());
        const std::vector<uint16_t> dummy(static_cast<size_t>(D));
        AttentionParams p;
        p.layout = Layout(c.k, c.S, 0, c.tail);
        p.W = c.W;
        p.D = D;
        p.dtype = DType::bf16;
        p.q = p.k = p.v = p.out = TensorView{const_cast<uint16_t*>(dummy.data()), 0, D, D};  // never read
        p.cu_seqlens = cu.data();
        p.num_seqs = int64_t(c.texts.size());
        const cuda::bwd::PlanDump pk = cuda::bwd::backward_plan_for_testing(p, D, 1, split);
        ASSERT_EQ(int64_t(pk.tile_stream.size()), pk.nk);
        std::vector<cuda::bwd::PlanDump> one;
        for (int64_t T : c.texts)
          one.push_back(cuda::bwd::backward_plan_for_testing(Layout(c.k, c.S, T, c.tail), c.W, D, 1, split));
        std::vector<std::vector<cuda::bwd::PlanItem>> items(size_t(pk.nk));
        for (const auto& it : pk.items) {
          ASSERT_GE(it.kt, 0);
          ASSERT_LT(it.kt, pk.nk);
          items[size_t(it.kt)].push_back(it);
        }
        std::vector<int> slot_used(size_t(pk.n_slots), 0);
        for (int64_t kt = 0; kt < pk.nk; ++kt) {
          const cuda::bwd::PlanDump& o = one[size_t(pk.tile_stream[size_t(kt)])];
          const int32_t lkt = pk.tile_in_stream[size_t(kt)];
          ASSERT_LT(lkt, o.nk);
          ASSERT_EQ(pk.nruns[size_t(kt)], o.nruns[size_t(lkt)]) << "kt " << kt;
          int64_t count = 0;
          for (int r = 0; r < pk.nruns[size_t(kt)]; ++r) {
            const auto a = pk.runs[size_t(kt) * cuda::bwd::kMaxRuns + size_t(r)];
            const auto b = o.runs[size_t(lkt) * cuda::bwd::kMaxRuns + size_t(r)];
            ASSERT_EQ(a.begin, b.begin) << "kt " << kt << " run " << r;
            ASSERT_EQ(a.end, b.end) << "kt " << kt << " run " << r;
            count += a.end - a.begin;
          }
          const auto& its = items[size_t(kt)];
          ASSERT_FALSE(its.empty()) << "kt " << kt << " has no item";
          int64_t e = 0;
          for (const auto& it : its) {
            ASSERT_EQ(it.e0, e) << "kt " << kt;
            ASSERT_GE(it.e1, it.e0);
            e = it.e1;
            if (its.size() > 1) {
              ASSERT_GE(it.slot, 0);
              ASSERT_LT(it.slot, pk.n_slots);
              ASSERT_EQ(slot_used[size_t(it.slot)]++, 0) << "slot " << it.slot << " used twice";
            } else {
              ASSERT_EQ(it.slot, -1);
            }
          }
          ASSERT_EQ(e, count) << "kt " << kt;
          if (split > 0) {  // the same segments as the stream's own plan
            std::vector<cuda::bwd::PlanItem> want;
            for (const auto& it : o.items)
              if (it.kt == lkt) want.push_back(it);
            ASSERT_EQ(its.size(), want.size()) << "kt " << kt;
            for (size_t j = 0; j < its.size(); ++j) {
              ASSERT_EQ(its[j].e0, want[j].e0);
              ASSERT_EQ(its[j].e1, want[j].e1);
            }
          }
        }
      }
}

// supports() takes packed params (no device needed to ask) and refuses streams whose padded rows overflow.
TEST(CudaVarlen, SupportsPackedParams) {
  std::vector<int64_t> cu = {0, 9, 9, 20};
  AttentionBackwardParams p;
  p.layout = Layout(8, 1, 0);
  p.D = 128;
  p.dtype = DType::bf16;
  p.cu_seqlens = cu.data();
  p.num_seqs = 3;
  std::string why;
  EXPECT_TRUE(cuda::supports(static_cast<const AttentionParams&>(p), &why)) << why;
  EXPECT_TRUE(cuda::supports(p, &why)) << why;
  const int64_t big = (int64_t(1) << 31) - 300;
  cu = {0, big, big + 100};
  p.cu_seqlens = cu.data();
  p.num_seqs = 2;
  EXPECT_FALSE(cuda::supports(static_cast<const AttentionParams&>(p), &why));
  EXPECT_NE(why.find("rounded up to 128"), std::string::npos) << why;
}

}  // namespace
}  // namespace ksa
