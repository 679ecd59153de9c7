#include "ksa/attention.hpp"
#include "ksa/error.hpp"

namespace ksa {
namespace {

void check_view(const TensorView& t, const char* name, int64_t H, int64_t D, bool required = true) {
  if (!t.data) {
    if (required) fail(name, ": data pointer is null");
    return;
  }
  // Rows must not overlap heads: the D elements of each head are contiguous and heads fit in a row.
  if (t.head_stride < D && H > 1) fail(name, ".head_stride: must be >= D=", D, " (got ", t.head_stride, ")");
  if (t.row_stride < (H - 1) * t.head_stride + D)
    fail(name, ".row_stride: must be >= (H-1)*head_stride + D = ", (H - 1) * t.head_stride + D, " (got ", t.row_stride,
         ")");
  if (t.batch_stride < 0) fail(name, ".batch_stride: must be >= 0 (got ", t.batch_stride, ")");
}

}  // namespace

void validate(const AttentionParams& p) {
  const Layout& l = p.layout;
  require(l.chunk_size >= 1 && l.chunk_size <= Spec::kMaxChunk, "layout.chunk_size", "in [1, 1048576]", l.chunk_size);
  require(l.S >= 1 && l.S <= Spec::kMaxSummaries, "layout.S", "in [1, 65536]", l.S);
  require(l.T >= 0, "layout.T", ">= 0", l.T);
  require(p.W >= 0, "W", ">= 0", p.W);
  require(p.B >= 1, "B", ">= 1", p.B);
  require(p.D >= 1 && p.D <= 1024, "D", "in [1, 1024]", p.D);
  require(p.Hkv >= 1, "Hkv", ">= 1", p.Hkv);
  if (p.Hq < 1 || p.Hq % p.Hkv != 0) fail("Hq: must be a positive multiple of Hkv=", p.Hkv, " (got ", p.Hq, ")");
  if (!(p.scale >= 0.f) || !std::isfinite(p.scale))
    fail("scale: must be finite and >= 0 (0 = 1/sqrt(D)) (got ", p.scale, ")");
  if (p.packed()) {
    if (p.B != 1) fail("B: must be 1 with packed sequences (cu_seqlens) (got ", p.B, ")");
    require(p.num_seqs >= 1, "num_seqs", ">= 1 with cu_seqlens", p.num_seqs);
    if (p.cu_seqlens[0] != 0) fail("cu_seqlens[0]: must be 0 (got ", p.cu_seqlens[0], ")");
    for (int64_t s = 0; s < p.num_seqs; ++s) {
      const int64_t n = p.cu_seqlens[s + 1] - p.cu_seqlens[s];
      if (n < 0)
        fail("cu_seqlens: must be non-decreasing (cu_seqlens[", s + 1, "] = ", p.cu_seqlens[s + 1], " < cu_seqlens[", s,
             "] = ", p.cu_seqlens[s], ")");
      if (text_length_of_stream(l.chunk_size, l.S, n, l.summarize_tail) < 0)
        fail("cu_seqlens: sequence ", s, " has ", n, " rows, not the length of a KSA stream with k=", l.chunk_size, ", S=", l.S,
             ", summarize_tail=", l.summarize_tail);
    }
  } else if (p.num_seqs != 0) {
    fail("num_seqs: must be 0 without cu_seqlens (got ", p.num_seqs, ")");
  }
  if (p.q_begin != 0) {
    if (p.packed()) fail("q_begin: must be 0 with packed sequences (cu_seqlens) (got ", p.q_begin, ")");
    if (p.q_begin < 0 || p.q_begin > p.L()) fail("q_begin: must be in [0, L=", p.L(), "] (got ", p.q_begin, ")");
  }
  if (p.L() == 0) return;  // nothing to read or write
  check_view(p.q, "q", p.Hq, p.D);
  check_view(p.k, "k", p.Hkv, p.D);
  check_view(p.v, "v", p.Hkv, p.D);
  check_view(p.out, "out", p.Hq, p.D);
}

void validate(const AttentionBackwardParams& p) {
  validate(static_cast<const AttentionParams&>(p));
  if (p.L() == 0) return;
  if (!p.lse) fail("lse: the forward's log-sum-exp is required for the backward (got null)");
  check_view(p.dout, "dout", p.Hq, p.D);
  check_view(p.dq, "dq", p.Hq, p.D);
  check_view(p.dk, "dk", p.Hkv, p.D);
  check_view(p.dv, "dv", p.Hkv, p.D);
}

namespace {

TensorView shifted(const TensorView& t, int64_t rows, DType dt) {
  TensorView o = t;
  if (o.data) o.data = static_cast<char*>(o.data) + rows * t.row_stride * dtype_size(dt);
  return o;
}

}  // namespace

AttentionParams sequence_params(const AttentionParams& p, int64_t s) {
  if (s < 0 || s >= p.sequences()) fail("sequence: must be in [0, ", p.sequences(), ") (got ", s, ")");
  const SequenceRows r = p.sequence(s);
  AttentionParams o = p;
  o.layout = r.layout;
  o.cu_seqlens = nullptr;
  o.num_seqs = 0;
  o.q = shifted(p.q, r.row0, p.dtype);
  o.k = shifted(p.k, r.row0, p.dtype);
  o.v = shifted(p.v, r.row0, p.dtype);
  o.out = shifted(p.out, r.row0, p.dtype);
  if (p.lse) o.lse = p.lse + r.row0 * p.Hq;  // [1, L, Hq]: the stream's rows are contiguous
  return o;
}

AttentionBackwardParams sequence_params(const AttentionBackwardParams& p, int64_t s) {
  AttentionBackwardParams o = p;
  static_cast<AttentionParams&>(o) = sequence_params(static_cast<const AttentionParams&>(p), s);
  const int64_t r0 = p.sequence(s).row0;
  o.dout = shifted(p.dout, r0, p.dtype);
  o.dq = shifted(p.dq, r0, p.dtype);
  o.dk = shifted(p.dk, r0, p.dtype);
  o.dv = shifted(p.dv, r0, p.dtype);
  return o;
}

}  // namespace ksa
