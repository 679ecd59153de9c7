// CPU prefill forward: flash-style tiled online softmax over only the key tiles that the core's key_spans /
// KeyTileCursor return, in gathered order (text rows, then summary rows).
//
// 1. Gather (attention_tiles.hpp): q (times the softmax scale), k and v into fp32 gathered-order buffers,
//    K also as transposed 64-key panels. Old summaries are then one contiguous block of rows.
// 2. Work items (segment, h, query tile of BQ gathered rows), claimed one at a time by the pool (thread_pool.hpp); a
// segment is a batch
//    entry or one packed sequence with its own Layout (Segments), so no tile crosses a stream boundary. Per
//    item, for each key tile of the core's cursor on the segment's layout: S = Q K^T (score primitive), THE
//    rule on masked tiles only (visible_tokens on precomputed row tokens), per-row OnlineSoftmax (raise_max
//    gives the rescale of the accumulator), P = exp(S - m), O = alpha * O + P V (accumulate primitive).
// 3. out = O / l written to the stream positions in the input dtype; lse = m + log l.
// With p.q_begin only the query rows from that stream row on are read and written (QueryRows); query tiles
// without such a row are skipped, so the keys before q_begin cost their gather only.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/attention_tiles.hpp"
#include "cpu/thread_pool.hpp"
#include "ksa/cpu.hpp"
#include "ksa/error.hpp"
#include "ksa/softmax.hpp"

namespace ksa::cpu {

using namespace detail;

void attention_forward(const AttentionParams& p) {
  validate(p);
  if (p.L() == 0) return;
  const int threads = resolve_threads(p.num_threads);
  const int64_t Lrows = p.L(), G = p.group(), W = p.W;
  const TileKernels& kern = tile_kernels();

  const Segments segs(p);
  const Gathered Q = gather(p, segs, p.q, p.Hq, p.softmax_scale(), true, PanelGrid::none, 0, threads, p.q_begin);
  const QueryRows present(p.layout, p.q_begin);  // q_begin is 0 for packed calls (validate), so one layout
  const Gathered K = gather(p, segs, p.k, p.Hkv, 1.f, false, PanelGrid::key_tiles, 1, threads);
  const Gathered V = gather(p, segs, p.v, p.Hkv, 1.f, true, PanelGrid::none, 2, threads);
  const std::vector<StreamToken> tok = gathered_tokens(segs);
  const int64_t Dp = Q.Dp, items = segs.qtiles * p.Hq;

  struct Local {
    FloatBuf S, O;
    float alpha[BQ];
    OnlineSoftmax st[BQ];
    explicit Local(int64_t dp) : S(BQ * 64), O(BQ * dp) {}
  };
  PerWorker<Local> locals(threads);
  {
    parallel_for(threads, items, 1, [&](int64_t it, int worker) {
      Local& lw = locals.get(worker, Dp);
      const FloatBuf &S = lw.S, &O = lw.O;
      float* alpha = lw.alpha;
      OnlineSoftmax* st = lw.st;
      // Item (segment, h, query tile), numbered segment after segment.
      const Segment& sg = segs.of_query_tile(it / p.Hq);
      const Layout& lay = sg.lay;
      const int64_t local = it - sg.qt0 * p.Hq, qt = local % sg.nqt, h = local / sg.nqt, hk = h / G;
      const int64_t g0 = qt * BQ, g1 = std::min(sg.L, g0 + BQ);
      if (!present.any(g0, g1)) return;  // every row of the tile is before q_begin
      const int nr = int(g1 - g0);
      const float* q = Q.row(sg, h, g0);
      std::fill(O.data(), O.data() + nr * Dp, 0.f);
      for (int r = 0; r < nr; ++r) st[r] = OnlineSoftmax{};

      for_each_key_tile(lay, key_spans(lay, W, g0, g1), BK, [&](int64_t kb, int64_t ke, bool masked) {
        const int n = int(ke - kb);
        float* s = S.data();
        kern.scores(q, Dp, nr, K.panel(sg, hk, sg.grid.index_of(kb)), int(Dp), s);
        if (masked) apply_mask(s, nr, n, &tok[size_t(sg.tok0 + g0)], &tok[size_t(sg.tok0 + kb)], W, false);
        for (int r = 0; r < nr; ++r) {
          float* row = s + r * 64;
          const float bm = kern.row_max(row, n);
          if (bm == -INFINITY) {  // this row sees no key of this tile
            alpha[r] = 1.f;
            std::fill(row, row + n, 0.f);
            continue;
          }
          alpha[r] = st[r].raise_max(bm);
          st[r].l += kern.exp_shift(row, n, st[r].m);
        }
        kern.accumulate(s, nr, n, V.row(sg, hk, kb), int(Dp), O.data(), alpha);
      });

      for (int r = 0; r < nr; ++r) {
        if (!present.has(g0 + r)) continue;
        const int64_t pos = sg.row0 + lay.stream_of_gathered(g0 + r);
        const float inv = st[r].inv_sum();
        const float* o = O.data() + r * Dp;
        const int64_t off = p.out.offset(sg.b, pos, h);
        if (p.dtype == DType::f32) {
          float* dst = static_cast<float*>(p.out.data) + off;
          for (int64_t d = 0; d < p.D; ++d) dst[d] = o[d] * inv;
        } else {
          for (int64_t d = 0; d < p.D; ++d) store_from_float(p.dtype, p.out.data, off + d, o[d] * inv);
        }
        if (p.lse) p.lse[(sg.b * Lrows + pos) * p.Hq + h] = st[r].lse();
      }
    });
  }
}

}  // namespace ksa::cpu
