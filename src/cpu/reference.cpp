// The oracle (docs/design.md: the oracle): plain loops, double accumulation, a full probability row per query. It asks
// the core rule `visible` about every (query, key) pair of a stream (packed sequences: of the query's own
// stream); it is slow on purpose and kept forever.
//
// Its rows run on all hardware threads (the GPU tests compare every kernel with it, and on one thread it took
// most of their time), without changing a single bit of what it returns: every sum is made in the order the
// plain loops below give it, whichever thread makes it. The forward's rows are independent. The backward
// runs blocks of queries in order: their rows (probabilities, dS, dq) in parallel, then their dk/dv
// contributions with the head dimension split across threads, each element's terms added query by query,
// head by head, key by key, as one thread would.
#include <algorithm>
#include <cmath>
#include <limits>

#include "ksa/cpu.hpp"
#include "ksa/error.hpp"
#include "thread_pool.hpp"

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
  std::vector<double> q(size_t(p.D));
  for (int64_t d = 0; d < p.D; ++d) q[size_t(d)] = load(p, p.q, b, i, h, d);
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = sq.row0; j < sq.row0 + sq.layout.length(); ++j) {
    if (!visible(sq.layout, p.W, i - sq.row0, j - sq.row0)) continue;
    double dot = 0;
    for (int64_t d = 0; d < p.D; ++d) dot += q[size_t(d)] * load(p, p.k, b, j, hk, d);
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
  // One item per (b, r, h), each writing only its own out and lse.
  detail::parallel_for(detail::resolve_threads(0), p.B * o.rows * p.Hq, 1, [&](int64_t item, int) {
    const int64_t h = item % p.Hq, r = item / p.Hq % o.rows, b = item / p.Hq / o.rows;
    const int64_t i = rows[size_t(r)];
    const Row row = row_probs(p, b, i, h);
    double* out = &o.out[size_t(((b * o.rows + r) * p.Hq + h) * p.D)];
    for (size_t t = 0; t < row.keys.size(); ++t)
      for (int64_t d = 0; d < p.D; ++d) out[d] += row.prob[t] * load(p, p.v, b, row.keys[t], h / p.group(), d);
    o.lse[size_t((b * o.rows + r) * p.Hq + h)] = row.lse;
  });
  return o;
}

ReferenceGrads attention_reference_backward(const AttentionBackwardParams& p) {
  validate(static_cast<const AttentionParams&>(p));
  if (p.L() > 0 && !p.dout.data) fail("dout: data pointer is null");
  const int64_t L = p.L(), D = p.D, G = p.group(), H = p.Hq;
  const double scale = p.softmax_scale();
  ReferenceGrads g;
  g.dq.assign(size_t(p.B * L * H * D), 0.0);
  g.dk.assign(size_t(p.B * L * p.Hkv * D), 0.0);
  g.dv.assign(size_t(p.B * L * p.Hkv * D), 0.0);
  auto dout = [&](int64_t b, int64_t i, int64_t h, int64_t d) {
    return double(load_as_float(p.dtype, p.dout.data, p.dout.offset(b, i, h) + d));
  };
  // Query rows i in blocks whose rows' keys, probabilities and dS (at most L each) stay within ~32 MiB.
  const int64_t block = std::clamp<int64_t>((int64_t(1) << 25) / (std::max<int64_t>(L, 1) * H * 24), 1, 256);
  std::vector<Row> rows(size_t(std::min(block, std::max<int64_t>(L, 1)) * H));
  std::vector<std::vector<double>> dss(rows.size());
  const int threads = detail::resolve_threads(0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t i0 = 0; i0 < L; i0 += block) {
      const int64_t n = std::min(block, L - i0);
      // The block's rows: probabilities, dS_t = P_t (dP_t - D_i) and dq_i (its own sum over the row's keys).
      detail::parallel_for(threads, n * H, 1, [&](int64_t item, int) {
        const int64_t i = i0 + item / H, h = item % H, hk = h / G;
        Row& row = rows[size_t(item)];
        row = row_probs(p, b, i, h);
        std::vector<double> dO(static_cast<size_t>(D));  // dout_i
        for (int64_t d = 0; d < D; ++d) dO[size_t(d)] = dout(b, i, h, d);
        // out_i and Di = dout_i . out_i
        std::vector<double> out(size_t(D), 0.0);
        for (size_t t = 0; t < row.keys.size(); ++t)
          for (int64_t d = 0; d < D; ++d) out[size_t(d)] += row.prob[t] * load(p, p.v, b, row.keys[t], hk, d);
        double Di = 0;
        for (int64_t d = 0; d < D; ++d) Di += dO[size_t(d)] * out[size_t(d)];
        double* dq = &g.dq[size_t(((b * L + i) * H + h) * D)];
        std::vector<double>& ds = dss[size_t(item)];
        ds.resize(row.keys.size());
        for (size_t t = 0; t < row.keys.size(); ++t) {
          const int64_t j = row.keys[t];
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += dO[size_t(d)] * load(p, p.v, b, j, hk, d);
          const double dst = row.prob[t] * (dp - Di);
          ds[t] = dst;
          for (int64_t d = 0; d < D; ++d) dq[d] += scale * dst * load(p, p.k, b, j, hk, d);
        }
      });
      // Their dk/dv terms, a range of dimensions per worker, each element's in the serial order: rows i,
      // then heads h, then keys t.
      detail::parallel_chunks(threads, D, (D + threads - 1) / threads, [&](int64_t d0, int64_t d1, int) {
        std::vector<double> q(size_t(d1 - d0)), dO(size_t(d1 - d0));
        for (int64_t item = 0; item < n * H; ++item) {
          const int64_t i = i0 + item / H, h = item % H, hk = h / G;
          for (int64_t d = d0; d < d1; ++d) {
            q[size_t(d - d0)] = load(p, p.q, b, i, h, d);
            dO[size_t(d - d0)] = dout(b, i, h, d);
          }
          const Row& row = rows[size_t(item)];
          const std::vector<double>& ds = dss[size_t(item)];
          for (size_t t = 0; t < row.keys.size(); ++t) {
            double* dk = &g.dk[size_t(((b * L + row.keys[t]) * p.Hkv + hk) * D)];
            double* dv = &g.dv[size_t(((b * L + row.keys[t]) * p.Hkv + hk) * D)];
            const double pt = row.prob[t], sd = scale * ds[t];
            for (int64_t d = d0; d < d1; ++d) {
              dv[d] += pt * dO[size_t(d - d0)];
              dk[d] += sd * q[size_t(d - d0)];
            }
          }
        }
      });
    }
  return g;
}

}  // namespace ksa::cpu
