// Packed sequences (AttentionParams::cu_seqlens) in the CUDA kernels: the tables that one launch walks, built
// on the host from the per-stream Layouts and uploaded with the launch. Plain C++ (no CUDA headers) so that
// tests/cuda_host checks them on any machine.
//
// Why a table built on the host, not a search over cu_seqlens in each CTA: cu_seqlens is host memory in
// AttentionParams (the CPU kernels read it there), so a packed launch uploads something anyway. With a table
// of (stream, query tile) work items each CTA finds its stream and rows with one load (no binary search, no
// prefix-sum pass), the tiles of all streams can be ordered heaviest first (a long stream's text tiles before
// a short stream's), and the construction is a pure function that a CPU test checks. Its cost: O(streams +
// tiles) host work and one small copy per call (128K rows in 64 streams at BQ = 128: ~1.1K tiles, ~18 KB).
//
// Three row spaces:
//   - tensor rows: stream s is rows [row0, row0 + L) of q, k, v, out, dq, ... and of lse [1, L, Hq];
//   - a stream's gathered rows [0, L), its own Layout's gathered order (text rows, then summaries). Every
//     query and key tile lies in one stream and sits on that stream's own BQ / BK grid, exactly where a call
//     on the stream alone puts it, so a CTA does the same arithmetic as there (the same bits);
//   - padded rows, the backward's lse2, Delta and fused-dQ accumulator ([Hq, Lp], gathered order): stream s
//     owns rows [p0, p0 + round_up(L, kRowBlock)), p0 a multiple of kRowBlock, its rows first and then its
//     padding (+inf / 0), as a single-stream call pads its L. So a query tile reads aligned lse2 / Delta and
//     its rows past the stream's end read that padding, never the next stream's rows.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cuda/attention_bwd_plan.hpp"
#include "ksa/attention.hpp"
#include "ksa/spec.hpp"

namespace ksa::cuda::varlen {

// The padded row space's granularity: detail::kRowPad of the backward (a multiple of every query tile).
inline constexpr int64_t kRowBlock = 128;

// One stream as the kernels read it.
struct alignas(16) Seq {
  Layout32 l32;      // its geometry (k, S, T, full chunks, tail) for the kernels' 32-bit index math
  int32_t row0 = 0;  // first tensor row (cu_seqlens[s])
  int32_t p0 = 0;    // first padded row (a multiple of kRowBlock)
  int32_t L = 0;     // rows
};
static_assert(sizeof(Seq) == 32, "two 16-byte loads");

// A CTA's query tile: gathered rows [g0, g1) of stream seq.
struct alignas(16) QueryTile {
  int32_t seq = 0, g0 = 0, g1 = 0, pad = 0;
};

// A key tile of the backward's dK/dV plan: key tile kt of stream seq (KeyTileGrid(its Layout, BK).rows).
struct alignas(8) KeyTile {
  int32_t seq = 0, kt = 0;
};

// A packed launch's tables on the device (null pointers for a plain call): a kernel argument of their own,
// beside FwdArgs / BwdArgs, whose layout stays a plain call's (growing BwdArgs by these pointers alone made
// ptxas spill more in the fused dK/dV/dQ kernel of plain calls).
struct Tables {
  const Seq* seqs = nullptr;
  const int32_t* row_blocks = nullptr;  // backward: the stream of each kRowBlock padded rows (row_blocks())
  const QueryTile* tiles = nullptr;     // the forward's, or the backward dQ pass's, work items: CTA x takes tiles[x]
  const KeyTile* ktiles = nullptr;      // backward: the dK/dV plan's key tiles (key_tiles())
};

// The streams of a call. Requires validated params with padded_rows < 2^31 (cuda::supports checks).
struct Streams {
  int64_t chunk_size = 1, S = 1;
  bool summarize_tail = false;
  std::vector<Seq> seqs;
  int64_t rows = 0;         // L: the rows of all streams
  int64_t padded_rows = 0;  // Lp: each stream's rows rounded up to kRowBlock, summed
  Layout layout(const Seq& s) const { return Layout(chunk_size, S, s.l32.T, summarize_tail); }
};

inline int64_t round_up_rows(int64_t L) { return (L + kRowBlock - 1) / kRowBlock * kRowBlock; }

// Each stream of p (packed or not: a plain call is one stream) with its rows in the three spaces.
inline Streams streams_of(const AttentionParams& p) {
  Streams st;
  st.chunk_size = p.layout.chunk_size;
  st.S = p.layout.S;
  st.summarize_tail = p.layout.summarize_tail;
  st.seqs.reserve(size_t(p.sequences()));
  for (int64_t s = 0; s < p.sequences(); ++s) {
    const SequenceRows r = p.sequence(s);
    Seq q;
    q.l32 = Layout32(r.layout);
    q.row0 = int32_t(r.row0);
    q.p0 = int32_t(st.padded_rows);
    q.L = int32_t(r.layout.length());
    st.seqs.push_back(q);
    st.padded_rows += round_up_rows(q.L);
  }
  st.rows = p.L();
  return st;
}

// Rows of the padded row space, without building the table (for cuda::supports).
inline int64_t padded_rows(const AttentionParams& p) {
  if (!p.packed()) return round_up_rows(p.L());
  int64_t n = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) n += round_up_rows(p.cu_seqlens[s + 1] - p.cu_seqlens[s]);
  return n;
}

// The work of a query tile, to order tiles heaviest first: the keys its rows see (key_spans, all kinds).
inline int64_t tile_cost(const Layout& lay, int64_t W, int64_t g0, int64_t g1) {
  const KeySpans ks = key_spans(lay, W, g0, g1);
  int64_t n = 0;
  for (int i = 0; i < ks.n; ++i) n += ks.span[i].end - ks.span[i].begin;
  return n;
}

// Every stream's query tiles: rows [g0, min(g0 + BQ, L)) for g0 = 0, BQ, 2 BQ, ... of each stream (empty
// streams have none), ordered by tile_cost, heaviest first (ties: stream order, then ascending tiles). The
// grid of a packed launch is (tiles.size(), Hq, 1): CTA x takes tile x.
inline std::vector<QueryTile> query_tiles(const Streams& st, int64_t W, int64_t BQ) {
  std::vector<QueryTile> tiles;
  std::vector<int64_t> cost;
  for (size_t s = 0; s < st.seqs.size(); ++s) {
    const Seq& q = st.seqs[s];
    const Layout lay = st.layout(q);
    for (int64_t g0 = 0; g0 < q.L; g0 += BQ) {
      const int64_t g1 = std::min<int64_t>(q.L, g0 + BQ);
      tiles.push_back(QueryTile{int32_t(s), int32_t(g0), int32_t(g1), 0});
      cost.push_back(tile_cost(lay, W, g0, g1));
    }
  }
  std::vector<size_t> order(tiles.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cost[a] > cost[b]; });
  std::vector<QueryTile> out;
  out.reserve(tiles.size());
  for (size_t i : order) out.push_back(tiles[i]);
  return out;
}

// The key tiles of the backward's dK/dV plan (BK rows, each stream's KeyTileCursor grid), numbered the text
// tiles of every stream first, then the summary tiles of every stream, so that the plan's schedule (which runs
// the summary tiles first: they have the longest lists) reads `ntext` as it does for one stream.
struct KeyTiles {
  std::vector<KeyTile> tiles;
  int64_t ntext = 0;
};
inline KeyTiles key_tiles(const Streams& st, int64_t BK) {
  KeyTiles kt;
  for (size_t s = 0; s < st.seqs.size(); ++s) {
    const int64_t n = KeyTileGrid(st.layout(st.seqs[s]), BK).ntext;
    for (int64_t i = 0; i < n; ++i) kt.tiles.push_back(KeyTile{int32_t(s), int32_t(i)});
  }
  kt.ntext = int64_t(kt.tiles.size());
  for (size_t s = 0; s < st.seqs.size(); ++s) {
    const Layout lay = st.layout(st.seqs[s]);
    const int64_t n0 = KeyTileGrid(lay, BK).ntext, n1 = KeyTileGrid(lay, BK).count;
    for (int64_t i = n0; i < n1; ++i) kt.tiles.push_back(KeyTile{int32_t(s), int32_t(i)});
  }
  return kt;
}

// The stream that owns each kRowBlock rows of the padded row space ([padded_rows / kRowBlock]): how the
// passes that walk padded rows (the backward's preprocess, the dK/dV plan's query tiles, the fused dQ's store)
// find their stream.
inline std::vector<int32_t> row_blocks(const Streams& st) {
  std::vector<int32_t> b(size_t(st.padded_rows / kRowBlock));
  for (size_t s = 0; s < st.seqs.size(); ++s) {
    const Seq& q = st.seqs[s];
    std::fill(b.begin() + q.p0 / kRowBlock, b.begin() + (q.p0 + round_up_rows(q.L)) / kRowBlock, int32_t(s));
  }
  return b;
}

}  // namespace ksa::cuda::varlen
