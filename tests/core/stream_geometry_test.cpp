// StreamGeometry (ksa/stream_geometry.hpp), the growing stream's arithmetic, against the fixed-length Layout
// and the rule (ksa::visible) on random geometries; and KeyTileGrid against KeyTileCursor.
#include "ksa/stream_geometry.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

namespace ksa {
namespace {

struct Geo {
  int64_t chunk, S, W, T;
};
std::vector<Geo> random_geometries(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Geo> out;
  for (int i = 0; i < n; ++i) {
    auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
    out.push_back(Geo{pick(1, 9), pick(1, 4), pick(0, 6), pick(1, 80)});
  }
  return out;
}

// token, counts, positions and rows equal the Layout of the stream up to each position.
TEST(StreamGeometry, EqualsTheLayoutOfTheStreamSoFar) {
  for (const Geo& g : random_geometries(200, 1)) {
    const StreamGeometry geo(g.chunk, g.S, g.W);
    const Layout lay = geo.layout(g.T);
    ASSERT_EQ(lay.length(), geo.counts_after_text(g.T).length());
    for (int64_t pos = 0; pos < lay.length(); ++pos) {
      const StreamToken a = geo.token(pos), b = lay.token(pos);
      ASSERT_EQ(a.chunk, b.chunk);
      ASSERT_EQ(a.index, b.index);
      ASSERT_EQ(a.is_summary, b.is_summary);
      const StreamCounts n = geo.counts(pos);
      ASSERT_EQ(n.T, lay.text_before(pos)) << "pos " << pos;
      ASSERT_EQ(n.sums, pos - lay.text_before(pos));
      if (a.is_summary) {
        ASSERT_EQ(geo.summary_position(a.chunk, a.index), pos);
        ASSERT_EQ(geo.row_of(a), a.chunk * g.S + a.index);
      } else {
        ASSERT_EQ(geo.text_position(geo.row_of(a)), pos);
        ASSERT_EQ(lay.text_to_stream(geo.row_of(a)), pos);
      }
      // Summaries owed before the next text token: those of the last full chunk not yet in the stream.
      ASSERT_EQ(geo.pending_summaries(n), (n.T / g.chunk) * g.S - n.sums);
    }
  }
}

// live_text_begin: no token after the first `pos` positions sees a text row below it, and (unless it is 0)
// some later token sees the row at it.
TEST(StreamGeometry, LiveTextBeginIsTheFirstTextRowALaterTokenSees) {
  for (const Geo& g : random_geometries(200, 2)) {
    const StreamGeometry geo(g.chunk, g.S, g.W);
    const int64_t T_end = g.T + (g.W + 2) * g.chunk;  // far enough that every row has been seen for the last time
    const Layout lay = geo.layout(T_end);
    for (int64_t pos = 0; pos <= geo.counts_after_text(g.T).length(); ++pos) {
      const int64_t lo = geo.live_text_begin(geo.counts(pos));
      // The lowest text row any token from position pos on sees. Windows only move forward, and a chunk's
      // summaries see no text before it: the minimum is reached within the next chunk's worth of tokens.
      int64_t first_seen = -1;
      for (int64_t q = pos; q < std::min(lay.length(), pos + 2 * geo.period()); ++q)
        for (int64_t t = 0; t < lay.T; ++t)
          if (visible(lay, g.W, q, lay.text_to_stream(t))) {
            if (first_seen < 0 || t < first_seen) first_seen = t;
            break;
          }
      ASSERT_GE(first_seen, 0);
      ASSERT_EQ(lo, first_seen) << "chunk=" << g.chunk << " S=" << g.S << " W=" << g.W << " pos " << pos;
    }
  }
}

// decode_keys: exactly the keys ksa::visible shows, as text and summary rows, no duplicates.
TEST(StreamGeometry, DecodeKeysEqualTheVisibleRule) {
  for (const Geo& g : random_geometries(200, 7)) {
    const StreamGeometry geo(g.chunk, g.S, g.W);
    const Layout lay = geo.layout(g.T);
    for (int64_t pos = 0; pos < lay.length(); ++pos) {
      const DecodeKeys keys = geo.decode_keys(pos);
      std::vector<int> seen(size_t(lay.length()), 0);
      for (int r = 0; r < keys.n; ++r)
        for (int64_t x = keys.range[r].begin; x < keys.range[r].end; ++x) {
          const int64_t p = keys.range[r].summary ? geo.summary_position(x / g.S, x % g.S) : geo.text_position(x);
          ASSERT_LT(p, lay.length());
          ++seen[size_t(p)];
        }
      for (int64_t j = 0; j < lay.length(); ++j)
        ASSERT_EQ(seen[size_t(j)], visible(lay, g.W, pos, j) ? 1 : 0)
            << "chunk=" << g.chunk << " S=" << g.S << " W=" << g.W << " T=" << g.T << " query " << pos << " key " << j;
      const StreamToken t = geo.token(pos);
      EXPECT_EQ(keys.is_summary, t.is_summary);
      EXPECT_EQ(keys.row, geo.row_of(t));
    }
  }
}

// KeyTileGrid numbers exactly the tiles KeyTileCursor walks; KeySpans::meets / full_over give the cursor's
// choice of tiles and its `masked` for every query range (the inverse of the walk the backward builds on).
TEST(KeyTileGrid, IsTheCursorsGridAndItsInverse) {
  std::mt19937_64 rng(11);
  for (int it = 0; it < 300; ++it) {
    auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
    const bool tail = pick(0, 1) == 1;
    const Layout lay(pick(1, 12), pick(1, 3), pick(1, 300), tail);
    const int64_t W = pick(0, 8), BK = pick(0, 1) ? 16 : 64, BQ = pick(0, 1) ? 32 : 64;
    const KeyTileGrid grid(lay, BK);
    for (int64_t i = 0; i < grid.count; ++i) ASSERT_EQ(grid.index_of(grid.begin(i)), i);
    for (int64_t q0 = 0; q0 < lay.length(); q0 += BQ) {
      const int64_t q1 = std::min(lay.length(), q0 + BQ);
      const KeySpans sp = key_spans(lay, W, q0, q1);
      std::vector<int> walked(size_t(grid.count), -1);  // -1 not walked, else masked
      for_each_key_tile(lay, sp, BK, [&](int64_t tb, int64_t te, bool masked) {
        const int64_t i = grid.index_of(tb);
        ASSERT_EQ(grid.begin(i), tb);
        ASSERT_EQ(grid.end(i), te);
        walked[size_t(i)] = masked ? 1 : 0;
      });
      for (int64_t i = 0; i < grid.count; ++i) {
        ASSERT_EQ(sp.meets(grid.begin(i), grid.end(i)), walked[size_t(i)] >= 0) << "tile " << i;
        if (walked[size_t(i)] >= 0) {
          ASSERT_EQ(!sp.full_over(grid.begin(i), grid.end(i)), walked[size_t(i)] == 1);
        }
      }
    }
  }
}

}  // namespace
}  // namespace ksa
