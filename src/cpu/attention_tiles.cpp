// The gather into gathered order and the per-thread scratch pool (see attention_tiles.hpp); the tile
// primitives themselves are in tile_kernels_hwy.cpp.
#include "cpu/attention_tiles.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cpu/simd.hpp"
#include "cpu/thread_pool.hpp"
#include "ksa/dtype.hpp"

namespace ksa::cpu::detail {

void force_generic_tile_kernels(bool on) { force_simd_target(on ? simd_targets().back() : 0); }

Scratch scratch(int slot, int64_t n) {
  thread_local FloatBuf pool[16];
  Scratch s;
  if (slot >= 0 && slot < 16) {
    if (pool[slot].size >= n) {
      s.ptr = pool[slot].data();
      return s;
    }
    int64_t others = 0;
    for (int i = 0; i < 16; ++i) others += i == slot ? 0 : pool[i].size;
    pool[slot] = FloatBuf();  // free first: never hold both
    if (others + n <= kPoolFloats) {
      pool[slot] = FloatBuf(n);
      s.ptr = pool[slot].data();
      return s;
    }
  }
  s.owned = FloatBuf(n);
  s.ptr = s.owned.data();
  return s;
}

Segments::Segments(const AttentionParams& p) {
  const int64_t n = p.sequences();
  seg.reserve(size_t(p.B * n));
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t i = 0; i < n; ++i) {
      const SequenceRows r = p.sequence(i);
      Segment s(r.layout);
      s.b = b;
      s.row0 = r.row0;
      s.L = r.layout.length();
      s.nqt = (s.L + BQ - 1) / BQ;
      s.g0 = rows;
      s.qt0 = qtiles;
      s.kt0 = ktiles;
      s.tok0 = p.packed() ? s.g0 : 0;
      s.ref0 = p.packed() ? s.kt0 : 0;
      rows += s.L;
      qtiles += s.nqt;
      ktiles += s.grid.count;
      seg.push_back(s);
    }
}

namespace {
// The last segment whose first tile (member `first`) is <= t: the one holding tile t (empty segments, with
// no tiles, share their first tile with the next one and are skipped).
const Segment& segment_of(const std::vector<Segment>& seg, int64_t t, int64_t Segment::*first) {
  const auto it =
      std::upper_bound(seg.begin(), seg.end(), t, [&](int64_t v, const Segment& s) { return v < s.*first; });
  return *(it - 1);
}
}  // namespace

const Segment& Segments::of_query_tile(int64_t qt) const { return segment_of(seg, qt, &Segment::qt0); }
const Segment& Segments::of_key_tile(int64_t kt) const { return segment_of(seg, kt, &Segment::kt0); }

Gathered gather(const AttentionParams& p, const Segments& segs, const TensorView& t, int64_t H, float mul,
                bool need_rows, PanelGrid grid, int slot, int threads, int64_t first_row) {
  Gathered g;
  g.H = H;
  g.Dp = round_up(p.D, 16);
  g.grid = grid;
  const int64_t D = p.D, Dp = g.Dp;
  const bool key_grid = grid == PanelGrid::key_tiles;
  // Without `need_rows` the rows still go through a per-block staging buffer for the panels.
  if (need_rows) g.rows = scratch(2 * slot, segs.rows * H * Dp);
  if (grid != PanelGrid::none) g.panels = scratch(2 * slot + 1, (key_grid ? segs.ktiles : segs.qtiles) * H * Dp * 64);
  static_assert(BQ == 64 && BK == 64, "the panels and the plain 64-row grid assume 64-row tiles");
  // Blocks of <= 64 rows: the key tiles, or the plain 64-row grid (= the query tiles); one work unit per
  // (segment, h, block), numbered as the tiles.
  const int64_t units = (key_grid ? segs.ktiles : segs.qtiles) * H;
  PerWorker<FloatBuf> staging_bufs(threads);
  {
    parallel_for(threads, units, 1, [&](int64_t u, int worker) {
      const Segment& s = key_grid ? segs.of_key_tile(u / H) : segs.of_query_tile(u / H);
      const int64_t nblocks = key_grid ? s.grid.count : s.nqt, local = u - (key_grid ? s.kt0 : s.qt0) * H;
      const int64_t h = local / nblocks, i = local % nblocks;
      const int64_t r0 = key_grid ? s.grid.begin(i) : i * 64;
      const int64_t r1 = key_grid ? s.grid.end(i) : std::min(s.L, r0 + 64);
      float* rows = need_rows ? const_cast<float*>(g.row(s, h, r0)) : staging_bufs.get(worker, 64 * Dp).data();
      for (int64_t r = 0; r < r1 - r0; ++r) {
        const int64_t pos = s.row0 + s.lay.stream_of_gathered(r0 + r);
        const int64_t off = t.offset(s.b, pos, h);
        float* dst = rows + r * Dp;
        if (pos < first_row) {
          std::fill(dst, dst + Dp, 0.f);
          continue;
        }
        if (p.dtype == DType::f32) {
          const float* src = static_cast<const float*>(t.data) + off;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * mul;
        } else if (p.dtype == DType::bf16) {
          const uint16_t* src = static_cast<const uint16_t*>(t.data) + off;
          for (int64_t d = 0; d < D; ++d) dst[d] = bf16::to_float(src[d]) * mul;
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d] = load_as_float(p.dtype, t.data, off + d) * mul;
        }
        for (int64_t d = D; d < Dp; ++d) dst[d] = 0.f;
      }
      if (grid == PanelGrid::none) return;
      float* pan = const_cast<float*>(g.panel(s, h, i));
      const int64_t n = r1 - r0;
      for (int64_t d = 0; d < Dp; ++d) {
        float* dst = pan + d * 64;
        for (int64_t j = 0; j < n; ++j) dst[j] = rows[j * Dp + d];
        for (int64_t j = n; j < 64; ++j) dst[j] = 0.f;
      }
    });
  }
  return g;
}

QueryRows::QueryRows(const Layout& lay, int64_t q_begin)
    : T(lay.T), text0(lay.text_before(q_begin)), sum0(lay.T + q_begin - text0) {}

std::vector<StreamToken> gathered_tokens(const Layout& lay) {
  std::vector<StreamToken> tok(size_t(lay.length()));
  for (int64_t g = 0; g < lay.length(); ++g) tok[size_t(g)] = token_of_gathered(lay, g);
  return tok;
}

std::vector<StreamToken> gathered_tokens(const Segments& segs) {
  std::vector<StreamToken> tok;
  for (const Segment& s : segs.seg) {
    if (s.tok0 + s.L <= int64_t(tok.size())) continue;  // a table this segment shares
    tok.resize(size_t(s.tok0 + s.L));
    for (int64_t g = 0; g < s.L; ++g) tok[size_t(s.tok0 + g)] = token_of_gathered(s.lay, g);
  }
  return tok;
}

void apply_mask(float* s, int rows, int cols, const StreamToken* qtok, const StreamToken* ktok, int64_t W,
                bool transposed) {
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * 64;
    if (!transposed) {
      const StreamToken q = qtok[r];
      for (int j = 0; j < cols; ++j)
        if (!visible_tokens(W, q, ktok[j])) row[j] = -INFINITY;
    } else {
      const StreamToken k = ktok[r];
      for (int j = 0; j < cols; ++j)
        if (!visible_tokens(W, qtok[j], k)) row[j] = -INFINITY;
    }
  }
}

}  // namespace ksa::cpu::detail
