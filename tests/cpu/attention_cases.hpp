// Shared by the CPU attention tests: random strided inputs for a shape, naive fp32 comparators (the
// "same-precision computation" of docs/design.md: tolerances) and the worst-element comparison.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/attention_tiles.hpp"
#include "cpu/simd.hpp"
#include "ksa/cpu.hpp"
#include "ksa/error.hpp"
#include "simd_targets.hpp"

namespace ksa::test {

struct Case {
  int64_t k = 8, S = 1, T = 16, W = 1;
  bool tail = false;
  int64_t B = 1, Hq = 1, Hkv = 1, D = 64;
  DType dtype = DType::f32;
  float scale = 0.f;
  bool strided = false;
  uint64_t seed = 1;

  std::string str() const {
    std::ostringstream os;
    os << "k=" << k << " S=" << S << " T=" << T << " W=" << W << " tail=" << tail << " B=" << B << " heads=" << Hq
       << "/" << Hkv << " D=" << D << " " << dtype_name(dtype) << " scale=" << scale << " strided=" << strided
       << " seed=" << seed;
    return os.str();
  }
  // A case from its fields, in the order of the case tables of the kernel tests.
  static Case of(int64_t k, int64_t S, int64_t T, int64_t W, bool tail, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                 DType dt, bool strided, float scale = 0.f) {
    Case c;
    c.k = k, c.S = S, c.T = T, c.W = W, c.tail = tail, c.B = B, c.Hq = Hq, c.Hkv = Hkv, c.D = D, c.dtype = dt;
    c.strided = strided, c.scale = scale;
    return c;
  }
};

// Owns the buffers of one case. Strided: q and out rows padded and heads spaced apart, k and v interleaved
// in one buffer [B, L, 2, Hkv, D+3], batch entries spaced apart; dout and the gradients likewise padded.
struct Problem {
  Case c;
  Layout lay;
  int64_t L = 0;
  std::vector<float> qb, kvb, outb, doutb, dqb, dkb, dvb;  // float storage holds either dtype
  std::vector<float> lse;
  AttentionBackwardParams p;

  explicit Problem(const Case& cs) : c(cs), lay(cs.k, cs.S, cs.T, cs.tail), L(lay.length()) {
    std::mt19937_64 rng(c.seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    const int64_t es = dtype_size(c.dtype), D = c.D;
    const int64_t hpad = c.strided ? 5 : 0, rpad = c.strided ? 7 : 0, bpad = c.strided ? 11 : 0;
    auto view = [&](std::vector<float>& buf, int64_t H, bool fill) {
      const int64_t hs = D + hpad, rs = H * hs + rpad, bs = L * rs + bpad;
      buf.assign(size_t((c.B * bs * es + 3) / 4 + 1), 0.f);
      if (fill)
        for (int64_t i = 0; i < c.B * bs; ++i) store_from_float(c.dtype, buf.data(), i, nd(rng));
      return TensorView{buf.data(), bs, rs, hs};
    };
    p.layout = lay;
    p.W = c.W;
    p.B = c.B;
    p.Hq = c.Hq;
    p.Hkv = c.Hkv;
    p.D = D;
    p.dtype = c.dtype;
    p.scale = c.scale;
    p.q = view(qb, c.Hq, true);
    // k and v: one buffer, rows [2, Hkv, D+3] when strided (v starts after k's heads).
    if (c.strided) {
      const int64_t hs = D + 3, rs = 2 * c.Hkv * hs, bs = L * rs + 13;
      kvb.assign(size_t((c.B * bs * es + 3) / 4 + 1), 0.f);
      for (int64_t i = 0; i < c.B * bs; ++i) store_from_float(c.dtype, kvb.data(), i, nd(rng));
      p.k = TensorView{kvb.data(), bs, rs, hs};
      p.v = TensorView{static_cast<uint8_t*>(static_cast<void*>(kvb.data())) + c.Hkv * hs * es, bs, rs, hs};
    } else {
      const int64_t n = c.B * L * c.Hkv * D;
      kvb.assign(size_t((2 * n * es + 3) / 4 + 1), 0.f);
      for (int64_t i = 0; i < 2 * n; ++i) store_from_float(c.dtype, kvb.data(), i, nd(rng));
      p.k = TensorView::dense(kvb.data(), L, c.Hkv, D);
      p.k.batch_stride = L * c.Hkv * D;
      p.v = TensorView::dense(static_cast<uint8_t*>(static_cast<void*>(kvb.data())) + n * es, L, c.Hkv, D);
    }
    p.out = view(outb, c.Hq, false);
    p.dout = view(doutb, c.Hq, true);
    p.dq = view(dqb, c.Hq, false);
    p.dk = view(dkb, c.Hkv, false);
    p.dv = view(dvb, c.Hkv, false);
    lse.assign(size_t(c.B * L * c.Hq), NAN);
    p.lse = lse.data();
  }

  // Element (b, row, h, d) of a [B, L, H, D] view, as float.
  float at(const TensorView& t, int64_t b, int64_t row, int64_t h, int64_t d) const {
    return load_as_float(c.dtype, t.data, t.offset(b, row, h) + d);
  }
  // A view read into a dense [B, L, H, D] double vector (the oracle's layout).
  std::vector<double> dense(const TensorView& t, int64_t H) const {
    std::vector<double> o(size_t(c.B * L * H * c.D));
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < c.D; ++d) o[size_t(((b * L + i) * H + h) * c.D + d)] = at(t, b, i, h, d);
    return o;
  }
};

// Naive fp32 forward: plain loops over visible(), float accumulation, output rounded to the dtype.
inline void naive_forward_f32(const Problem& pr, std::vector<double>& out, std::vector<double>& lse) {
  const auto& p = pr.p;
  const int64_t L = pr.L, D = p.D, G = p.group();
  const float scale = p.softmax_scale();
  out.assign(size_t(p.B * L * p.Hq * D), 0.0);
  lse.assign(size_t(p.B * L * p.Hq), 0.0);
  std::vector<float> s(static_cast<size_t>(L)), acc(static_cast<size_t>(D));
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t h = 0; h < p.Hq; ++h) {
        float m = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
          s[size_t(j)] = -INFINITY;
          if (!visible(p.layout, p.W, i, j)) continue;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += pr.at(p.q, b, i, h, d) * pr.at(p.k, b, j, h / G, d);
          s[size_t(j)] = dot * scale;
          m = std::max(m, s[size_t(j)]);
        }
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < L; ++j) {
          if (s[size_t(j)] == -INFINITY) continue;
          const float e = std::exp(s[size_t(j)] - m);
          sum += e;
          for (int64_t d = 0; d < D; ++d) acc[size_t(d)] += e * pr.at(p.v, b, j, h / G, d);
        }
        for (int64_t d = 0; d < D; ++d)
          out[size_t(((b * L + i) * p.Hq + h) * D + d)] = round_to(p.dtype, acc[size_t(d)] / sum);
        lse[size_t((b * L + i) * p.Hq + h)] = m + std::log(sum);
      }
}

// Naive fp32 backward from the stored out and lse (the same inputs the fast backward reads).
inline void naive_backward_f32(const Problem& pr, std::vector<double>& dq, std::vector<double>& dk,
                               std::vector<double>& dv) {
  const auto& p = pr.p;
  const int64_t L = pr.L, D = p.D, G = p.group();
  const float scale = p.softmax_scale();
  std::vector<float> fq(size_t(p.B * L * p.Hq * D), 0.f), fk(size_t(p.B * L * p.Hkv * D), 0.f), fv(fk.size(), 0.f);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t h = 0; h < p.Hq; ++h) {
        const int64_t hk = h / G;
        const float lse = p.lse[(b * L + i) * p.Hq + h];
        float Di = 0.f;
        for (int64_t d = 0; d < D; ++d) Di += pr.at(p.dout, b, i, h, d) * pr.at(p.out, b, i, h, d);
        for (int64_t j = 0; j < L; ++j) {
          if (!visible(p.layout, p.W, i, j)) continue;
          float dot = 0.f, dp = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            dot += pr.at(p.q, b, i, h, d) * pr.at(p.k, b, j, hk, d);
            dp += pr.at(p.dout, b, i, h, d) * pr.at(p.v, b, j, hk, d);
          }
          const float pij = std::exp(dot * scale - lse), ds = pij * (dp - Di);
          for (int64_t d = 0; d < D; ++d) {
            fv[size_t(((b * L + j) * p.Hkv + hk) * D + d)] += pij * pr.at(p.dout, b, i, h, d);
            fq[size_t(((b * L + i) * p.Hq + h) * D + d)] += scale * ds * pr.at(p.k, b, j, hk, d);
            fk[size_t(((b * L + j) * p.Hkv + hk) * D + d)] += scale * ds * pr.at(p.q, b, i, h, d);
          }
        }
      }
  auto out = [&](const std::vector<float>& f, std::vector<double>& o) {
    o.resize(f.size());
    for (size_t i = 0; i < f.size(); ++i) o[i] = round_to(p.dtype, f[i]);
  };
  out(fq, dq);
  out(fk, dk);
  out(fv, dv);
}

// Largest |got - ref| (NaN counts as infinite) and where.
struct Worst {
  double err = 0, ref_abs_max = 0;
  size_t index = 0;
};
inline Worst worst(const std::vector<double>& got, const std::vector<double>& ref) {
  Worst w;
  for (size_t i = 0; i < ref.size(); ++i) {
    double e = std::abs(got[i] - ref[i]);
    if (std::isnan(e)) e = INFINITY;
    if (e > w.err) {
      w.err = e;
      w.index = i;
    }
    w.ref_abs_max = std::max(w.ref_abs_max, std::abs(ref[i]));
  }
  return w;
}

// "[b, row, h, d]" of a flat index into [B, L, H, D].
inline std::string where(size_t i, int64_t L, int64_t H, int64_t D) {
  const int64_t d = int64_t(i) % D, h = int64_t(i) / D % H, row = int64_t(i) / (D * H) % L,
                b = int64_t(i) / (D * H * L);
  std::ostringstream os;
  os << "[b=" << b << ", row=" << row << ", h=" << h << ", d=" << d << "]";
  return os.str();
}

// The tolerance of docs/design.md: tolerances: the fast path may err by at most 4x the naive fp32 computation's error
// plus the rounding floor of the stored output (bf16: 2^-8 of the largest magnitude, i.e. one rounding of the output
// plus slack for ties; fp32: 2^-20, a few ulps of accumulated rounding).
inline double tolerance(double naive_err, double ref_abs_max, DType t) {
  const double u = t == DType::bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -20);
  return 4.0 * naive_err + u * std::max(ref_abs_max, 1.0);
}

// Checks one output tensor; the message names the case, its seed and the worst element.
inline void expect_close(const char* what, const Case& c, const std::vector<double>& got,
                         const std::vector<double>& naive, const std::vector<double>& ref, int64_t L, int64_t H) {
  const Worst wf = worst(got, ref), wn = worst(naive, ref);
  const double tol = tolerance(wn.err, wf.ref_abs_max, c.dtype);
  EXPECT_TRUE(wf.err <= tol) << what << ": max |fast - oracle| = " << wf.err << " at " << where(wf.index, L, H, c.D)
                             << " (got " << got[wf.index] << ", oracle " << ref[wf.index] << "), tolerance " << tol
                             << " (naive fp32 error " << wn.err << ")\n  case: " << c.str();
}

// Forces the portable tile primitives (the lowest SIMD target compiled in) for a test's scope and restores the
// automatic choice however it ends.
struct PortableScope {
  explicit PortableScope(bool on) { cpu::detail::force_generic_tile_kernels(on); }
  ~PortableScope() { cpu::detail::force_generic_tile_kernels(false); }
};

}  // namespace ksa::test
