// Packed sequences (AttentionParams::cu_seqlens): the CPU kernels and the oracle on a batch of streams of
// different lengths laid back to back must give, row for row, what they give on each stream alone (the same
// tile walk per stream, so the same bits), and nothing may be seen across a boundary.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ksa/cpu.hpp"
#include "ksa/error.hpp"

namespace ksa {
namespace {

// A packed problem: the streams of texts T[0..n) (k, S, tail), q [1, L, Hq, D] with rows padded by `rpad`
// elements (a strided view), k and v [1, L, Hkv, D], dout like q; outputs twice (packed, per stream).
struct Packed {
  int64_t k, S, Hq, Hkv, D, rpad;
  bool tail;
  DType dt;
  std::vector<int64_t> cu{0};
  int64_t L = 0;
  std::vector<uint16_t> q, kk, v, dout, out[2], dq[2], dk[2], dv[2];  // 2-byte units hold either dtype
  std::vector<float> lse[2];

  Packed(std::vector<int64_t> texts, int64_t k_, int64_t S_, bool tail_, int64_t Hq_, int64_t Hkv_, int64_t D_,
         DType dt_, int64_t rpad_, uint64_t seed)
      : k(k_), S(S_), Hq(Hq_), Hkv(Hkv_), D(D_), rpad(rpad_), tail(tail_), dt(dt_) {
    for (int64_t T : texts) cu.push_back(cu.back() + Layout(k, S, T, tail).length());
    L = cu.back();
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    auto fill = [&](std::vector<uint16_t>& b, int64_t H, bool random) {
      const int64_t n = L * row(H) + 1;
      b.assign(size_t(n * dtype_size(dt) / 2 + 2), 0);
      if (random)
        for (int64_t i = 0; i < n; ++i) store_from_float(dt, b.data(), i, nd(rng));
    };
    fill(q, Hq, true), fill(kk, Hkv, true), fill(v, Hkv, true), fill(dout, Hq, true);
    for (int i = 0; i < 2; ++i) {
      fill(out[i], Hq, false), fill(dq[i], Hq, false), fill(dk[i], Hkv, false), fill(dv[i], Hkv, false);
      lse[i].assign(size_t(L * Hq), NAN);
    }
  }
  int64_t row(int64_t H) const { return H * D + rpad; }
  TensorView view(std::vector<uint16_t>& b, int64_t H) const { return TensorView{b.data(), L * row(H), row(H), D}; }
  // Params of output set i; packed or not (then the caller picks a stream with sequence_params).
  AttentionBackwardParams params(int i, int64_t W) {
    AttentionBackwardParams p;
    p.layout = Layout(k, S, 0, tail);
    p.W = W;
    p.Hq = Hq, p.Hkv = Hkv, p.D = D, p.dtype = dt;
    p.q = view(q, Hq), p.k = view(kk, Hkv), p.v = view(v, Hkv), p.dout = view(dout, Hq);
    p.out = view(out[i], Hq), p.dq = view(dq[i], Hq), p.dk = view(dk[i], Hkv), p.dv = view(dv[i], Hkv);
    p.lse = lse[i].data();
    p.cu_seqlens = cu.data();
    p.num_seqs = int64_t(cu.size()) - 1;
    return p;
  }
};

bool same_bits(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 2) == 0;
}
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

struct VarlenCase {
  std::vector<int64_t> texts;
  int64_t k, S, W;
  bool tail;
  int64_t Hq, Hkv, D;
  DType dt;
  int64_t rpad;
};

std::vector<VarlenCase> cases() {
  return {
      // Lengths 0, 1, k-1, k, k+1, 97 and several tiles; the empty streams at the start, middle and end.
      {{0, 1, 7, 8, 9, 97, 0, 300, 65, 0}, 8, 1, 2, false, 2, 1, 64, DType::f32, 0},
      {{130, 3, 257, 16}, 8, 1, 0, true, 4, 2, 128, DType::bf16, 5},
      {{11, 40, 6, 77}, 5, 2, 1, true, 2, 2, 48, DType::f32, 3},
      {{200, 1, 129}, 4, 1, 100, false, 8, 2, 20, DType::bf16, 0},  // W >= #chunks: plain causal text
      {{520}, 8, 1, 3, false, 2, 1, 64, DType::f32, 0},             // one stream
  };
}

TEST(CpuVarlen, PackedEqualsOneStreamAtATime) {
  uint64_t seed = 7000;
  for (const VarlenCase& c : cases())
    for (int threads : {1, 3}) {
      SCOPED_TRACE(testing::Message() << "k=" << c.k << " S=" << c.S << " W=" << c.W << " tail=" << c.tail
                                      << " heads=" << c.Hq << "/" << c.Hkv << " D=" << c.D << " " << dtype_name(c.dt)
                                      << " threads=" << threads << " seed=" << seed + 1);
      Packed pk(c.texts, c.k, c.S, c.tail, c.Hq, c.Hkv, c.D, c.dt, c.rpad, ++seed);
      AttentionBackwardParams p = pk.params(0, c.W);
      p.num_threads = threads;
      cpu::attention_forward(p);
      cpu::attention_backward(p);
      const AttentionBackwardParams each = pk.params(1, c.W);
      for (int64_t s = 0; s < each.sequences(); ++s) {
        AttentionBackwardParams one = sequence_params(each, s);
        one.num_threads = threads;
        EXPECT_EQ(one.L(), pk.cu[size_t(s + 1)] - pk.cu[size_t(s)]);
        cpu::attention_forward(one);
        cpu::attention_backward(one);
      }
      EXPECT_TRUE(same_bits(pk.out[0], pk.out[1])) << "out";
      EXPECT_TRUE(same_bits(pk.lse[0], pk.lse[1])) << "lse";
      EXPECT_TRUE(same_bits(pk.dq[0], pk.dq[1])) << "dq";
      EXPECT_TRUE(same_bits(pk.dk[0], pk.dk[1])) << "dk";
      EXPECT_TRUE(same_bits(pk.dv[0], pk.dv[1])) << "dv";
      for (float x : pk.lse[0]) ASSERT_TRUE(std::isfinite(x));  // every row written
    }
}

TEST(CpuVarlen, OracleSeesNothingAcrossBoundaries) {
  // The packed oracle equals the oracle run on each stream alone (both in double, in the same order).
  Packed pk({9, 0, 23, 16}, 8, 1, true, 2, 1, 16, DType::f32, 2, 42);
  const AttentionBackwardParams p = pk.params(0, 1);
  const cpu::ReferenceOutput all = cpu::attention_reference(p);
  const cpu::ReferenceGrads gall = cpu::attention_reference_backward(p);
  for (int64_t s = 0; s < p.sequences(); ++s) {
    const AttentionBackwardParams one = sequence_params(p, s);
    const cpu::ReferenceOutput r = cpu::attention_reference(one);
    const cpu::ReferenceGrads g = cpu::attention_reference_backward(one);
    const size_t r0 = size_t(pk.cu[size_t(s)]), qrow = size_t(p.Hq * p.D), krow = size_t(p.Hkv * p.D);
    for (size_t i = 0; i < r.out.size(); ++i) ASSERT_EQ(r.out[i], all.out[r0 * qrow + i]) << "stream " << s;
    for (size_t i = 0; i < r.lse.size(); ++i) ASSERT_EQ(r.lse[i], all.lse[r0 * size_t(p.Hq) + i]) << "stream " << s;
    for (size_t i = 0; i < g.dq.size(); ++i) ASSERT_EQ(g.dq[i], gall.dq[r0 * qrow + i]) << "stream " << s;
    for (size_t i = 0; i < g.dk.size(); ++i) ASSERT_EQ(g.dk[i], gall.dk[r0 * krow + i]) << "stream " << s;
    for (size_t i = 0; i < g.dv.size(); ++i) ASSERT_EQ(g.dv[i], gall.dv[r0 * krow + i]) << "stream " << s;
  }
}

TEST(CpuVarlen, FastMatchesOracle) {
  // Through the packed paths on both sides: fp32 kernels vs the double oracle (the kernels' single-stream
  // tests bound this error by the naive fp32 computation's; here 1e-4 of the largest magnitude is far above
  // fp32 rounding at these lengths and far below any masking error, which is O(1)).
  Packed pk({31, 0, 70, 8}, 8, 1, false, 2, 1, 32, DType::f32, 0, 43);
  AttentionBackwardParams p = pk.params(0, 2);
  cpu::attention_forward(p);
  const cpu::ReferenceOutput r = cpu::attention_reference(p);
  const float* out = reinterpret_cast<const float*>(pk.out[0].data());
  double worst = 0, big = 0;
  for (size_t i = 0; i < r.out.size(); ++i) {
    worst = std::max(worst, std::abs(double(out[i]) - r.out[i]));
    big = std::max(big, std::abs(r.out[i]));
  }
  EXPECT_LE(worst, 1e-4 * std::max(big, 1.0));
}

TEST(CpuVarlen, RejectsBadSequences) {
  Packed pk({9, 16}, 8, 1, false, 1, 1, 16, DType::f32, 0, 44);
  auto expect_error = [&](AttentionBackwardParams p, const char* what) {
    try {
      cpu::attention_forward(p);
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  AttentionBackwardParams p = pk.params(0, 1);
  p.B = 2;
  expect_error(p, "B: must be 1");
  std::vector<int64_t> cu = {0, 9, 8 + 18};  // 17 rows: a full chunk of 8 without its summary
  p = pk.params(0, 1);
  p.cu_seqlens = cu.data();
  expect_error(p, "sequence 1 has 17 rows");
  cu = {1, 10, 28};
  expect_error(p, "cu_seqlens[0]: must be 0");
  cu = {0, 10, 9};
  expect_error(p, "non-decreasing");
  p = pk.params(0, 1);
  p.num_seqs = 0;
  expect_error(p, "num_seqs");
  p = pk.params(0, 1);
  p.cu_seqlens = nullptr;
  expect_error(p, "num_seqs: must be 0 without cu_seqlens");
}

TEST(CpuVarlen, AllStreamsEmpty) {
  Packed pk({0, 0}, 8, 1, false, 1, 1, 16, DType::f32, 0, 45);
  AttentionBackwardParams p = pk.params(0, 1);
  EXPECT_EQ(p.L(), 0);
  EXPECT_NO_THROW(cpu::attention_forward(p));
  EXPECT_NO_THROW(cpu::attention_backward(p));
}

TEST(CoreLayout, TextLengthOfStreamInvertsLength) {
  for (int64_t k : {1, 2, 5, 8})
    for (int64_t S : {1, 2, 3})
      for (bool tail : {false, true}) {
        std::vector<int> hits(size_t(60 * (k + S) + 1), 0);
        for (int64_t T = 0; T <= 60 * k - 1; ++T) {
          const int64_t L = Layout(k, S, T, tail).length();
          EXPECT_EQ(text_length_of_stream(k, S, L, tail), T) << "k=" << k << " S=" << S << " T=" << T;
          if (L < int64_t(hits.size())) hits[size_t(L)] = 1;
        }
        // Every other length is no stream's: -1.
        for (int64_t L = 0; L < int64_t(hits.size()) - (k + S); ++L) {
          if (hits[size_t(L)]) continue;
          EXPECT_EQ(text_length_of_stream(k, S, L, tail), -1) << "k=" << k << " S=" << S << " L=" << L;
        }
      }
}

}  // namespace
}  // namespace ksa
