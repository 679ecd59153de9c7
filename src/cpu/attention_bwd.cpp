// CPU prefill backward with the forward's sparsity (only the core's key tiles), memory O(L*H*D), no LxL
// matrix, deterministic (no atomics, no races: every output row is written by exactly one work item, and
// every sum runs in a fixed order).
//
// Two passes over the same tile pairs (FlashAttention-2's math, with P recomputed from the saved lse); a
// segment is a batch entry or one packed sequence with its own Layout (Segments in attention_tiles.hpp):
//   pass 1, items (segment, kv head, key tile): for each query head of the group and each query tile that sees
//     the key tile, in transposed form (rows = keys): S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T,
//     dS^T = P^T (dP^T - Delta); dV += P^T dO, dK += dS^T (scale q). GQA sums inside the item.
//   pass 2, items (segment, q head, query tile): S = Q K^T, P, dP = dO V^T, dS; dQ += dS K, dq = scale * dQ.
// Pass 1 needs the query tiles of each key tile: the inverse of the core's key_spans/for_each_key_tile,
// built once per call from those functions (nothing re-derives the rule). Recomputing S and dP in both passes
// costs 7 tile GEMMs per tile pair instead of 5, the price of a race-free dQ without atomics or per-thread
// copies.
// With p.q_begin only the query rows from that stream row on take part (QueryRows): the others gather as
// zeros with lse = +inf and Delta = 0 (so P = 0 and they add nothing), are never read, and get no dq row;
// query tiles without such a row are skipped in both passes.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/attention_tiles.hpp"
#include "cpu/thread_pool.hpp"
#include "ksa/cpu.hpp"
#include "ksa/error.hpp"

namespace ksa::cpu {

using namespace detail;

namespace {

// Writes rows[0..n) (ld Dp) times mul to the stream positions of gathered rows g0.. of segment s, head h, of `t`
// (only the rows of `only`, when given).
void scatter_rows(const AttentionParams& p, const Segment& s, const TensorView& t, int64_t h, int64_t g0, int n,
                  const float* rows, int64_t Dp, float mul, const QueryRows* only = nullptr) {
  for (int r = 0; r < n; ++r) {
    if (only && !only->has(g0 + r)) continue;
    const int64_t off = t.offset(s.b, s.row0 + s.lay.stream_of_gathered(g0 + r), h);
    const float* src = rows + r * Dp;
    if (p.dtype == DType::f32) {
      float* dst = static_cast<float*>(t.data) + off;
      for (int64_t d = 0; d < p.D; ++d) dst[d] = src[d] * mul;
    } else {
      for (int64_t d = 0; d < p.D; ++d) store_from_float(p.dtype, t.data, off + d, src[d] * mul);
    }
  }
}

// dS = P (dP - delta) over a tile; delta per row (delta_row) or per column (delta_col).
void softmax_grad(float* ds, const float* prob, int rows, int cols, const float* delta_row, const float* delta_col) {
  for (int r = 0; r < rows; ++r) {
    float* d = ds + r * 64;
    const float* pr = prob + r * 64;
    if (delta_row) {
      const float dr = delta_row[r];
      for (int j = 0; j < cols; ++j) d[j] = pr[j] * (d[j] - dr);
    } else {
      for (int j = 0; j < cols; ++j) d[j] = pr[j] * (d[j] - delta_col[j]);
    }
  }
}

struct QueryRef {
  int64_t tile;
  bool masked;
};

}  // namespace

void attention_backward(const AttentionBackwardParams& p) {
  validate(p);
  if (p.L() == 0) return;
  const int threads = resolve_threads(p.num_threads);
  const int64_t Lrows = p.L(), G = p.group(), W = p.W, Hq = p.Hq, Hkv = p.Hkv;
  const float scale = p.softmax_scale();
  const TileKernels& kern = tile_kernels();

  // Q is gathered times the scale (S = (scale q) k), so dK = dS^T (scale q) needs no further factor.
  const Segments segs(p);
  const Gathered Q = gather(p, segs, p.q, Hq, scale, true, PanelGrid::query_tiles, 0, threads, p.q_begin);
  const Gathered dO = gather(p, segs, p.dout, Hq, 1.f, true, PanelGrid::query_tiles, 1, threads, p.q_begin);
  const QueryRows present(p.layout, p.q_begin);  // q_begin is 0 for packed calls (validate), so one layout
  const Gathered K = gather(p, segs, p.k, Hkv, 1.f, true, PanelGrid::key_tiles, 2, threads);
  const Gathered V = gather(p, segs, p.v, Hkv, 1.f, true, PanelGrid::key_tiles, 3, threads);
  const std::vector<StreamToken> tok = gathered_tokens(segs);
  const int64_t Dp = Q.Dp, nseg = int64_t(segs.seg.size());

  // lse and Delta = rowsum(dout * out), per (segment, q head) in gathered order: [segment][h][g].
  const Scratch lse = scratch(8, segs.rows * Hq), delta = scratch(9, segs.rows * Hq);
  auto at = [&](const Segment& s, int64_t h, int64_t g) { return (s.g0 * Hq + h * s.L + g); };
  parallel_for(threads, nseg * Hq, 1, [&](int64_t i, int) {
    const Segment& s = segs.seg[size_t(i / Hq)];
    const int64_t h = i % Hq;
    for (int64_t g = 0; g < s.L; ++g) {
      if (!present.has(g)) {
        delta.data()[at(s, h, g)] = 0.f;
        lse.data()[at(s, h, g)] = INFINITY;
        continue;
      }
      const int64_t pos = s.row0 + s.lay.stream_of_gathered(g), oo = p.out.offset(s.b, pos, h),
                    od = p.dout.offset(s.b, pos, h);
      float acc = 0.f;
      for (int64_t d = 0; d < p.D; ++d)
        acc += load_as_float(p.dtype, p.out.data, oo + d) * load_as_float(p.dtype, p.dout.data, od + d);
      delta.data()[at(s, h, g)] = acc;
      lse.data()[at(s, h, g)] = p.lse[(s.b * Lrows + pos) * Hq + h];
    }
  });

  // The query tiles that see each key tile (inverse of the core's tile walk), per distinct layout: entry
  // ref0 + kt of a segment (segments of a plain call share one table).
  std::vector<std::vector<QueryRef>> seen_by(size_t(segs.ktiles));
  for (const Segment& s : segs.seg) {
    if (s.ref0 != s.kt0) continue;  // shares the table of an earlier segment
    for (int64_t qt = 0; qt < s.nqt; ++qt) {
      const int64_t g0 = qt * BQ, g1 = std::min(s.L, g0 + BQ);
      if (!present.any(g0, g1)) continue;
      for_each_key_tile(s.lay, key_spans(s.lay, W, g0, g1), BK, [&](int64_t kb, int64_t, bool masked) {
        seen_by[size_t(s.ref0 + s.grid.index_of(kb))].push_back(QueryRef{qt, masked});
      });
    }
  }

  // Pass 1: dK, dV; items (segment, kv head, key tile). Summary tiles (seen by many query tiles) come first
  // in each segment for a short tail.
  const int64_t items1 = segs.ktiles * Hkv;
  struct Local1 {
    FloatBuf Pt, dSt, dK, dV;
    explicit Local1(int64_t dp) : Pt(BK * 64), dSt(BK * 64), dK(BK * dp), dV(BK * dp) {}
  };
  PerWorker<Local1> locals1(threads);
  {
    parallel_for(threads, items1, 1, [&](int64_t it, int worker) {
      const Local1& lw = locals1.get(worker, Dp);
      const FloatBuf &Pt = lw.Pt, &dSt = lw.dSt, &dK = lw.dK, &dV = lw.dV;
      const Segment& sg = segs.of_key_tile(it / Hkv);
      const int64_t nkt = sg.grid.count, local = it - sg.kt0 * Hkv;
      const int64_t kt = nkt - 1 - local % nkt, hk = local / nkt;
      const int64_t kb = sg.grid.begin(kt);
      const int nk = int(sg.grid.end(kt) - kb);
      std::fill(dK.data(), dK.data() + nk * Dp, 0.f);
      std::fill(dV.data(), dV.data() + nk * Dp, 0.f);
      const float* krows = K.row(sg, hk, kb);
      const float* vrows = V.row(sg, hk, kb);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (const QueryRef& qr : seen_by[size_t(sg.ref0 + kt)]) {
          const int64_t g0 = qr.tile * BQ;
          const int nq = int(std::min(sg.L, g0 + BQ) - g0);
          kern.scores(krows, Dp, nk, Q.panel(sg, h, qr.tile), int(Dp), Pt.data());
          if (qr.masked) apply_mask(Pt.data(), nk, nq, &tok[size_t(sg.tok0 + g0)], &tok[size_t(sg.tok0 + kb)], W, true);
          const float* lse_t = lse.data() + at(sg, h, g0);
          for (int i = 0; i < nk; ++i) kern.exp_shift_vec(Pt.data() + i * 64, nq, lse_t);
          kern.scores(vrows, Dp, nk, dO.panel(sg, h, qr.tile), int(Dp), dSt.data());
          softmax_grad(dSt.data(), Pt.data(), nk, nq, nullptr, delta.data() + at(sg, h, g0));
          kern.accumulate(Pt.data(), nk, nq, dO.row(sg, h, g0), int(Dp), dV.data(), nullptr);
          kern.accumulate(dSt.data(), nk, nq, Q.row(sg, h, g0), int(Dp), dK.data(), nullptr);
        }
      }
      scatter_rows(p, sg, p.dk, hk, kb, nk, dK.data(), Dp, 1.f);
      scatter_rows(p, sg, p.dv, hk, kb, nk, dV.data(), Dp, 1.f);
    });
  }

  // Pass 2: dQ; items (segment, q head, query tile).
  const int64_t items2 = segs.qtiles * Hq;
  struct Local2 {
    FloatBuf P, dS, dQ;
    explicit Local2(int64_t dp) : P(BQ * 64), dS(BQ * 64), dQ(BQ * dp) {}
  };
  PerWorker<Local2> locals2(threads);
  {
    parallel_for(threads, items2, 1, [&](int64_t it, int worker) {
      const Local2& lw = locals2.get(worker, Dp);
      const FloatBuf &P = lw.P, &dS = lw.dS, &dQ = lw.dQ;
      const Segment& sg = segs.of_query_tile(it / Hq);
      const Layout& lay = sg.lay;
      const int64_t local = it - sg.qt0 * Hq, qt = local % sg.nqt, h = local / sg.nqt, hk = h / G;
      const int64_t g0 = qt * BQ;
      const int nq = int(std::min(sg.L, g0 + BQ) - g0);
      if (!present.any(g0, g0 + nq)) return;
      std::fill(dQ.data(), dQ.data() + nq * Dp, 0.f);
      const float* qrows = Q.row(sg, h, g0);
      const float* dorows = dO.row(sg, h, g0);
      const float* lse_t = lse.data() + at(sg, h, g0);
      const float* delta_t = delta.data() + at(sg, h, g0);
      for_each_key_tile(lay, key_spans(lay, W, g0, g0 + nq), BK, [&](int64_t kb, int64_t ke, bool masked) {
        const int n = int(ke - kb);
        const int64_t kt = sg.grid.index_of(kb);
        kern.scores(qrows, Dp, nq, K.panel(sg, hk, kt), int(Dp), P.data());
        if (masked) apply_mask(P.data(), nq, n, &tok[size_t(sg.tok0 + g0)], &tok[size_t(sg.tok0 + kb)], W, false);
        for (int r = 0; r < nq; ++r) kern.exp_shift(P.data() + r * 64, n, lse_t[r]);
        kern.scores(dorows, Dp, nq, V.panel(sg, hk, kt), int(Dp), dS.data());
        softmax_grad(dS.data(), P.data(), nq, n, delta_t, nullptr);
        kern.accumulate(dS.data(), nq, n, K.row(sg, hk, kb), int(Dp), dQ.data(), nullptr);
      });
      scatter_rows(p, sg, p.dq, h, g0, nq, dQ.data(), Dp, scale, &present);
    });
  }
}

}  // namespace ksa::cpu
