#include "ksa/spec.hpp"

#include "ksa/enum_name.hpp"
#include "ksa/error.hpp"

namespace ksa {

const char* to_string(TextPositions m) { return m == TextPositions::origin ? "origin" : "inner_chunk"; }
const char* to_string(SummaryPositions m) {
  return enum_name(m, {"zeros", "last_chunk_slice_left", "last_chunk_slice_right"});
}

TextPositions parse_text_positions(const std::string& s, const char* field) {
  if (s == "origin") return TextPositions::origin;
  if (s == "inner_chunk") return TextPositions::inner_chunk;
  fail(field, ": must be \"origin\" or \"inner_chunk\" (got \"", s, "\")");
}

SummaryPositions parse_summary_positions(const std::string& s, const char* field) {
  if (s == "zeros") return SummaryPositions::zeros;
  if (s == "last_chunk_slice_left") return SummaryPositions::last_chunk_slice_left;
  if (s == "last_chunk_slice_right") return SummaryPositions::last_chunk_slice_right;
  fail(field, ": must be \"zeros\", \"last_chunk_slice_left\" or \"last_chunk_slice_right\" (got \"", s, "\")");
}

void Spec::validate() const {
  require(chunk_size >= 1 && chunk_size <= kMaxChunk, "chunk_size (summary_chunk_size)", "in [1, 1048576]", chunk_size);
  require(S >= 1 && S <= kMaxSummaries, "S (summary_token_num)", "in [1, 65536]", S);
  require(W >= 0 && W <= kMaxWindow, "W (summary_sliding_chunk_num)", "in [0, 2^40]", W);
  // Ids begin..begin+S-1 must be int32; S is in range here, so the bound is computed without overflow.
  require(summary_token_begin >= 0 && summary_token_begin <= (int64_t(1) << 31) - S, "summary_token_begin",
          "a token id with room for S summary ids", summary_token_begin);
}

int64_t count_visible_pairs(const Layout& lay, int64_t W) {
  const int64_t chunk_size = lay.chunk_size, S = lay.S;
  int64_t pairs = 0;
  for (int64_t c = 0; c < lay.num_chunks(); ++c) {
    const int64_t n = lay.chunk_text_len(c);
    const int64_t window = (c < W ? c : W);   // earlier chunks seen as text (all full)
    const int64_t old = (c > W ? c - W : 0);  // earlier chunks seen as summaries
    pairs += n * (n + 1) / 2 + n * (window * chunk_size + old * S);
    if (c < lay.summarized_chunks()) pairs += S * n + S * (S + 1) / 2;
  }
  return pairs;
}

CacheRows cache_rows(const Spec& spec, int64_t T, bool store_summaries) {
  const Layout lay = Layout::of(spec, T);
  const int64_t full = lay.full_chunks();
  CacheRows r;
  r.text = (full < spec.W ? full : spec.W) * spec.chunk_size + lay.tail_len();
  r.summaries = store_summaries ? full * spec.S : 0;
  return r;
}

Stream build_stream(const Spec& spec, std::span<const int32_t> text_ids) {
  spec.validate();
  Stream s;
  s.layout = Layout::of(spec, int64_t(text_ids.size()));
  const int64_t L = s.layout.length();
  s.ids.resize(size_t(L));
  s.positions.resize(size_t(L));
  s.is_summary.resize(size_t(L));
  for (int64_t p = 0; p < L; ++p) {
    const StreamToken t = s.layout.token(p);
    s.is_summary[size_t(p)] = t.is_summary;
    s.ids[size_t(p)] =
        t.is_summary ? int32_t(spec.summary_token_begin + t.index) : text_ids[size_t(t.chunk * spec.chunk_size + t.index)];
    s.positions[size_t(p)] = rope_position(s.layout, spec.text_positions, spec.summary_positions, p);
  }
  return s;
}

}  // namespace ksa
