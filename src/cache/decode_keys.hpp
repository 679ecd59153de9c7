// The keys a new stream token sees, as cache rows: ranges of text rows (text indices) and of summary rows
// (chunk·S + j). Derived from the core's key_spans on the layout of the stream up to the token, so the rule
// is not re-derived here (tests/cache checks the result against ksa::visible for every position).
#pragma once
#include <cstdint>

#include "ksa/spec.hpp"

namespace ksa::detail {

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

// Stream position pos of a stream with chunks of k text and S summary tokens (summarize_tail off).
inline DecodeKeys decode_keys(int64_t k, int64_t S, int64_t W, int64_t pos) {
  DecodeKeys d;
  const int64_t c = pos / (k + S), off = pos - c * (k + S);
  Layout lay;
  int64_t g;
  if (off < k) {  // text token t: the stream up to it has T = t + 1 text tokens
    d.row = c * k + off;
    lay = Layout(k, S, d.row + 1);
    g = d.row;
  } else {  // summary j of chunk c: the stream up to it has c + 1 full chunks
    d.is_summary = true;
    d.row = c * S + (off - k);
    lay = Layout(k, S, (c + 1) * k);
    g = lay.T + d.row;
  }
  const KeySpans sp = key_spans(lay, W, g, g + 1);
  const int64_t T = lay.T;
  for (int i = 0; i < sp.n; ++i) {
    const int64_t b = sp.span[i].begin, e = sp.span[i].end;
    if (b < T) d.range[d.n++] = {false, b, e < T ? e : T};
    if (e > T) d.range[d.n++] = {true, (b > T ? b : T) - T, e - T};
  }
  return d;
}

}  // namespace ksa::detail
