// The CPU prefill backward against the oracle's analytic backward, the analytic backward against central
// finite differences of the oracle's forward (double), and the no-empty-row property the kernels rely on.
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "attention_cases.hpp"
#include "cpu/attention_tiles.hpp"
#include "ksa/cpu.hpp"

namespace ksa {
namespace {

using test::Case;
using test::Problem;

using test::PortableScope;

std::vector<Case> backward_cases() {
  std::vector<Case> cs;
  uint64_t seed = 2000;
  auto add = [&](auto... fields) {
    Case c = Case::of(fields...);
    c.seed = ++seed;
    cs.push_back(c);
  };
  add(8, 1, 1, 0, false, 1, 1, 1, 64, DType::f32, false);
  add(8, 1, 7, 1, true, 1, 2, 1, 64, DType::f32, false);
  add(8, 1, 8, 0, false, 1, 2, 2, 64, DType::bf16, false);
  add(8, 2, 9, 3, true, 1, 2, 1, 48, DType::f32, true);
  add(8, 2, 97, 1, true, 2, 4, 1, 64, DType::f32, true);
  add(8, 1, 97, 3, false, 2, 2, 2, 128, DType::bf16, true);
  add(4, 1, 150, 2, false, 1, 8, 1, 80, DType::f32, false, 0.2f);
  add(8, 1, 300, 2, false, 1, 4, 2, 64, DType::f32, true);
  add(5, 2, 240, 100, true, 1, 2, 1, 128, DType::f32, false);
  add(8, 1, 700, 4, false, 1, 1, 1, 64, DType::bf16, false);
  // The oracle's backward runs its queries in blocks (~32 MiB of rows each): here 8 blocks of 221 rows, the
  // last one partial, with a second batch entry and strided views.
  add(8, 1, 1400, 3, true, 2, 4, 2, 32, DType::f32, true);
  return cs;
}

void check_backward(const Case& c) {
  SCOPED_TRACE(c.str());
  Problem pr(c);
  cpu::attention_forward(pr.p);  // out and lse as a caller would have them
  cpu::attention_backward(pr.p);
  const auto ref = cpu::attention_reference_backward(pr.p);
  std::vector<double> ndq, ndk, ndv;
  test::naive_backward_f32(pr, ndq, ndk, ndv);
  test::expect_close("dq", c, pr.dense(pr.p.dq, c.Hq), ndq, ref.dq, pr.L, c.Hq);
  test::expect_close("dk", c, pr.dense(pr.p.dk, c.Hkv), ndk, ref.dk, pr.L, c.Hkv);
  test::expect_close("dv", c, pr.dense(pr.p.dv, c.Hkv), ndv, ref.dv, pr.L, c.Hkv);
}

TEST(CpuBackward, MatchesOracleFastestPrimitives) {
  for (const Case& c : backward_cases()) check_backward(c);
}

// The oracle's own backward (its queries in blocks, across threads) against the independent naive fp32 one, on
// a case of several blocks: the two differ only by fp32 rounding (inputs of order 1, sums of at most ~250
// terms: a few 1e-6 here), so 1e-4 of the largest gradient catches any term one of them drops or repeats.
TEST(CpuBackward, OracleBackwardAgreesWithNaiveAcrossQueryBlocks) {
  const Case c = backward_cases().back();
  ASSERT_EQ(c.T, 1400);
  SCOPED_TRACE(c.str());
  Problem pr(c);
  cpu::attention_forward(pr.p);
  const auto ref = cpu::attention_reference_backward(pr.p);
  std::vector<double> ndq, ndk, ndv;
  test::naive_backward_f32(pr, ndq, ndk, ndv);
  for (const auto& [what, naive, oracle] : {std::tuple{"dq", &ndq, &ref.dq}, std::tuple{"dk", &ndk, &ref.dk},
                                            std::tuple{"dv", &ndv, &ref.dv}}) {
    const test::Worst w = test::worst(*naive, *oracle);
    EXPECT_LE(w.err, 1e-4 * std::max(w.ref_abs_max, 1.0)) << what << " at flat index " << w.index;
  }
}

TEST(CpuBackward, MatchesOraclePortablePrimitives) {
  PortableScope portable(true);
  for (const Case& c : backward_cases())
    if (c.T <= 150) check_backward(c);
}

TEST(CpuBackward, MatchesOracleEveryTarget) {
  for (const int64_t t : cpu::detail::simd_targets()) {
    test::TargetScope scope(t);
    SCOPED_TRACE(cpu::detail::simd_target_name(t));
    for (const Case& c : backward_cases())
      if (c.T <= 150) check_backward(c);
  }
}

TEST(CpuBackward, DeterministicAcrossThreadCounts) {
  Case c;
  c.k = 8, c.S = 1, c.T = 900, c.W = 3, c.B = 2, c.Hq = 4, c.Hkv = 1, c.D = 64, c.strided = true, c.seed = 99;
  Problem a(c), b(c);
  a.p.num_threads = 1;
  b.p.num_threads = 2;
  cpu::attention_forward(a.p);
  cpu::attention_forward(b.p);
  cpu::attention_backward(a.p);
  cpu::attention_backward(b.p);
  EXPECT_EQ(a.dqb, b.dqb) << c.str();
  EXPECT_EQ(a.dkb, b.dkb) << c.str();
  EXPECT_EQ(a.dvb, b.dvb) << c.str();
}

TEST(CpuBackward, RequiresLse) {
  Case c;
  Problem pr(c);
  pr.p.lse = nullptr;
  EXPECT_THROW(cpu::attention_backward(pr.p), Error);
}

// The oracle's analytic backward against central differences of the oracle's forward (double math on fp32
// inputs), loss = sum(out * dout). With eps = 1e-3 on unit-scale data the truncation error is O(eps^2) ~ 1e-6
// and double rounding ~1e-13, so 2e-5 (+ 1e-5 relative) is loose yet far below a wrong term.
TEST(OracleBackward, MatchesFiniteDifferences) {
  std::vector<Case> cs(3);
  cs[0].k = 3, cs[0].S = 2, cs[0].T = 8, cs[0].W = 1, cs[0].tail = true, cs[0].Hq = 2, cs[0].Hkv = 1, cs[0].D = 4;
  cs[1].k = 2, cs[1].S = 1, cs[1].T = 7, cs[1].W = 0, cs[1].Hq = 1, cs[1].Hkv = 1, cs[1].D = 3, cs[1].scale = 0.8f;
  cs[2].k = 4, cs[2].S = 1, cs[2].T = 13, cs[2].W = 1, cs[2].B = 2, cs[2].Hq = 2, cs[2].Hkv = 2, cs[2].D = 4;
  cs[2].strided = true;
  for (size_t ci = 0; ci < cs.size(); ++ci) {
    Case& c = cs[ci];
    c.seed = 3000 + ci;
    SCOPED_TRACE(c.str());
    Problem pr(c);
    const auto grads = cpu::attention_reference_backward(pr.p);
    const std::vector<double> w = pr.dense(pr.p.dout, c.Hq);
    auto loss = [&] {
      const auto o = cpu::attention_reference(pr.p);
      double s = 0;
      for (size_t i = 0; i < o.out.size(); ++i) s += o.out[i] * w[i];
      return s;
    };
    struct Input {
      const char* name;
      TensorView* t;
      int64_t H;
      const std::vector<double>* g;
    };
    const Input inputs[] = {
        {"q", &pr.p.q, c.Hq, &grads.dq}, {"k", &pr.p.k, c.Hkv, &grads.dk}, {"v", &pr.p.v, c.Hkv, &grads.dv}};
    for (const Input& in : inputs)
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t i = 0; i < pr.L; ++i)
          for (int64_t h = 0; h < in.H; ++h)
            for (int64_t d = 0; d < c.D; ++d) {
              float* x = static_cast<float*>(in.t->data) + in.t->offset(b, i, h) + d;
              const float x0 = *x, xp = x0 + 1e-3f, xm = x0 - 1e-3f;
              *x = xp;
              const double lp = loss();
              *x = xm;
              const double lm = loss();
              *x = x0;
              const double fd = (lp - lm) / (double(xp) - double(xm));
              const double an = (*in.g)[size_t(((b * pr.L + i) * in.H + h) * c.D + d)];
              ASSERT_NEAR(an, fd, 2e-5 + 1e-5 * std::abs(fd))
                  << "d" << in.name << " [b=" << b << ", row=" << i << ", h=" << h << ", d=" << d << "]";
            }
  }
}

// The kernels divide by the softmax sum of every row: for every valid layout each row must see at least one
// key. Asked of the core: the row sees itself, and key_spans of the single row is non-empty and holds it.
TEST(CoreRows, EveryRowSeesAKey) {
  for (int64_t k = 1; k <= 9; ++k)
    for (int64_t S = 1; S <= 3; ++S)
      for (int64_t T = 0; T <= 40; ++T)
        for (int64_t W = 0; W <= 6; ++W)
          for (bool tail : {false, true}) {
            const Layout lay(k, S, T, tail);
            for (int64_t g = 0; g < lay.length(); ++g) {
              ASSERT_TRUE(visible_gathered(lay, W, g, g))
                  << "k=" << k << " S=" << S << " T=" << T << " W=" << W << " row " << g;
              const KeySpans sp = key_spans(lay, W, g, g + 1);
              bool has_self = false;
              for (int i = 0; i < sp.n; ++i) has_self = has_self || (sp.span[i].begin <= g && g < sp.span[i].end);
              ASSERT_TRUE(has_self) << "k=" << k << " S=" << S << " T=" << T << " W=" << W << " row " << g;
            }
          }
}

}  // namespace
}  // namespace ksa
