// CUDA forward vs the CPU oracle over awkward shapes, bf16 and f16, strided views, poisoned outputs.
// Skipped (with a message) when no GPU is visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "attention_shape.hpp"
#include "gpu_test_util.hpp"
#include "ksa/cpu.hpp"
#include "ksa/cuda.hpp"
#include "ksa/error.hpp"

namespace ksa {
namespace {

using test::Shape;

// One shape's random inputs on the host and the device, and the params of a forward over them. Strided:
// q inside a fused [B, L, Hq+2*Hkv, D] buffer, k and v slices of it, out padded by 8 elements per row.
struct FwdInputs {
  // CUDA errors throw (gtest reports them), so a half-made FwdInputs is never used.
  static void ck(cudaError_t e) {
    if (e != cudaSuccess) throw Error(std::string("CUDA: ") + cudaGetErrorString(e));
  }
  Shape s;
  Layout lay;
  int64_t L, rowq, rowo, n_q, n_kv, n_o, n_lse;
  std::vector<uint16_t> hq, hk, hv;
  test::DevMem mq, mk, mv, mo, ml;
  AttentionParams p;

  FwdInputs(const Shape& s_, uint64_t seed)
      : s(s_),
        lay(s.k, s.S, s.T, s.tail),
        L(lay.length()),
        rowq(s.strided ? (s.Hq + 2 * s.Hkv) * s.D : s.Hq * s.D),
        rowo(s.strided ? s.Hq * s.D + 8 : s.Hq * s.D),
        n_q(s.B * L * rowq),
        n_kv(s.strided ? 0 : s.B * L * s.Hkv * s.D),
        n_o(s.B * L * rowo),
        n_lse(s.B * L * s.Hq),
        hq(size_t(n_q)),
        hk(size_t(n_kv)),
        hv(size_t(n_kv)),
        mq(size_t(n_q) * 2),
        mk(size_t(n_kv) * 2),
        mv(size_t(n_kv) * 2),
        mo(size_t(n_o) * 2),
        ml(size_t(n_lse) * 4) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto* h : {&hq, &hk, &hv})
      for (auto& x : *h) store_from_float(s.dt, &x, 0, nd(rng));
    if (!(mq.p && mk.p && mv.p && mo.p && ml.p)) throw Error("cudaMalloc failed");
    ck(cudaMemcpy(mq.p, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
    ck(cudaMemcpy(mk.p, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
    ck(cudaMemcpy(mv.p, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
    p = test::qkv_params<AttentionParams>(s, lay, rowq, mq.as<uint16_t>(), mk.as<uint16_t>(), mv.as<uint16_t>());
    p.out = TensorView{mo.as<uint16_t>(), L * rowo, rowo, s.D};
    p.lse = ml.as<float>();
  }
  // The forward with options o into NaN-poisoned out and lse (unwritten elements fail), copied back.
  void run(const cuda::KernelOptions& o, std::vector<uint16_t>& out, std::vector<float>& lse) {
    ck(cudaMemset(mo.p, 0xff, size_t(n_o) * 2));
    ck(cudaMemset(ml.p, 0xff, size_t(n_lse) * 4));
    cuda::attention_forward(p, nullptr, o);
    ck(cudaDeviceSynchronize());
    out.resize(size_t(n_o));
    lse.resize(size_t(n_lse));
    ck(cudaMemcpy(out.data(), mo.p, out.size() * 2, cudaMemcpyDeviceToHost));
    ck(cudaMemcpy(lse.data(), ml.p, lse.size() * 4, cudaMemcpyDeviceToHost));
  }
};

// Runs one shape against the oracle. Tolerance (METHOD: bf16 operands land between 1e-3 and 1e-2 in
// relative norm): the kernel rounds P to the input dtype before P.V, as every flash kernel does, so the
// error is about one rounding of the output's magnitude: max |err| <= 4 * 2^-8 (bf16) / 4 * 2^-11 (f16)
// on unit-normal inputs, and relative L2 error <= 1e-2 (bf16) / 2e-3 (f16). lse is fp32 throughout: 1e-3.
// Every option set in `opts` runs on the same inputs against one oracle result.
void check_shape(const Shape& s, uint64_t seed, const std::vector<cuda::KernelOptions>& opts = {{}}) {
  SCOPED_TRACE(test::describe(s) + " seed " + std::to_string(seed));
  FwdInputs in(s, seed);
  const AttentionParams& p = in.p;
  const int64_t L = in.L, rowo = in.rowo;
  std::optional<cpu::ReferenceOutput> ref;  // computed once, on the first pass
  for (const cuda::KernelOptions& o : opts) {
    SCOPED_TRACE("forward_config " + std::to_string(o.forward_config));
    std::string why;
    if (!cuda::supports(p, &why, o)) {
      ADD_FAILURE() << "unsupported: " << why;
      continue;
    }
    std::vector<uint16_t> ho;
    std::vector<float> hl;
    in.run(o, ho, hl);

    // The oracle on the same host data and views.
    AttentionParams hp = p;
    hp.q.data = in.hq.data();
    if (s.strided) {
      hp.k.data = in.hq.data() + s.Hq * s.D;
      hp.v.data = in.hq.data() + (s.Hq + s.Hkv) * s.D;
    } else {
      hp.k.data = in.hk.data();
      hp.v.data = in.hv.data();
    }
    hp.out.data = ho.data();
    if (!ref) ref = cpu::attention_reference(hp);
    const double ulp = s.dt == DType::bf16 ? 1.0 / 256 : 1.0 / 2048;
    double max_err = 0, num = 0, den = 0, max_lse = 0;
    int64_t worst = -1;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t h = 0; h < s.Hq; ++h) {
          for (int64_t d = 0; d < s.D; ++d) {
            const double got = load_as_float(s.dt, ho.data(), b * L * rowo + i * rowo + h * s.D + d);
            const double want = ref->out[size_t(((b * L + i) * s.Hq + h) * s.D + d)];
            const double e = std::abs(got - want);
            if (!(e <= max_err)) {  // NaN lands here and stays
              max_err = std::isnan(e) ? INFINITY : e;
              worst = ((b * L + i) * s.Hq + h) * s.D + d;
            }
            num += (got - want) * (got - want);
            den += want * want;
          }
          const double le =
              std::abs(double(hl[size_t((b * L + i) * s.Hq + h)]) - ref->lse[size_t((b * L + i) * s.Hq + h)]);
          max_lse = std::isnan(le) ? INFINITY : std::max(max_lse, le);
        }
    EXPECT_LE(max_err, 4 * ulp) << "worst flat index " << worst << " (b,row,head,d)";
    EXPECT_LE(std::sqrt(num / den), s.dt == DType::bf16 ? 1e-2 : 2e-3);
    EXPECT_LE(max_lse, 1e-3);
    // Padding of strided out rows is never written.
    if (s.strided) {
      EXPECT_EQ(ho[size_t(s.Hq * s.D)], 0xffff);
    }
  }
}

std::vector<Shape> awkward_shapes() {
  return {
      {8, 1, 1, 2, 2, 1, 128, 1, false, DType::bf16, false},
      {8, 1, 7, 2, 2, 1, 64, 1, false, DType::bf16, false},
      {8, 1, 8, 0, 4, 4, 128, 1, false, DType::f16, false},
      {8, 1, 9, 1, 4, 1, 64, 1, true, DType::bf16, false},
      {4, 2, 97, 3, 8, 1, 128, 1, false, DType::bf16, true},
      {8, 1, 1025, 3, 4, 2, 128, 2, false, DType::bf16, false},
      {8, 1, 1025, 0, 2, 2, 64, 1, true, DType::f16, true},
      {16, 2, 700, 1, 8, 8, 128, 1, false, DType::f16, false},
      {8, 1, 600, 1000, 4, 4, 64, 1, false, DType::bf16, false},  // W >= #chunks: causal text
      {3, 1, 333, 5, 4, 2, 128, 1, true, DType::bf16, false},
      {64, 1, 900, 2, 2, 1, 128, 1, false, DType::bf16, false},    // chunks larger than a tile
      {8, 1, 2000, 128, 8, 1, 128, 1, false, DType::bf16, false},  // GQA 8
      // Long enough for many whole 128-key tiles of window text and of old summaries (unmasked tiles).
      {8, 1, 6000, 16, 4, 2, 128, 1, false, DType::bf16, false},
      {5, 2, 4001, 20, 2, 1, 64, 1, true, DType::f16, true},
  };
}

TEST(CudaForward, AwkwardShapesMatchOracle) {
  REQUIRE_GPU();
  std::printf("device: %s\n", cuda::device_description().c_str());
  uint64_t seed = 11;
  for (const Shape& s : awkward_shapes()) check_shape(s, seed++);
}

// Every portable tile configuration (on an H100/H200 the default is the sm_90a kernel, so these run only
// when asked for), on the awkward shapes, against the oracle.
TEST(CudaForward, PortableConfigsMatchOracle) {
  REQUIRE_GPU();
  std::vector<cuda::KernelOptions> configs(5);
  for (int c = 0; c < 5; ++c) configs[size_t(c)].forward_config = c;
  uint64_t seed = 40;
  for (const Shape& s : awkward_shapes()) check_shape(s, seed++, configs);
}

TEST(CudaForward, RandomShapes) {
  REQUIRE_GPU();
  for (uint64_t seed = 100; seed < 112; ++seed) {
    std::mt19937_64 rng(seed);
    check_shape(test::random_shape(rng, 800), seed);
  }
}

// Shapes for the sm_90a kernel's TMA copies (forward_config 5, the default there): k and S that divide the
// 128-key tile, partial last chunks with and without their summaries (the per-chunk copies), k = 1 and k =
// 128, batch entries and strided views (the maps' strides), one KV head (a stride the map need not use).
std::vector<Shape> tma_shapes() {
  return {
      {8, 2, 3003, 4, 4, 1, 128, 2, true, DType::bf16, false},   // S = 2, summarised tail of 3 rows
      {8, 2, 3003, 4, 4, 1, 128, 1, false, DType::bf16, true},   // the same tail, not summarised
      {1, 1, 777, 3, 2, 1, 64, 1, true, DType::f16, true},       // k = 1: 128 chunks per box
      {32, 4, 2100, 2, 4, 2, 128, 3, true, DType::bf16, false},  // k = 32, S = 4, tail of 20, B = 3
      {128, 1, 1000, 1, 2, 2, 64, 1, true, DType::bf16, false},  // a chunk per tile, tail of 104
      {16, 1, 2048, 8, 2, 2, 128, 2, false, DType::f16, false},  // no tail: the last box runs past the chunks
      {8, 1, 130, 1, 2, 1, 128, 1, true, DType::bf16, false},    // 16 full chunks and a tail of 2
  };
}

TEST(CudaForward, TmaShapesMatchOracle) {
  REQUIRE_GPU();
  std::vector<cuda::KernelOptions> configs(1);
  if (cuda::pick_forward(128) == 5) configs.emplace_back().forward_config = 6;  // and the cp.async copies
  uint64_t seed = 300;
  for (const Shape& s : tma_shapes()) check_shape(s, seed++, configs);
}

// The TMA copies (config 5) against the cp.async copies (config 6) of the same sm_90a kernel: the tiles hold
// the same rows in the same smem layout (rows past a tile's end are masked either way), so out and lse are
// equal bit for bit. Large shapes, so that the launch is persistent (>= 8 work items per SM: each CTA runs many
// items through one stage ring and Q's barrier flips phase per item), and the engine's case of a query range
// (q_begin) over a longer stream.
TEST(CudaForward, TmaCopiesEqualCpAsyncBitwise) {
  REQUIRE_GPU();
  if (cuda::pick_forward(128) != 5) GTEST_SKIP() << "the sm_90a kernel does not run here (" << cuda::device_description() << ")";
  struct Case {
    Shape s;
    int64_t q_begin;
  };
  const std::vector<Case> cases = {
      {{8, 1, 20000, 128, 8, 2, 128, 1, true, DType::bf16, false}, 0},    // 1,266 items on 8 heads: persistent
      {{8, 1, 30001, 16, 32, 8, 128, 1, true, DType::bf16, false}, 0},   // GQA 4, tail of 1
      {{8, 1, 12000, 64, 16, 4, 64, 2, false, DType::f16, true}, 0},     // D = 64, B = 2, strided
      {{8, 1, 9000, 128, 32, 8, 128, 1, true, DType::bf16, false}, 5000},  // a query range, as the engine's prefill
  };
  for (const Case& c : cases) {
    const Shape& s = c.s;
    SCOPED_TRACE(test::describe(s) + " q_begin " + std::to_string(c.q_begin));
    FwdInputs in(s, 7);
    in.p.q_begin = c.q_begin;
    std::vector<uint16_t> out[2];
    std::vector<float> lse[2];
    for (int i = 0; i < 2; ++i) {
      cuda::KernelOptions o;
      o.forward_config = i == 0 ? 5 : 6;
      in.run(o, out[i], lse[i]);
    }
    int64_t differ = 0, first = -1;
    for (size_t i = 0; i < out[0].size(); ++i)
      if (out[0][i] != out[1][i] && differ++ == 0) first = int64_t(i);
    EXPECT_EQ(differ, 0) << "output elements differ, first at flat index " << first;
    EXPECT_EQ(std::memcmp(lse[0].data(), lse[1].data(), lse[0].size() * 4), 0) << "lse differs";
    // The rows the call wrote are not NaN (the poison): the query range's rows at least.
    const int64_t r = c.q_begin;  // the first written stream row
    EXPECT_NE(out[0][size_t(r * in.rowo)], 0xffff) << "row " << r << " was not written";
  }
}

TEST(CudaForward, UnsupportedGivesReasons) {
  AttentionParams p;
  p.layout = Layout(8, 1, 16);
  test::expect_head_dim_and_dtype_refused(p);
  std::string why;
  // Kernel options: a configuration outside -1..6 is refused by supports() and pick_forward alike; a portable
  // configuration asked for is the one that runs (no device needed to choose it).
  p.dtype = DType::bf16;
  cuda::KernelOptions o;
  o.forward_config = 9;
  EXPECT_FALSE(cuda::supports(p, &why, o));
  EXPECT_NE(why.find("forward_config: must be -1 (automatic) or 0..6 (got 9)"), std::string::npos) << why;
  EXPECT_THROW(cuda::pick_forward(128, o), Error);
  for (int c = 0; c <= 4; ++c) {
    o.forward_config = c;
    EXPECT_EQ(cuda::pick_forward(64, o), c);
  }
  if (cuda::device_count() == 0) {  // the sm_90a kernel (5, and 6 with cp.async copies) needs a device
    for (int c : {5, 6}) {
      o.forward_config = c;
      EXPECT_FALSE(cuda::supports(p, &why, o));
      EXPECT_NE(why.find("none visible"), std::string::npos) << why;
    }
  }
}

}  // namespace
}  // namespace ksa
