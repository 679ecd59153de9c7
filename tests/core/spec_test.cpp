// The spec: stream layout, positions, the visibility rule, key spans/tiles and pair counting.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "ksa/error.hpp"
#include "ksa/spec.hpp"

namespace ksa {
namespace {

// k=2, S=1, W=1 over 5 text tokens: stream t0 t1 s0 t2 t3 s1 t4 (no summary for the partial tail).
TEST(Spec, HandCheckedVisibility) {
  const Layout lay(2, 1, 5);
  ASSERT_EQ(lay.length(), 7);
  const char* expect[7] = {"1000000", "1100000", "1110000", "1101000", "1101100", "0001110", "0011101"};
  for (int q = 0; q < 7; ++q)
    for (int k = 0; k < 7; ++k) EXPECT_EQ(visible(lay, 1, q, k), expect[q][k] == '1') << "q=" << q << " k=" << k;
  // With the tail summarised, s2 (pos 7) sees t4 and itself; nothing else changes.
  const Layout tail(2, 1, 5, true);
  ASSERT_EQ(tail.length(), 8);
  for (int k = 0; k < 8; ++k) EXPECT_EQ(visible(tail, 1, 7, k), k == 6 || k == 7) << k;
  for (int q = 0; q < 7; ++q)
    for (int k = 0; k < 7; ++k) EXPECT_EQ(visible(tail, 1, q, k), expect[q][k] == '1');
  // W=0: t2 sees s0 instead of chunk 0's text.
  EXPECT_TRUE(visible(lay, 0, 3, 2));
  EXPECT_FALSE(visible(lay, 0, 3, 0));
}

TEST(Spec, StreamLayoutMaps) {
  const Layout lay(4, 2, 10);  // chunks: [0..3]+2 sums, [4..7]+2 sums, tail [8,9]
  EXPECT_EQ(lay.length(), 14);
  EXPECT_EQ(lay.full_chunks(), 2);
  EXPECT_EQ(lay.num_chunks(), 3);
  const std::vector<int> text_pos = {0, 1, 2, 3, 6, 7, 8, 9, 12, 13};
  for (int t = 0; t < 10; ++t) {
    EXPECT_EQ(lay.text_to_stream(t), text_pos[size_t(t)]);
    EXPECT_EQ(lay.stream_to_text(text_pos[size_t(t)]), t);
  }
  EXPECT_EQ(lay.summary_to_stream(0, 0), 4);
  EXPECT_EQ(lay.summary_to_stream(1, 1), 11);
  EXPECT_EQ(lay.stream_to_text(5), -1);
  EXPECT_TRUE(lay.is_summary(10));
  // Gathered order: text, then summaries; a bijection.
  std::set<int64_t> seen;
  for (int64_t p = 0; p < lay.length(); ++p) {
    const int64_t g = lay.gathered_of_stream(p);
    EXPECT_EQ(lay.stream_of_gathered(g), p);
    const StreamToken a = lay.token(p), b = token_of_gathered(lay, g);
    EXPECT_TRUE(a.chunk == b.chunk && a.index == b.index && a.is_summary == b.is_summary) << p;
    seen.insert(g);
  }
  EXPECT_EQ(int64_t(seen.size()), lay.length());
  EXPECT_EQ(lay.gathered_of_stream(4), 10);
  EXPECT_EQ(lay.gathered_of_stream(11), 13);
}

// text_before(pos) counts the text rows in [0, pos), also inside a summarised partial tail (where the chunk
// arithmetic of a full chunk would count its summaries as text).
TEST(Spec, TextBeforeCountsTextRows) {
  for (const Layout lay :
       {Layout(4, 2, 10), Layout(4, 2, 10, true), Layout(3, 1, 9), Layout(8, 3, 13, true), Layout(5, 1, 0)}) {
    int64_t text = 0;
    for (int64_t pos = 0; pos <= lay.length(); ++pos) {
      EXPECT_EQ(lay.text_before(pos), text) << "k=" << lay.chunk_size << " S=" << lay.S << " T=" << lay.T << " pos=" << pos;
      if (pos < lay.length() && !lay.is_summary(pos)) ++text;
    }
  }
  EXPECT_EQ(Layout(4, 2, 10, true).text_before(15), 10);  // the tail's second summary: all 10 text rows before it
}

TEST(Spec, StreamIdsAndPositions) {
  Spec s;
  s.chunk_size = 4;
  s.S = 2;
  s.summary_token_begin = 1000;
  std::vector<int32_t> ids = {10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
  struct Case {
    TextPositions tm;
    SummaryPositions sm;
    bool tail;
    std::vector<int64_t> pos;
  };
  const std::vector<Case> cases = {
      {TextPositions::origin,
       SummaryPositions::last_chunk_slice_right,
       false,
       {0, 1, 2, 3, 1, 3, 4, 5, 6, 7, 5, 7, 8, 9}},
      {TextPositions::origin,
       SummaryPositions::last_chunk_slice_left,
       false,
       {0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 4, 5, 8, 9}},
      {TextPositions::origin, SummaryPositions::zeros, false, {0, 1, 2, 3, 0, 0, 4, 5, 6, 7, 0, 0, 8, 9}},
      {TextPositions::inner_chunk,
       SummaryPositions::last_chunk_slice_right,
       false,
       {0, 1, 2, 3, 1, 3, 0, 1, 2, 3, 5, 7, 0, 1}},
      {TextPositions::origin,
       SummaryPositions::last_chunk_slice_right,
       true,
       {0, 1, 2, 3, 1, 3, 4, 5, 6, 7, 5, 7, 8, 9, 8, 9}},
      {TextPositions::origin,
       SummaryPositions::last_chunk_slice_left,
       true,
       {0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 4, 5, 8, 9, 8, 8}},
  };
  for (const Case& c : cases) {
    s.text_positions = c.tm;
    s.summary_positions = c.sm;
    s.summarize_tail = c.tail;
    const Stream st = build_stream(s, ids);
    ASSERT_EQ(st.positions.size(), c.pos.size()) << to_string(c.sm);
    for (size_t i = 0; i < c.pos.size(); ++i)
      EXPECT_EQ(st.positions[i], c.pos[i]) << to_string(c.tm) << "/" << to_string(c.sm) << " pos " << i;
    EXPECT_EQ(st.ids[4], 1000);
    EXPECT_EQ(st.ids[5], 1001);
    EXPECT_EQ(st.ids[6], 14);
    EXPECT_EQ(st.ids[12], 18);
    EXPECT_EQ(st.is_summary[11], 1);
  }
  // S=1, k=8, last_chunk_slice_right: the summary sits at its chunk's last text position (7, 15, 23).
  Spec r;
  std::vector<int32_t> many(24, 5);
  const Stream st = build_stream(r, many);
  EXPECT_EQ(st.positions[8], 7);
  EXPECT_EQ(st.positions[17], 15);
  EXPECT_EQ(st.positions[26], 23);
}

TEST(Spec, ValidationNamesFieldAndValue) {
  auto msg = [](Spec s) {
    try {
      s.validate();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  Spec s;
  s.chunk_size = 0;
  EXPECT_NE(msg(s).find("chunk_size (summary_chunk_size)"), std::string::npos);
  EXPECT_NE(msg(s).find("got 0"), std::string::npos);
  s = Spec{};
  s.S = 0;
  EXPECT_NE(msg(s).find("S (summary_token_num)"), std::string::npos);
  s = Spec{};
  s.W = -1;
  EXPECT_NE(msg(s).find("got -1"), std::string::npos);
  EXPECT_EQ(msg(Spec{}), "");
  // Issue #26: begin + S once overflowed (UB) for a begin near 2^63 and the check passed.
  s = Spec{};
  s.summary_token_begin = INT64_MAX;
  EXPECT_NE(
      msg(s).find("summary_token_begin: must be a token id with room for S summary ids (got 9223372036854775807)"),
      std::string::npos)
      << msg(s);
  s.S = 2;
  s.summary_token_begin = (int64_t(1) << 31) - 1;  // ids 2^31-1 and 2^31: the second is not an int32
  EXPECT_NE(msg(s).find("summary_token_begin"), std::string::npos);
  s.summary_token_begin = (int64_t(1) << 31) - 2;
  EXPECT_EQ(msg(s), "");
  EXPECT_THROW(parse_summary_positions("middle"), Error);
  EXPECT_EQ(parse_text_positions("inner_chunk"), TextPositions::inner_chunk);
}

// Random small layouts for the property tests; the seed is printed on failure through SCOPED_TRACE.
struct RandomCase {
  Layout lay;
  int64_t W;
};
RandomCase random_case(std::mt19937_64& rng) {
  const int64_t k = 1 + int64_t(rng() % 6), S = 1 + int64_t(rng() % 3);
  const int64_t T = 1 + int64_t(rng() % 60);
  const int64_t W = int64_t(rng() % 6);
  return {Layout(k, S, T, rng() % 2 == 0), W};
}

TEST(Spec, PropertiesNoGapNoDuplicate) {
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    std::mt19937_64 rng(seed);
    const auto [lay, W] = random_case(rng);
    SCOPED_TRACE("seed " + std::to_string(seed) + " k=" + std::to_string(lay.chunk_size) + " S=" + std::to_string(lay.S) +
                 " T=" + std::to_string(lay.T) + " W=" + std::to_string(W));
    const int64_t L = lay.length();
    for (int64_t q = 0; q < L; ++q) {
      const StreamToken a = lay.token(q);
      if (a.is_summary) {
        for (int64_t j = 0; j < L; ++j) {
          if (visible(lay, W, q, j)) {
            ASSERT_EQ(lay.token(j).chunk, a.chunk);  // only its chunk
          }
        }
        continue;
      }
      for (int64_t c = 0; c < a.chunk; ++c) {  // every earlier chunk: full text xor all summaries
        int64_t text = 0, sums = 0;
        for (int64_t j = 0; j < L; ++j)
          if (lay.token(j).chunk == c && visible(lay, W, q, j)) {
            (lay.token(j).is_summary ? sums : text)++;
          }
        ASSERT_TRUE((text == lay.chunk_size && sums == 0) || (text == 0 && sums == lay.S)) << "q=" << q << " chunk " << c;
        ASSERT_EQ(text == lay.chunk_size, c >= a.chunk - W);
      }
      // W >= #chunks: exactly causal text.
      for (int64_t j = 0; j < L; ++j) {
        const bool causal_text = !lay.is_summary(j) && j <= q;
        ASSERT_EQ(visible(lay, lay.num_chunks(), q, j), causal_text);
      }
      ASSERT_TRUE(visible(lay, W, q, q));  // every row sees itself: never fully masked
    }
    int64_t pairs = 0;
    for (int64_t q = 0; q < L; ++q)
      for (int64_t j = 0; j < L; ++j) pairs += visible(lay, W, q, j);
    ASSERT_EQ(count_visible_pairs(lay, W), pairs);
  }
}

TEST(Spec, KeySpansAreExact) {
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    std::mt19937_64 rng(seed);
    const RandomCase rc = random_case(rng);
    const Layout& lay = rc.lay;  // not a structured binding: the lambdas below capture it (Clang 14)
    const int64_t W = rc.W;
    SCOPED_TRACE("seed " + std::to_string(seed));
    const int64_t L = lay.length();
    for (int64_t BQ : {int64_t(1), int64_t(3), int64_t(8), L}) {
      for (int64_t q0 = 0; q0 < L; q0 += BQ) {
        const int64_t q1 = std::min(L, q0 + BQ);
        const KeySpans sp = key_spans(lay, W, q0, q1);
        std::vector<int> in_span(size_t(L), 0), in_full(size_t(L), 0);
        for (int i = 0; i < sp.n; ++i) {
          ASSERT_LT(sp.span[i].begin, sp.span[i].end);
          if (i) {
            ASSERT_LE(sp.span[i - 1].end, sp.span[i].begin);  // sorted, disjoint
          }
          for (int64_t g = sp.span[i].begin; g < sp.span[i].end; ++g) {
            in_span[size_t(g)]++;
            in_full[size_t(g)] = sp.span[i].full;
          }
        }
        for (int64_t g = 0; g < L; ++g) {
          int seen_by = 0;
          for (int64_t gq = q0; gq < q1; ++gq) seen_by += visible_gathered(lay, W, gq, g);
          ASSERT_EQ(in_span[size_t(g)] == 1, seen_by > 0) << "tile [" << q0 << "," << q1 << ") key " << g;
          if (in_full[size_t(g)]) {
            ASSERT_EQ(seen_by, q1 - q0) << "full span key " << g;
          }
        }
        // Tiles: cover every visible pair, each holds one, unmasked ones hold only visible pairs.
        for (int64_t BK : {int64_t(1), int64_t(4), int64_t(16)}) {
          std::vector<int> covered(size_t(L), 0);
          int64_t prev = -1;
          for_each_key_tile(lay, sp, BK, [&](int64_t b, int64_t e, bool masked) {
            ASSERT_GT(b, prev);
            prev = b;
            ASSERT_TRUE((b < lay.T && e <= lay.T) || b >= lay.T);  // never mixes text and summaries
            int64_t vis = 0;
            for (int64_t g = b; g < e; ++g) {
              covered[size_t(g)]++;
              for (int64_t gq = q0; gq < q1; ++gq) vis += visible_gathered(lay, W, gq, g);
            }
            ASSERT_GT(vis, 0) << "empty tile [" << b << "," << e << ")";
            if (!masked) {
              ASSERT_EQ(vis, (e - b) * (q1 - q0));
            }
          });
          for (int64_t g = 0; g < L; ++g)
            if (in_span[size_t(g)]) {
              ASSERT_EQ(covered[size_t(g)], 1) << "key " << g << " BK " << BK;
            }
        }
      }
    }
  }
}

TEST(Spec, Layout32MatchesLayout) {
  for (uint64_t seed = 1; seed <= 200; ++seed) {
    std::mt19937_64 rng(seed);
    const auto [lay, W] = random_case(rng);
    const Layout32 l32(lay);
    for (int64_t q = 0; q < lay.length(); ++q)
      for (int64_t g = 0; g < lay.length(); ++g)
        ASSERT_EQ(visible_tokens(int32_t(W), l32.token_of_gathered(uint32_t(q)), l32.token_of_gathered(uint32_t(g))),
                  visible_gathered(lay, W, q, g));
    for (int64_t g = 0; g < lay.length(); ++g) {
      ASSERT_EQ(int64_t(l32.stream_of_gathered(uint32_t(g))), lay.stream_of_gathered(g)) << "seed " << seed;
      const StreamToken32 a = l32.token_of_gathered(uint32_t(g));
      const StreamToken b = token_of_gathered(lay, g);
      ASSERT_TRUE(a.chunk == b.chunk && a.index == b.index && a.is_summary == b.is_summary) << "seed " << seed;
    }
  }
}

TEST(Spec, RowKeyRangesAreExact) {
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    std::mt19937_64 rng(seed);
    const auto [lay, W] = random_case(rng);
    const Layout32 l32(lay);
    const int32_t W32 = int32_t(std::min<int64_t>(W, int64_t(1) << 30));
    for (int64_t q = 0; q < lay.length(); ++q) {
      const RowKeyRanges r = row_key_ranges(l32, W32, uint32_t(q));
      for (int64_t g = 0; g < lay.length(); ++g) {
        const bool in = g < lay.T ? (g >= r.text_lo && g <= r.text_hi) : (g >= r.sum_lo && g <= r.sum_hi);
        ASSERT_EQ(in, visible_gathered(lay, W, q, g)) << "seed " << seed << " query " << q << " key " << g;
      }
      // Each range lies inside its region (the kernels' tiles never mix the two).
      if (r.text_lo <= r.text_hi) {
        ASSERT_TRUE(r.text_lo >= 0 && r.text_hi < lay.T);
      }
      if (r.sum_lo <= r.sum_hi) {
        ASSERT_TRUE(r.sum_lo >= lay.T && r.sum_hi < lay.length());
      }
    }
  }
}

TEST(Spec, PairCountAtReleasedShape) {
  EXPECT_EQ(count_visible_pairs(Layout(8, 1, 131072), 128), 1191391744);
  EXPECT_EQ(count_causal_pairs(131072), 8590000128);
  // W >= chunks: text queries are plain causal; plus each summary query's k + j + 1 keys.
  const Layout lay(8, 1, 1000);
  EXPECT_EQ(count_visible_pairs(lay, 1000), count_causal_pairs(1000) + 125 * 9);
}

TEST(Spec, CacheRows) {
  Spec s;  // k=8, S=1, W=128
  EXPECT_EQ(cache_rows(s, 131072).text, 128 * 8);
  EXPECT_EQ(cache_rows(s, 131072).summaries, 16384);
  EXPECT_EQ(cache_rows(s, 13).text, 13);
  EXPECT_EQ(cache_rows(s, 13).summaries, 1);
  EXPECT_EQ(cache_rows(s, 131075).text, 128 * 8 + 3);
}

}  // namespace
}  // namespace ksa
