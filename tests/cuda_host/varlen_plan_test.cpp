// The host side of packed sequences in the CUDA kernels (src/cuda/varlen_plan.hpp): the per-launch tables
// that the grid walks. Plain C++, so these run in every build (the kernels themselves are tested against one
// call per stream in tests/cuda/attention_varlen_test.cpp, on a GPU).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda/attention_bwd_plan.hpp"
#include "cuda/varlen_plan.hpp"
#include "ksa/attention.hpp"
#include "ksa/spec.hpp"

namespace ksa {
namespace {

using cuda::varlen::kRowBlock;

// Packed params over streams of the given text lengths (only the geometry: the views point at a dummy that
// nothing reads).
struct PackedGeometry {
  std::vector<int64_t> cu{0};
  float dummy[64] = {};
  AttentionParams p;
  PackedGeometry(const std::vector<int64_t>& texts, int64_t k, int64_t S, bool tail) {
    for (int64_t T : texts) cu.push_back(cu.back() + Layout(k, S, T, tail).length());
    p.layout = Layout(k, S, 0, tail);
    p.cu_seqlens = cu.data();
    p.num_seqs = int64_t(texts.size());
    p.D = 64;
    p.q = p.k = p.v = p.out = TensorView{dummy, 0, 64, 64};
  }
  PackedGeometry(const PackedGeometry&) = delete;
};

struct Case {
  std::vector<int64_t> texts;
  int64_t k, S, W;
  bool tail;
};

std::string describe(const Case& c) {
  std::string s = "texts=";
  for (int64_t T : c.texts) s += std::to_string(T) + ",";
  return s + " k=" + std::to_string(c.k) + " S=" + std::to_string(c.S) + " W=" + std::to_string(c.W) +
         " tail=" + std::to_string(c.tail);
}

// Awkward streams (lengths 0, 1, k-1, k, k+1, a stream shorter than one chunk, several tiles, one stream
// only), then random ones.
std::vector<Case> cases(uint64_t seed, int n) {
  std::vector<Case> c = {
      {{1, 7, 9, 130, 1000}, 8, 1, 2, false},
      {{0, 1, 7, 8, 9, 97, 0, 300, 65, 0}, 8, 1, 2, false},
      {{130, 3, 257, 16}, 8, 2, 0, true},
      {{5}, 8, 1, 3, false},
      {{2000}, 8, 1, 16, false},
      {{0}, 4, 1, 1, true},
      {{200, 1, 129}, 4, 1, 100, false},
      {{11, 40, 6, 77, 1}, 5, 2, 1, true},
  };
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    Case r;
    const int ns = 1 + int(rng() % 9);
    for (int s = 0; s < ns; ++s) r.texts.push_back(rng() % 5 == 0 ? int64_t(rng() % 3) : int64_t(rng() % 700));
    r.k = 1 + int64_t(rng() % 20);
    r.S = 1 + int64_t(rng() % 3);
    r.W = int64_t(rng() % 10);
    r.tail = rng() % 2;
    c.push_back(r);
  }
  return c;
}

bool same_layout32(const Layout32& a, const Layout32& b) {
  return a.chunk_size == b.chunk_size && a.S == b.S && a.T == b.T && a.full == b.full && a.tail == b.tail;
}

// Each stream's rows in the three row spaces: tensor rows [row0, row0 + L) back to back (cu_seqlens), padded
// rows from a multiple of 128 with the stream's padding after them, the Layout of its own length.
TEST(CudaVarlenPlan, StreamsOfPackedParams) {
  for (const Case& c : cases(1, 40)) {
    SCOPED_TRACE(describe(c));
    PackedGeometry g(c.texts, c.k, c.S, c.tail);
    ASSERT_NO_THROW(validate(g.p));
    const cuda::varlen::Streams st = cuda::varlen::streams_of(g.p);
    ASSERT_EQ(st.seqs.size(), c.texts.size());
    EXPECT_EQ(st.rows, g.cu.back());
    int64_t p0 = 0;
    for (size_t s = 0; s < st.seqs.size(); ++s) {
      const cuda::varlen::Seq& q = st.seqs[s];
      const Layout want(c.k, c.S, c.texts[s], c.tail);
      EXPECT_EQ(q.row0, g.cu[s]);
      EXPECT_EQ(q.L, g.cu[s + 1] - g.cu[s]);
      EXPECT_EQ(q.L, want.length());
      EXPECT_TRUE(same_layout32(q.l32, Layout32(want))) << "stream " << s;
      EXPECT_TRUE(same_layout32(q.l32, Layout32(g.p.sequence(int64_t(s)).layout))) << "stream " << s;
      const Layout lay = st.layout(q);
      EXPECT_EQ(lay.length(), q.L);
      EXPECT_EQ(lay.summarize_tail, c.tail);
      EXPECT_EQ(q.p0, p0) << "stream " << s;
      EXPECT_EQ(q.p0 % kRowBlock, 0);
      p0 += (q.L + kRowBlock - 1) / kRowBlock * kRowBlock;
    }
    EXPECT_EQ(st.padded_rows, p0);
    EXPECT_EQ(cuda::varlen::padded_rows(g.p), p0);
  }
  // A plain call is one stream at row 0, padded as the backward pads its L.
  AttentionParams p;
  p.layout = Layout(8, 1, 1000);
  const cuda::varlen::Streams st = cuda::varlen::streams_of(p);
  ASSERT_EQ(st.seqs.size(), 1u);
  EXPECT_EQ(st.seqs[0].row0, 0);
  EXPECT_EQ(st.seqs[0].p0, 0);
  EXPECT_EQ(st.seqs[0].L, p.L());
  EXPECT_EQ(st.padded_rows, (p.L() + 127) / 128 * 128);
  EXPECT_EQ(cuda::varlen::padded_rows(p), st.padded_rows);
}

// Every stream row (gathered order) maps to exactly one tensor row, inside its stream, and to one padded row,
// inside its stream's own padded rows, whose block row_blocks assigns to that stream. Every padded block
// belongs to a non-empty stream. The padding past a stream (p0 + L .. the next multiple of 128) covers every
// query tile of the kernels (BQ 32, 64, 128 from a multiple of BQ) that starts inside the stream.
TEST(CudaVarlenPlan, RowSpacesAndRowBlocks) {
  for (const Case& c : cases(2, 40)) {
    SCOPED_TRACE(describe(c));
    PackedGeometry g(c.texts, c.k, c.S, c.tail);
    const cuda::varlen::Streams st = cuda::varlen::streams_of(g.p);
    const std::vector<int32_t> blocks = cuda::varlen::row_blocks(st);
    ASSERT_EQ(int64_t(blocks.size()) * kRowBlock, st.padded_rows);
    std::vector<int> tensor_hits(size_t(st.rows), 0);
    for (size_t s = 0; s < st.seqs.size(); ++s) {
      const cuda::varlen::Seq& q = st.seqs[s];
      const int64_t padded_end = q.p0 + (q.L + kRowBlock - 1) / kRowBlock * kRowBlock;
      for (int64_t gi = 0; gi < q.L; ++gi) {
        const int64_t r = q.row0 + q.l32.stream_of_gathered(uint32_t(gi));
        ASSERT_GE(r, q.row0);
        ASSERT_LT(r, q.row0 + q.L);
        ++tensor_hits[size_t(r)];
        ASSERT_EQ(blocks[size_t((q.p0 + gi) / kRowBlock)], int32_t(s)) << "row " << gi;
      }
      for (int64_t BQ : {32, 64, 128})
        for (int64_t g0 = 0; g0 < q.L; g0 += BQ) ASSERT_LE(q.p0 + g0 + BQ, padded_end) << "BQ " << BQ;
    }
    for (int64_t r = 0; r < st.rows; ++r) ASSERT_EQ(tensor_hits[size_t(r)], 1) << "tensor row " << r;
    for (size_t b = 0; b < blocks.size(); ++b) {
      const cuda::varlen::Seq& q = st.seqs[size_t(blocks[b])];
      ASSERT_GT(q.L, 0);
      ASSERT_LE(q.p0, int64_t(b) * kRowBlock);
      ASSERT_LT(int64_t(b) * kRowBlock, q.p0 + (q.L + kRowBlock - 1) / kRowBlock * kRowBlock);
    }
  }
}

// The keys some query of [g0, g1) sees, by the rule itself.
int64_t brute_tile_cost(const Layout& lay, int64_t W, int64_t g0, int64_t g1) {
  int64_t n = 0;
  for (int64_t key = 0; key < lay.length(); ++key) {
    bool seen = false;
    for (int64_t qr = g0; qr < g1 && !seen; ++qr) seen = visible_gathered(lay, W, qr, key);
    n += seen;
  }
  return n;
}

// The work items: exactly each stream's query tiles on its own BQ grid from 0 (the tiles a call on the
// stream alone runs), each once, heaviest first by tile_cost (the keys the tile's rows see), ties in stream
// then tile order.
TEST(CudaVarlenPlan, QueryTilesAreEachStreamsOwnHeaviestFirst) {
  for (const Case& c : cases(3, 40)) {
    SCOPED_TRACE(describe(c));
    PackedGeometry g(c.texts, c.k, c.S, c.tail);
    const cuda::varlen::Streams st = cuda::varlen::streams_of(g.p);
    for (int64_t BQ : {32, 64, 128}) {
      SCOPED_TRACE("BQ=" + std::to_string(BQ));
      const std::vector<cuda::varlen::QueryTile> tiles = cuda::varlen::query_tiles(st, c.W, BQ);
      std::set<std::pair<int32_t, int32_t>> got;
      int64_t prev_cost = INT64_MAX;
      std::pair<int32_t, int32_t> prev_key{-1, -1};
      for (const cuda::varlen::QueryTile& t : tiles) {
        ASSERT_GE(t.seq, 0);
        ASSERT_LT(size_t(t.seq), st.seqs.size());
        const cuda::varlen::Seq& q = st.seqs[size_t(t.seq)];
        ASSERT_EQ(t.g0 % BQ, 0);
        ASSERT_LT(t.g0, q.L);
        ASSERT_EQ(t.g1, std::min<int64_t>(q.L, t.g0 + BQ));
        ASSERT_TRUE(got.insert({t.seq, t.g0}).second) << "tile twice: stream " << t.seq << " row " << t.g0;
        const int64_t cost = cuda::varlen::tile_cost(st.layout(q), c.W, t.g0, t.g1);
        ASSERT_LE(cost, prev_cost) << "not heaviest first";
        if (cost == prev_cost) {
          ASSERT_LT(prev_key, std::make_pair(t.seq, t.g0)) << "ties out of order";
        }
        prev_cost = cost;
        prev_key = {t.seq, t.g0};
      }
      size_t want = 0;
      for (const cuda::varlen::Seq& q : st.seqs) want += size_t((q.L + BQ - 1) / BQ);
      EXPECT_EQ(got.size(), want);
    }
  }
  // tile_cost is the number of keys the tile's rows see (key_spans is exactly their union).
  for (const Case& c : cases(4, 0))
    for (int64_t T : c.texts) {
      const Layout lay(c.k, c.S, T, c.tail);
      for (int64_t g0 = 0; g0 < lay.length(); g0 += 32) {
        const int64_t g1 = std::min<int64_t>(lay.length(), g0 + 32);
        ASSERT_EQ(cuda::varlen::tile_cost(lay, c.W, g0, g1), brute_tile_cost(lay, c.W, g0, g1))
            << describe(c) << " T=" << T << " g0=" << g0;
      }
    }
}

// The plan's key tiles: every stream's KeyTileCursor grid, each tile once, the text tiles of all streams
// first; in each stream, the tiles' rows cover [0, L) once.
TEST(CudaVarlenPlan, KeyTilesTextFirstEachStreamsGrid) {
  for (const Case& c : cases(5, 40)) {
    SCOPED_TRACE(describe(c));
    PackedGeometry g(c.texts, c.k, c.S, c.tail);
    const cuda::varlen::Streams st = cuda::varlen::streams_of(g.p);
    for (int64_t BK : {32, 64, 128}) {
      SCOPED_TRACE("BK=" + std::to_string(BK));
      const cuda::varlen::KeyTiles kt = cuda::varlen::key_tiles(st, BK);
      int64_t nk = 0, ntext = 0;
      for (const cuda::varlen::Seq& q : st.seqs) {
        nk += KeyTileGrid(st.layout(q), BK).count;
        ntext += KeyTileGrid(st.layout(q), BK).ntext;
      }
      ASSERT_EQ(int64_t(kt.tiles.size()), nk);
      ASSERT_EQ(kt.ntext, ntext);
      std::vector<std::vector<int>> rows_hit(st.seqs.size());
      for (size_t s = 0; s < st.seqs.size(); ++s) rows_hit[s].assign(size_t(st.seqs[s].L), 0);
      std::set<std::pair<int32_t, int32_t>> seen;
      for (size_t i = 0; i < kt.tiles.size(); ++i) {
        const cuda::varlen::KeyTile t = kt.tiles[i];
        const Layout lay = st.layout(st.seqs[size_t(t.seq)]);
        const bool text = t.kt < KeyTileGrid(lay, BK).ntext;
        ASSERT_EQ(text, int64_t(i) < kt.ntext) << "tile " << i;
        ASSERT_LT(t.kt, KeyTileGrid(lay, BK).count);
        ASSERT_TRUE(seen.insert({t.seq, t.kt}).second);
        int64_t tb, te;
        KeyTileGrid(lay, BK).rows(t.kt, tb, te);
        ASSERT_LT(tb, te);
        for (int64_t r = tb; r < te; ++r) ++rows_hit[size_t(t.seq)][size_t(r)];
      }
      for (size_t s = 0; s < st.seqs.size(); ++s)
        for (int h : rows_hit[s]) ASSERT_EQ(h, 1) << "stream " << s;
    }
  }
}

// What the backward's plan kernels do with the tables, on the host: query tile qt of the plan is padded rows
// [qt BQ, qt BQ + BQ); row_blocks gives its stream, and qt - p0 / BQ is its number in that stream. A stream's
// own tiles 0 .. ceil(L / BQ) - 1 are exactly the padded tiles that start inside its rows; the others are
// padding (no query rows).
TEST(CudaVarlenPlan, PaddedQueryTilesMapToTheirStream) {
  for (const Case& c : cases(6, 40)) {
    SCOPED_TRACE(describe(c));
    PackedGeometry g(c.texts, c.k, c.S, c.tail);
    const cuda::varlen::Streams st = cuda::varlen::streams_of(g.p);
    const std::vector<int32_t> blocks = cuda::varlen::row_blocks(st);
    for (int64_t BQ : {32, 64}) {
      const int64_t nq = st.padded_rows / BQ;
      ASSERT_EQ(nq * BQ, st.padded_rows);
      std::vector<int64_t> own(st.seqs.size(), 0);
      for (int64_t qt = 0; qt < nq; ++qt) {
        const int64_t p = qt * BQ;
        const int32_t s = blocks[size_t(p / kRowBlock)];
        const cuda::varlen::Seq& q = st.seqs[size_t(s)];
        const int64_t g0 = p - q.p0;
        ASSERT_GE(g0, 0);
        ASSERT_EQ(g0 % BQ, 0);
        if (g0 < q.L) {
          ASSERT_EQ(qt - q.p0 / BQ, g0 / BQ);
          ++own[size_t(s)];
        }
      }
      for (size_t s = 0; s < st.seqs.size(); ++s) EXPECT_EQ(own[s], (st.seqs[s].L + BQ - 1) / BQ) << "stream " << s;
    }
  }
}

}  // namespace
}  // namespace ksa
