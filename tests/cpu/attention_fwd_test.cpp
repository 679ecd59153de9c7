// The CPU prefill forward against the oracle on random data over awkward shapes, through the fastest
// primitives of this CPU and through the portable ones.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "attention_cases.hpp"
#include "cpu/attention_tiles.hpp"
#include "cpu/simd.hpp"
#include "ksa/cpu.hpp"

namespace ksa {
namespace {

using test::Case;
using test::Problem;

using test::PortableScope;

std::vector<Case> forward_cases() {
  std::vector<Case> cs;
  uint64_t seed = 1000;
  // Lengths 1, k-1, k, k+1 and 97 with k = 8, windows 0, 1, 3 and >= the number of chunks.
  for (int64_t T : {1, 7, 8, 9, 97})
    for (int64_t W : {0, 1, 3, 100}) {
      Case c;
      c.T = T;
      c.W = W;
      c.tail = (T + W) % 2 == 1;
      c.Hq = 2;
      c.Hkv = 1;
      c.seed = ++seed;
      cs.push_back(c);
    }
  // S = 2 with k = 5, tails summarised or not.
  for (int64_t T : {4, 5, 6, 11, 97})
    for (bool tail : {false, true}) {
      Case c;
      c.k = 5;
      c.S = 2;
      c.T = T;
      c.W = T % 3;
      c.tail = tail;
      c.seed = ++seed;
      cs.push_back(c);
    }
  auto add = [&](auto... fields) {
    Case c = Case::of(fields...);
    c.seed = ++seed;
    cs.push_back(c);
  };
  // GQA 1, 2, 4, 8; D 64, 128 and the generic 80 and 48; bf16 and fp32; strided views with B = 2.
  add(8, 1, 97, 3, false, 2, 8, 1, 128, DType::bf16, true);
  add(8, 2, 97, 1, true, 2, 4, 1, 64, DType::f32, true);
  add(4, 1, 130, 2, false, 2, 4, 2, 80, DType::f32, true);
  add(8, 2, 65, 0, true, 2, 2, 2, 48, DType::bf16, true);
  add(8, 1, 200, 5, true, 1, 8, 8, 128, DType::f32, false, 0.05f);
  add(3, 1, 150, 4, false, 2, 2, 1, 64, DType::bf16, true, 0.3f);
  // Several query and key tiles, the summary block spanning tiles, W >= #chunks (plain causal text).
  add(8, 1, 1025, 3, false, 1, 2, 1, 64, DType::f32, false);
  add(8, 2, 1025, 1, true, 2, 1, 1, 128, DType::bf16, true);
  add(16, 1, 1025, 200, false, 1, 1, 1, 64, DType::f32, false);
  add(2, 1, 600, 8, false, 1, 2, 2, 128, DType::f32, true);
  // Head dims that are not multiples of 16 (zero-padded in the gather).
  add(8, 1, 50, 1, true, 2, 2, 1, 20, DType::f32, true);
  add(3, 2, 40, 2, false, 1, 1, 1, 1, DType::bf16, false);
  return cs;
}

void check_forward(const Case& c) {
  SCOPED_TRACE(c.str());
  Problem pr(c);
  cpu::attention_forward(pr.p);
  const auto ref = cpu::attention_reference(pr.p);
  std::vector<double> naive_out, naive_lse;
  test::naive_forward_f32(pr, naive_out, naive_lse);
  const std::vector<double> out = pr.dense(pr.p.out, c.Hq);
  test::expect_close("out", c, out, naive_out, ref.out, pr.L, c.Hq);
  std::vector<double> lse(pr.lse.begin(), pr.lse.end());
  for (size_t i = 0; i < lse.size(); ++i)
    ASSERT_TRUE(std::isfinite(lse[i])) << "lse not finite at " << test::where(i, pr.L, c.Hq, 1) << ": " << lse[i];
  // lse is fp32 whatever the input dtype.
  Case c32 = c;
  c32.dtype = DType::f32;
  c32.D = 1;
  test::expect_close("lse", c32, lse, naive_lse, ref.lse, pr.L, c.Hq);
}

TEST(CpuForward, MatchesOracleFastestPrimitives) {
  std::printf("tile primitives: %s\n", cpu::detail::tile_kernels().name);
  for (const Case& c : forward_cases()) check_forward(c);
}

TEST(CpuForward, MatchesOraclePortablePrimitives) {
  PortableScope portable(true);
  ASSERT_STREQ(cpu::detail::tile_kernels().name, cpu::detail::simd_target_name(cpu::detail::simd_targets().back()));
  for (const Case& c : forward_cases())
    if (c.T <= 200) check_forward(c);
}

// Every SIMD target compiled in that this CPU runs (AVX3, AVX2, SSE4, SSSE3, SCALAR on an AVX-512 x86 with GCC).
TEST(CpuForward, MatchesOracleEveryTarget) {
  for (const int64_t t : cpu::detail::simd_targets()) {
    test::TargetScope scope(t);
    SCOPED_TRACE(cpu::detail::simd_target_name(t));
    ASSERT_STREQ(cpu::detail::tile_kernels().name, cpu::detail::simd_target_name(t));
    for (const Case& c : forward_cases())
      if (c.T <= 200) check_forward(c);
  }
}

// Same result bit for bit whatever the thread count (work items never share an output row).
TEST(CpuForward, DeterministicAcrossThreadCounts) {
  Case c;
  c.k = 8, c.S = 2, c.T = 700, c.W = 2, c.tail = true, c.B = 2, c.Hq = 4, c.Hkv = 2, c.D = 64, c.strided = true;
  c.seed = 77;
  Problem a(c), b(c);
  a.p.num_threads = 1;
  b.p.num_threads = 2;
  cpu::attention_forward(a.p);
  cpu::attention_forward(b.p);
  EXPECT_EQ(a.outb, b.outb) << c.str();
  EXPECT_EQ(a.lse, b.lse) << c.str();
}

// lse is optional: without it the output is the same, bit for bit.
TEST(CpuForward, LseOptional) {
  Case c;
  c.k = 4, c.S = 2, c.T = 150, c.W = 2, c.Hq = 2, c.Hkv = 1, c.D = 64, c.seed = 55;
  Problem a(c), b(c);
  b.p.lse = nullptr;
  cpu::attention_forward(a.p);
  cpu::attention_forward(b.p);
  EXPECT_EQ(a.outb, b.outb) << c.str();
}

// An empty stream is a no-op, and a bad field is a ksa::Error naming it.
TEST(CpuForward, EmptyAndInvalid) {
  Case c;
  c.T = 0;
  Problem pr(c);
  EXPECT_NO_THROW(cpu::attention_forward(pr.p));
  Case c2;
  Problem bad(c2);
  bad.p.Hq = 3;
  bad.p.Hkv = 2;
  try {
    cpu::attention_forward(bad.p);
    ADD_FAILURE() << "no error for Hq=3, Hkv=2";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Hq"), std::string::npos) << e.what();
  }
}

// The masked-tile path (visible_tokens on the gathered rows' tokens) is the core rule in gathered order.
TEST(CpuMask, ApplyMaskEqualsVisibleGathered) {
  std::mt19937_64 rng(5);
  for (int iter = 0; iter < 300; ++iter) {
    const Layout lay(1 + int64_t(rng() % 9), 1 + int64_t(rng() % 3), 1 + int64_t(rng() % 200), rng() % 2 == 0);
    const int64_t W = int64_t(rng() % 6), L = lay.length();
    const auto tok = cpu::detail::gathered_tokens(lay);
    const int64_t q0 = int64_t(rng() % uint64_t(L)), k0 = int64_t(rng() % uint64_t(L));
    const int rows = int(std::min<int64_t>(64, L - q0)), cols = int(std::min<int64_t>(64, L - k0));
    const bool transposed = rng() % 2 == 1;
    std::vector<float> s(64 * 64, 1.f);
    const int nr = transposed ? cols : rows, nc = transposed ? rows : cols;
    cpu::detail::apply_mask(s.data(), transposed ? cols : rows, transposed ? rows : cols, &tok[size_t(q0)],
                            &tok[size_t(k0)], W, transposed);
    for (int r = 0; r < nr; ++r)
      for (int j = 0; j < nc; ++j) {
        const int64_t gq = q0 + (transposed ? j : r), gk = k0 + (transposed ? r : j);
        ASSERT_EQ(s[size_t(r * 64 + j)] == 1.f, visible_gathered(lay, W, gq, gk))
            << "k=" << lay.chunk_size << " S=" << lay.S << " T=" << lay.T << " W=" << W << " q=" << gq << " key=" << gk;
      }
  }
}

}  // namespace
}  // namespace ksa
