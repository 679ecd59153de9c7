// The geometry of a stream that keeps growing (docs/ksa.md: The stream, The compressed cache): the value a decoder, the
// KV cache, the decode kernels and the engine pass around instead of loose (chunk size, S, W) integers. A decoder's
// stream has no fixed length and never summarises a partial chunk (summarize_tail off): after every chunk_size text
// tokens come the chunk's S summary tokens. Everything here derives from the core's Layout and key_spans (spec.hpp), so
// the rule is not re-derived; tests/core/stream_geometry_test.cpp checks each function against the fixed-length Layout
// and ksa::visible. Header-inline and usable in CUDA code (KSA_HD).
#pragma once
#include <cstdint>

#include "ksa/spec.hpp"

namespace ksa {

// Text and summary tokens among the first positions of a stream.
struct StreamCounts {
  int64_t T = 0, sums = 0;
  KSA_HD int64_t length() const { return T + sums; }
};

// The keys one stream token sees, as cache rows: ranges of text rows (text indices) and of summary rows
// (chunk·S + j), in ascending order of the gathered order (text rows first).
struct DecodeKeys {
  bool is_summary = false;
  int64_t row = 0;  // the token's own row: its text index, or its summary row chunk·S + j
  struct Range {
    bool summary = false;
    int64_t begin = 0, end = 0;
  };
  Range range[2 * KeySpans::kMax];
  int n = 0;
};

struct StreamGeometry {
  int64_t chunk_size = 1;  // text tokens per chunk (HF summary_chunk_size)
  int64_t S = 1;           // summary tokens after each chunk
  int64_t W = 0;           // window: earlier chunks a text token sees as text (per layer)

  StreamGeometry() = default;
  KSA_HD StreamGeometry(int64_t chunk, int64_t s, int64_t w) : chunk_size(chunk), S(s), W(w) {}
  static StreamGeometry of(const Spec& s) { return StreamGeometry(s.chunk_size, s.S, s.W); }

  KSA_HD int64_t period() const { return chunk_size + S; }  // stream positions per chunk
  // The fixed-length stream of the first T text tokens (and the summaries of its full chunks).
  KSA_HD Layout layout(int64_t T) const { return Layout(chunk_size, S, T, false); }

  // The token at stream position pos (a growing stream's chunk is full once its summaries come).
  KSA_HD StreamToken token(int64_t pos) const {
    StreamToken t;
    t.chunk = pos / period();
    const int64_t off = pos - t.chunk * period();
    t.is_summary = off >= chunk_size;
    t.index = t.is_summary ? off - chunk_size : off;
    return t;
  }
  // Cache row of a token: its text index, or its summary row chunk·S + j.
  KSA_HD int64_t row_of(const StreamToken& t) const {
    return t.is_summary ? t.chunk * S + t.index : t.chunk * chunk_size + t.index;
  }
  KSA_HD int64_t text_position(int64_t t) const { return layout(0).text_to_stream(t); }
  KSA_HD int64_t summary_position(int64_t c, int64_t j) const { return c * period() + chunk_size + j; }

  // Text and summary tokens in the first `pos` stream positions.
  KSA_HD StreamCounts counts(int64_t pos) const {
    const int64_t c = pos / period(), off = pos - c * period();
    StreamCounts r;
    r.T = c * chunk_size + (off < chunk_size ? off : chunk_size);
    r.sums = pos - r.T;
    return r;
  }
  // The stream counts once T text tokens have run with every summary they owe (a model's sequence).
  KSA_HD StreamCounts counts_after_text(int64_t T) const { return StreamCounts{T, (T / chunk_size) * S}; }
  // Summary tokens due before the next text token (0..S).
  KSA_HD int64_t pending_summaries(StreamCounts n) const { return (n.T / chunk_size) * S - n.sums; }

  // First text row that a later token of a stream holding `n` can still see (docs/ksa.md: Who sees whom): the next text
  // token (chunk T/chunk_size) sees the chunks >= T/chunk_size - W as text; while the chunk just completed
  // still owes summary tokens, they see that chunk's text. Never decreases as the stream grows.
  KSA_HD int64_t live_text_begin(StreamCounts n) const {
    const int64_t c = n.T / chunk_size;
    int64_t lo = c > W ? (c - W) * chunk_size : 0;
    if (pending_summaries(n) > 0 && (c - 1) * chunk_size < lo) lo = (c - 1) * chunk_size;
    return lo;
  }

  // The keys the token at stream position pos sees, as cache rows: the core's key_spans on the layout of
  // the stream up to that token, mapped to text and summary rows.
  KSA_HD DecodeKeys decode_keys(int64_t pos) const {
    DecodeKeys d;
    const StreamToken tok = token(pos);
    d.is_summary = tok.is_summary;
    d.row = row_of(tok);
    // A text token t: the stream up to it has t + 1 text tokens; a summary of chunk c: c + 1 full chunks.
    const Layout lay = layout(tok.is_summary ? (tok.chunk + 1) * chunk_size : d.row + 1);
    const int64_t T = lay.T, g = tok.is_summary ? T + d.row : d.row;
    const KeySpans sp = key_spans(lay, W, g, g + 1);
    for (int i = 0; i < sp.n; ++i) {
      const int64_t b = sp.span[i].begin, e = sp.span[i].end;
      if (b < T) d.range[d.n++] = {false, b, e < T ? e : T};
      if (e > T) d.range[d.n++] = {true, (b > T ? b : T) - T, e - T};
    }
    return d;
  }
};

}  // namespace ksa
