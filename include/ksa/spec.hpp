// The KSA specification (docs/ksa.md): parameters, the stream layout, RoPE positions, the ONE
// visibility rule and the key-tile ranges every kernel iterates. Everything here that kernels need is
// header-inline and usable from CUDA device code (KSA_HD); nothing here re-derives the rule elsewhere.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ksa/config.hpp"

namespace ksa {

// RoPE position of text tokens (HF `summary_chunk_position_ids_type`).
enum class TextPositions : uint8_t { origin, inner_chunk };
// RoPE position of summary tokens (HF `summary_token_position_ids_type`).
enum class SummaryPositions : uint8_t { zeros, last_chunk_slice_left, last_chunk_slice_right };

const char* to_string(TextPositions m);
const char* to_string(SummaryPositions m);
// Parse the HF config strings; throw ksa::Error naming `field` and the value when unknown.
TextPositions parse_text_positions(const std::string& s, const char* field = "summary_chunk_position_ids_type");
SummaryPositions parse_summary_positions(const std::string& s, const char* field = "summary_token_position_ids_type");

// One layer's KSA parameters (docs/ksa.md: Parameters). W is per layer; everything else is per model.
struct Spec {
  int64_t chunk_size = 8;       // summary_chunk_size: text tokens per chunk
  int64_t S = 1;                // summary_token_num: summaries after each full chunk
  int64_t W = 128;              // summary_sliding_chunk_num: window of earlier chunks seen as text
  bool summarize_tail = false;  // also summarise a trailing partial chunk (training framework)
  TextPositions text_positions = TextPositions::origin;
  SummaryPositions summary_positions = SummaryPositions::last_chunk_slice_right;
  int64_t summary_token_begin = 151936;  // id of summary token 0; ids begin..begin+S-1

  static constexpr int64_t kMaxChunk = 1 << 20;
  static constexpr int64_t kMaxSummaries = 1 << 16;
  static constexpr int64_t kMaxWindow = int64_t(1) << 40;

  // Throws ksa::Error naming the field and its value ("k: must be >= 1 (got 0)").
  void validate() const;
};

// What a stream position holds.
struct StreamToken {
  int64_t chunk = 0;  // chunk index c
  int64_t index = 0;  // offset in the chunk's text, or summary index j
  bool is_summary = false;
};

// The stream geometry of T text tokens (docs/ksa.md: The stream) and the "gathered" order used by the kernels: all text
// rows in text order (gathered index t), then all summary rows (gathered index T + c*S + j). In gathered
// order the window is a band of text rows and the old summaries one contiguous block (docs/ksa.md: Where the geometry
// lives in the code).
struct Layout {
  int64_t chunk_size = 1, S = 1, T = 0;
  bool summarize_tail = false;

  Layout() = default;
  KSA_HD Layout(int64_t chunk, int64_t S_, int64_t T_, bool tail = false)
      : chunk_size(chunk), S(S_), T(T_), summarize_tail(tail) {}
  static Layout of(const Spec& s, int64_t T) { return Layout(s.chunk_size, s.S, T, s.summarize_tail); }

  KSA_HD int64_t full_chunks() const { return T / chunk_size; }
  KSA_HD int64_t tail_len() const { return T % chunk_size; }
  KSA_HD int64_t num_chunks() const { return (T + chunk_size - 1) / chunk_size; }  // incl. a partial tail
  // Chunks that have summary tokens in the stream.
  KSA_HD int64_t summarized_chunks() const { return full_chunks() + ((summarize_tail && tail_len() > 0) ? 1 : 0); }
  KSA_HD int64_t num_summaries() const { return summarized_chunks() * S; }
  KSA_HD int64_t length() const { return T + num_summaries(); }  // L
  KSA_HD int64_t chunk_text_len(int64_t c) const { return c < full_chunks() ? chunk_size : tail_len(); }
  KSA_HD int64_t chunk_begin(int64_t c) const { return c * (chunk_size + S); }

  KSA_HD StreamToken token(int64_t pos) const {
    StreamToken t;
    t.chunk = pos / (chunk_size + S);
    const int64_t off = pos - t.chunk * (chunk_size + S);
    const int64_t n = chunk_text_len(t.chunk);
    t.is_summary = off >= n;
    t.index = t.is_summary ? off - n : off;
    return t;
  }
  KSA_HD int64_t text_to_stream(int64_t t) const { return (t / chunk_size) * (chunk_size + S) + t % chunk_size; }
  KSA_HD int64_t summary_to_stream(int64_t c, int64_t j) const { return c * (chunk_size + S) + chunk_text_len(c) + j; }
  // Text index of a stream position, or -1 for a summary.
  KSA_HD int64_t stream_to_text(int64_t pos) const {
    const StreamToken t = token(pos);
    return t.is_summary ? -1 : t.chunk * chunk_size + t.index;
  }
  KSA_HD bool is_summary(int64_t pos) const { return token(pos).is_summary; }
  // Text rows before stream position pos (0 <= pos <= length()); pos minus this is the summaries before it.
  // In gathered order, the rows from pos on are the text rows from this count and the summaries from T + the other.
  KSA_HD int64_t text_before(int64_t pos) const {
    if (pos >= length()) return T;
    const StreamToken t = token(pos);
    return t.chunk * chunk_size + (t.is_summary ? chunk_text_len(t.chunk) : t.index);
  }

  // Gathered order (see above).
  KSA_HD int64_t gathered_of_stream(int64_t pos) const {
    const StreamToken t = token(pos);
    return t.is_summary ? T + t.chunk * S + t.index : t.chunk * chunk_size + t.index;
  }
  KSA_HD int64_t stream_of_gathered(int64_t g) const {
    if (g < T) return text_to_stream(g);
    const int64_t s = g - T;
    return summary_to_stream(s / S, s % S);
  }
};

// The text length T whose stream has length L (the inverse of Layout::length), or -1 when no T gives a
// stream of that length (e.g. L = k with S >= 1 and no tail summaries: a full chunk always has its summaries).
KSA_HD int64_t text_length_of_stream(int64_t chunk_size, int64_t S, int64_t L, bool summarize_tail = false) {
  if (chunk_size < 1 || S < 1 || L < 0) return -1;
  const int64_t c = L / (chunk_size + S), r = L % (chunk_size + S);
  // Without tail summaries the remainder is the partial chunk's text; with them, its text and its S summaries.
  const int64_t T = (!summarize_tail || r == 0) ? c * chunk_size + r : c * chunk_size + r - S;
  return T >= 0 && Layout(chunk_size, S, T, summarize_tail).length() == L ? T : -1;
}

// A StreamToken in 32-bit fields (kernels keep many in registers).
struct StreamToken32 {
  int32_t chunk = 0, index = 0;
  bool is_summary = false;
};

// The gathered-order maps of Layout in 32-bit unsigned arithmetic, for GPU kernels (64-bit division is
// many times slower there). Valid while L < 2^31; tests check it equals Layout on random layouts.
struct Layout32 {
  uint32_t chunk_size = 1, S = 1, T = 0, full = 0, tail = 0;
  Layout32() = default;
  KSA_HD explicit Layout32(const Layout& l)
      : chunk_size(uint32_t(l.chunk_size)),
        S(uint32_t(l.S)),
        T(uint32_t(l.T)),
        full(uint32_t(l.full_chunks())),
        tail(uint32_t(l.tail_len())) {}
  KSA_HD uint32_t stream_of_gathered(uint32_t g) const { return g < T ? text_to_stream(g) : summary_to_stream(g - T); }
  // Stream position of text row t, and of summary row s (chunk s / S, summary s % S).
  KSA_HD uint32_t text_to_stream(uint32_t t) const {
    const uint32_t c = t / chunk_size;
    return c * (chunk_size + S) + (t - c * chunk_size);
  }
  KSA_HD uint32_t summary_to_stream(uint32_t s) const {
    const uint32_t c = s / S;
    return c * (chunk_size + S) + (c < full ? chunk_size : tail) + (s - c * S);
  }
  // Chunk, index and kind of a gathered row (as token_of_gathered).
  KSA_HD StreamToken32 token_of_gathered(uint32_t g) const {
    StreamToken32 t;
    const bool summ = g >= T;
    const uint32_t x = summ ? g - T : g, d = summ ? S : chunk_size, c = x / d;
    t.chunk = int32_t(c);
    t.index = int32_t(x - c * d);
    t.is_summary = summ;
    return t;
  }
};

// The keys (gathered order) one query row sees, as two inclusive ranges: its text keys [text_lo, text_hi]
// and its summary keys [sum_lo, sum_hi] (an empty range has lo > hi). The rule makes each a single run:
// a text query sees the text from the start of its window to itself and the summaries of the chunks before
// the window; a summary query sees its chunk's text and, causally, its chunk's summaries. Kernels whose key
// tiles never mix text and summaries (KeyTileCursor) mask a tile with two compares per element. Checked
// against visible_tokens in tests/core/spec_test.cpp. W is the window clamped to int32 (>= 0); g < 2^31.
struct RowKeyRanges {
  int32_t text_lo = 1, text_hi = 0, sum_lo = 1, sum_hi = 0;
};
KSA_HD RowKeyRanges row_key_ranges(const Layout32& l, int32_t W, uint32_t g) {
  RowKeyRanges r;
  const int32_t T = int32_t(l.T), chunk_size = int32_t(l.chunk_size), S = int32_t(l.S);
  if (g < l.T) {
    const int32_t qc = int32_t(g / l.chunk_size), wc = qc - W > 0 ? qc - W : 0;
    r.text_lo = wc * chunk_size;
    r.text_hi = int32_t(g);
    r.sum_lo = T;
    r.sum_hi = T + wc * S - 1;
  } else {
    const uint32_t c = (g - l.T) / l.S;
    const int32_t len = int32_t(c < l.full ? l.chunk_size : l.tail);
    r.text_lo = int32_t(c) * chunk_size;
    r.text_hi = int32_t(c) * chunk_size + len - 1;
    r.sum_lo = T + int32_t(c) * S;
    r.sum_hi = int32_t(g);
  }
  return r;
}

// RoPE position of a stream position (docs/ksa.md: Positions).
KSA_HD int64_t rope_position(const Layout& lay, TextPositions tm, SummaryPositions sm, int64_t pos) {
  const StreamToken t = lay.token(pos);
  if (!t.is_summary) return tm == TextPositions::origin ? t.chunk * lay.chunk_size + t.index : t.index;
  const int64_t a = t.chunk * lay.chunk_size, n = lay.chunk_text_len(t.chunk), j = t.index;
  int64_t p = 0;
  switch (sm) {
    case SummaryPositions::zeros:
      return 0;
    case SummaryPositions::last_chunk_slice_right:
      p = a + ((j + 1) * n) / lay.S - 1;
      break;
    case SummaryPositions::last_chunk_slice_left:
      p = a + (j * n) / lay.S - 1;
      break;
  }
  return p < a ? a : p;
}

// THE visibility rule (docs/ksa.md: Who sees whom), on the tokens at the query's and the key's positions. Everything
// else (visible, visible_gathered, the kernels' masks on precomputed row tokens) calls this one function. Tok is
// StreamToken or the kernels' 32-bit StreamToken32; I is the window's integer type.
template <class I, class Tok>
KSA_HD bool visible_tokens(I W, const Tok& a, const Tok& b) {
  if (a.is_summary) {
    // A summary sees its chunk's text and, causally, the summaries of its chunk; nothing older.
    return b.chunk == a.chunk && (!b.is_summary || b.index <= a.index);
  }
  if (b.chunk == a.chunk) return !b.is_summary && b.index <= a.index;  // own chunk: causal text only
  if (b.chunk > a.chunk) return false;
  const bool in_window = b.chunk >= a.chunk - W;
  return in_window ? !b.is_summary : b.is_summary;  // window as text, older chunks as summaries
}

// Does the query at stream position q see the key at stream position kp? Both in [0, lay.length()).
KSA_HD bool visible(const Layout& lay, int64_t W, int64_t q, int64_t kp) {
  return visible_tokens(W, lay.token(q), lay.token(kp));
}

// The token at a gathered index (same as lay.token(lay.stream_of_gathered(g)), without the detour).
KSA_HD StreamToken token_of_gathered(const Layout& lay, int64_t g) {
  StreamToken t;
  if (g < lay.T) {
    t.chunk = g / lay.chunk_size;
    t.index = g - t.chunk * lay.chunk_size;
  } else {
    const int64_t s = g - lay.T;
    t.chunk = s / lay.S;
    t.index = s - t.chunk * lay.S;
    t.is_summary = true;
  }
  return t;
}

// Same rule in gathered order.
KSA_HD bool visible_gathered(const Layout& lay, int64_t W, int64_t gq, int64_t gk) {
  return visible_tokens(W, token_of_gathered(lay, gq), token_of_gathered(lay, gk));
}

// A run of keys (gathered order) that some query of a query range sees. `full`: every query of the range
// sees every key of the span (no mask needed); otherwise each key is seen by at least one query.
struct KeySpan {
  int64_t begin = 0, end = 0;
  bool full = false;
};
struct KeySpans {
  static constexpr int kMax = 6;
  KeySpan span[kMax];
  int n = 0;
  KSA_HD void add(int64_t b, int64_t e, bool full) {
    if (e <= b) return;
    if (n > 0 && span[n - 1].end == b && span[n - 1].full == full) {
      span[n - 1].end = e;
      return;
    }
    span[n++] = KeySpan{b, e, full};
  }
  // Whether some span meets the key rows [b, e).
  KSA_HD bool meets(int64_t b, int64_t e) const {
    for (int j = 0; j < n; ++j)
      if (span[j].begin < e && b < span[j].end) return true;
    return false;
  }
  // Whether one `full` span holds all of [b, e) (every query sees every key there: no mask needed).
  KSA_HD bool full_over(int64_t b, int64_t e) const {
    for (int j = 0; j < n; ++j)
      if (span[j].full && span[j].begin <= b && e <= span[j].end) return true;
    return false;
  }
};

namespace detail {
// Keys of the text queries [t0, t1) (0 <= t0 < t1 <= T).
KSA_HD KeySpans text_query_spans(const Layout& lay, int64_t W, int64_t t0, int64_t t1) {
  KeySpans out;
  const int64_t T = lay.T, chunk_size = lay.chunk_size, S = lay.S;
  const int64_t qc0 = t0 / chunk_size, qc1 = (t1 - 1) / chunk_size;
  const int64_t c0 = qc0 - W > 0 ? qc0 - W : 0, c1 = qc1 - W > 0 ? qc1 - W : 0;
  // Text: key u is visible to query t iff u <= t and u/k >= t/k - W. All queries see [(qc1-W)k, t0].
  const int64_t lo = c0 * chunk_size, flo = c1 * chunk_size, fhi = t0 + 1;
  if (flo < fhi) {
    out.add(lo, flo, false);
    out.add(flo, fhi, true);
    out.add(fhi, t1, false);
  } else {
    out.add(lo, t1, false);
  }
  // Old summaries: chunks c < qc - W. Every query sees chunks < qc0 - W; the later ones see up to qc1 - W.
  out.add(T, T + c0 * S, true);
  out.add(T + c0 * S, T + c1 * S, false);
  return out;
}
// Keys of the summary queries with summary indices [s0, s1) (gathered T + s).
KSA_HD KeySpans summary_query_spans(const Layout& lay, int64_t s0, int64_t s1) {
  KeySpans out;
  const int64_t c0 = s0 / lay.S, c1 = (s1 - 1) / lay.S;
  out.add(c0 * lay.chunk_size, c1 * lay.chunk_size + lay.chunk_text_len(c1), c0 == c1);  // the chunks' text
  out.add(lay.T + c0 * lay.S, lay.T + s1, false);                                        // their summaries, causal
  return out;
}
}  // namespace detail

// The keys (gathered order) visible to the queries with gathered indices [q_begin, q_end): exactly the
// union of visible keys, sorted, disjoint. Kernels iterate only these (see KeyTileCursor).
KSA_HD KeySpans key_spans(const Layout& lay, int64_t W, int64_t q_begin, int64_t q_end) {
  const int64_t T = lay.T;
  const int64_t t0 = q_begin, t1 = q_end < T ? q_end : T;              // text queries [t0, t1)
  const int64_t s0 = (q_begin > T ? q_begin : T) - T, s1 = q_end - T;  // summary queries [s0, s1)
  const bool has_text = t0<t1, has_sum = s1> s0;
  if (!has_sum) return has_text ? detail::text_query_spans(lay, W, t0, t1) : KeySpans{};
  if (!has_text) return detail::summary_query_spans(lay, s0, s1);
  // A range straddling the text/summary boundary: the union of both parts, all masked.
  const KeySpans a = detail::text_query_spans(lay, W, t0, t1), b = detail::summary_query_spans(lay, s0, s1);
  KeySpans out;
  int i = 0, j = 0;
  int64_t cb = -1, ce = -1;
  while (i < a.n || j < b.n) {
    KeySpan x;
    if (j >= b.n || (i < a.n && a.span[i].begin <= b.span[j].begin)) x = a.span[i++];
    else x = b.span[j++];
    if (cb < 0) {
      cb = x.begin;
      ce = x.end;
    } else if (x.begin <= ce) {
      ce = x.end > ce ? x.end : ce;
    } else {
      out.add(cb, ce, false);
      cb = x.begin;
      ce = x.end;
    }
  }
  if (cb >= 0) out.add(cb, ce, false);
  return out;
}

// Walks the key tiles that hold a visible key of the spans, in ascending order. Tiles are BK rows, aligned
// on a BK grid within the text rows [0, T) and within the summary rows [T, L) (so a tile never mixes the
// two), clipped to the region. `masked` is false only when the whole tile lies inside one `full` span, so
// the kernel may skip the per-element rule. Kernels that prefetch the next tile use the cursor directly.
struct KeyTileCursor {
  KeySpans sp;
  int64_t T = 0, L = 0, BK = 1;
  int i = 0, region = 0;
  int64_t b = -1, last = -1;

  KSA_HD KeyTileCursor(const Layout& lay, const KeySpans& spans, int64_t bk)
      : sp(spans), T(lay.T), L(lay.length()), BK(bk) {}

  KSA_HD bool next(int64_t& tb, int64_t& te, bool& masked) {
    while (i < sp.n) {
      const int64_t base = region == 0 ? 0 : T, rend = region == 0 ? T : L;  // a span may cross T
      const int64_t sb = sp.span[i].begin > base ? sp.span[i].begin : base;
      const int64_t se = sp.span[i].end < rend ? sp.span[i].end : rend;
      if (sb < se) {
        if (b < 0) b = base + ((sb - base) / BK) * BK;
        while (b < se && b <= last) b += BK;
        if (b < se) {
          tb = b;
          te = b + BK < rend ? b + BK : rend;
          masked = !sp.full_over(tb, te);
          last = b;
          b += BK;
          return true;
        }
      }
      b = -1;
      if (++region == 2) {
        region = 0;
        ++i;
      }
    }
    return false;
  }
};

// The grid KeyTileCursor walks, as numbered tiles: index i < ntext is the text tile [i·BK, ...), the others the
// summary tiles from T on; each clipped to its region. The inverse of the walk (which query tiles see a key
// tile, as the backward needs) is then: the cursor over a query tile's spans yields tile i iff
// spans.meets(begin(i), end(i)), unmasked iff spans.full_over(begin(i), end(i)).
struct KeyTileGrid {
  int64_t T = 0, L = 0, BK = 1, ntext = 0, count = 0;
  KeyTileGrid() = default;
  KSA_HD KeyTileGrid(const Layout& lay, int64_t bk)
      : T(lay.T), L(lay.length()), BK(bk), ntext((lay.T + bk - 1) / bk), count(ntext + (L - T + bk - 1) / bk) {}
  // Index of the tile that begins at key row tile_begin (a tile start of the grid).
  KSA_HD int64_t index_of(int64_t tile_begin) const {
    return tile_begin < T ? tile_begin / BK : ntext + (tile_begin - T) / BK;
  }
  KSA_HD int64_t begin(int64_t i) const { return i < ntext ? i * BK : T + (i - ntext) * BK; }
  KSA_HD int64_t end(int64_t i) const {
    const int64_t b = begin(i), r = i < ntext ? T : L;
    return b + BK < r ? b + BK : r;
  }
  KSA_HD void rows(int64_t i, int64_t& b, int64_t& e) const {
    b = begin(i);
    e = end(i);
  }
};

// Calls f(begin, end, masked) for every tile of KeyTileCursor, in ascending order.
template <class F>
KSA_HD void for_each_key_tile(const Layout& lay, const KeySpans& sp, int64_t BK, F&& f) {
  KeyTileCursor c(lay, sp, BK);
  int64_t b, e;
  bool masked;
  while (c.next(b, e, masked)) f(b, e, masked);
}

// Number of (query, key) pairs per head that the rule makes visible (FLOPs: 4*D*pairs*Hq forward).
int64_t count_visible_pairs(const Layout& lay, int64_t W);
// Pairs of plain causal attention over the T text tokens, for comparison.
inline int64_t count_causal_pairs(int64_t T) { return T * (T + 1) / 2; }

// K/V rows a decode step at the end of a T-token text must keep for one layer and head (docs/ksa.md: The compressed
// cache): the current incomplete chunk, the last W complete chunks' text, and every summary.
struct CacheRows {
  int64_t text = 0, summaries = 0;
  int64_t total() const { return text + summaries; }
};
CacheRows cache_rows(const Spec& spec, int64_t T, bool store_summaries = true);

// The stream built from text token ids (docs/ksa.md: The stream): ids with summary ids inserted, RoPE positions, and a
// summary flag per stream position.
struct Stream {
  Layout layout;
  std::vector<int32_t> ids;
  std::vector<int64_t> positions;
  std::vector<uint8_t> is_summary;
};
Stream build_stream(const Spec& spec, std::span<const int32_t> text_ids);

}  // namespace ksa
