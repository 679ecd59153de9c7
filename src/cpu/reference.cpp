// The oracle (docs/design.md: the oracle): plain loops, double accumulation, a full probability row per query. It asks
// the core rule `visible` about every (query, key) pair of a stream (packed sequences: of the query's own
// stream); it is slow on purpose and kept forever.
#include <algorithm>
#include <cmath>
#include <limits>

#include "ksa/cpu.hpp"
#include "ksa/error.hpp"

namespace ksa::cpu {
namespace {

double load(const AttentionParams& p, const TensorView& t, int64_t b, int64_t row, int64_t h, int64_t d) {
  return load_as_float(p.dtype, t.data, t.offset(b, row, h) + d);
}

// Scores and probabilities of one query row against all L keys (invisible keys get p = 0).
struct Row {
  std::vector<double> s, prob;
  std::vector<int64_t> keys;  // visible keys
  double lse = 0;
};

// The stream holding row i (packed sequences: the last one starting at or before i, skipping empty ones).
SequenceRows stream_of_row(const AttentionParams& p, int64_t i) {
  if (!p.packed()) return p.sequence(0);
  const int64_t* end = p.cu_seqlens + p.num_seqs + 1;
  return p.sequence(int64_t(std::upper_bound(p.cu_seqlens, end, i) - p.cu_seqlens) - 1);
}

Row row_probs(const AttentionParams& p, int64_t b, int64_t i, int64_t h) {
  const int64_t hk = h / p.group();
  const double scale = p.softmax_scale();
  const SequenceRows sq = stream_of_row(p, i);  // keys of other streams are never visible
  Row r;
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = sq.row0; j < sq.row0 + sq.layout.length(); ++j) {
    if (!visible(sq.layout, p.W, i - sq.row0, j - sq.row0)) continue;
    double dot = 0;
    for (int64_t d = 0; d < p.D; ++d) dot += load(p, p.q, b, i, h, d) * load(p, p.k, b, j, hk, d);
    r.keys.push_back(j);
    r.s.push_back(dot * scale);
    m = std::max(m, dot * scale);
  }
  if (r.keys.empty()) fail("oracle: query row ", i, " sees no key (invalid layout)");
  double sum = 0;
  for (double s : r.s) sum += std::exp(s - m);
  r.lse = m + std::log(sum);
  r.prob.resize(r.s.size());
  for (size_t t = 0; t < r.s.size(); ++t) r.prob[t] = std::exp(r.s[t] - r.lse);
  return r;
}

}  // namespace

ReferenceOutput attention_reference(const AttentionParams& p, std::span<const int64_t> rows) {
  validate(p);
  const int64_t L = p.L();
  std::vector<int64_t> all;
  if (rows.empty()) {
    all.resize(size_t(L));
    for (int64_t i = 0; i < L; ++i) all[size_t(i)] = i;
    rows = all;
  }
  for (int64_t i : rows)
    if (i < 0 || i >= L) fail("rows: stream position ", i, " is outside [0, ", L, ")");
  ReferenceOutput o;
  o.rows = int64_t(rows.size());
  o.out.assign(size_t(p.B * o.rows * p.Hq * p.D), 0.0);
  o.lse.assign(size_t(p.B * o.rows * p.Hq), 0.0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t r = 0; r < o.rows; ++r)
      for (int64_t h = 0; h < p.Hq; ++h) {
        const int64_t i = rows[size_t(r)];
        const Row row = row_probs(p, b, i, h);
        double* out = &o.out[size_t(((b * o.rows + r) * p.Hq + h) * p.D)];
        for (size_t t = 0; t < row.keys.size(); ++t)
          for (int64_t d = 0; d < p.D; ++d) out[d] += row.prob[t] * load(p, p.v, b, row.keys[t], h / p.group(), d);
        o.lse[size_t((b * o.rows + r) * p.Hq + h)] = row.lse;
      }
  return o;
}

ReferenceGrads attention_reference_backward(const AttentionBackwardParams& p) {
  validate(static_cast<const AttentionParams&>(p));
  if (p.L() > 0 && !p.dout.data) fail("dout: data pointer is null");
  const int64_t L = p.L(), D = p.D, G = p.group();
  const double scale = p.softmax_scale();
  ReferenceGrads g;
  g.dq.assign(size_t(p.B * L * p.Hq * D), 0.0);
  g.dk.assign(size_t(p.B * L * p.Hkv * D), 0.0);
  g.dv.assign(size_t(p.B * L * p.Hkv * D), 0.0);
  auto dout = [&](int64_t b, int64_t i, int64_t h, int64_t d) {
    return double(load_as_float(p.dtype, p.dout.data, p.dout.offset(b, i, h) + d));
  };
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t h = 0; h < p.Hq; ++h) {
        const int64_t hk = h / G;
        const Row row = row_probs(p, b, i, h);
        // out_i and Di = dout_i . out_i
        std::vector<double> out(size_t(D), 0.0);
        for (size_t t = 0; t < row.keys.size(); ++t)
          for (int64_t d = 0; d < D; ++d) out[size_t(d)] += row.prob[t] * load(p, p.v, b, row.keys[t], hk, d);
        double Di = 0;
        for (int64_t d = 0; d < D; ++d) Di += dout(b, i, h, d) * out[size_t(d)];
        double* dq = &g.dq[size_t(((b * L + i) * p.Hq + h) * D)];
        for (size_t t = 0; t < row.keys.size(); ++t) {
          const int64_t j = row.keys[t];
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += dout(b, i, h, d) * load(p, p.v, b, j, hk, d);
          const double ds = row.prob[t] * (dp - Di);
          double* dk = &g.dk[size_t(((b * L + j) * p.Hkv + hk) * D)];
          double* dv = &g.dv[size_t(((b * L + j) * p.Hkv + hk) * D)];
          for (int64_t d = 0; d < D; ++d) {
            dv[d] += row.prob[t] * dout(b, i, h, d);
            dq[d] += scale * ds * load(p, p.k, b, j, hk, d);
            dk[d] += scale * ds * load(p, p.q, b, i, h, d);
          }
        }
      }
  return g;
}

}  // namespace ksa::cpu
