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
    fail(name, ".row_stride: must be >= (H-1)*head_stride + D = ", (H - 1) * t.head_stride + D, " (got ", t.row_stride, ")");
  if (t.batch_stride < 0) fail(name, ".batch_stride: must be >= 0 (got ", t.batch_stride, ")");
}

}  // namespace

void validate(const AttentionParams& p) {
  const Layout& l = p.layout;
  require(l.k >= 1 && l.k <= Spec::kMaxChunk, "layout.k", "in [1, 1048576]", l.k);
  require(l.S >= 1 && l.S <= Spec::kMaxSummaries, "layout.S", "in [1, 65536]", l.S);
  require(l.T >= 0, "layout.T", ">= 0", l.T);
  require(p.W >= 0, "W", ">= 0", p.W);
  require(p.B >= 1, "B", ">= 1", p.B);
  require(p.D >= 1 && p.D <= 1024, "D", "in [1, 1024]", p.D);
  require(p.Hkv >= 1, "Hkv", ">= 1", p.Hkv);
  if (p.Hq < 1 || p.Hq % p.Hkv != 0) fail("Hq: must be a positive multiple of Hkv=", p.Hkv, " (got ", p.Hq, ")");
  if (!(p.scale >= 0.f) || !std::isfinite(p.scale)) fail("scale: must be finite and >= 0 (0 = 1/sqrt(D)) (got ", p.scale, ")");
  if (l.T == 0) return;  // nothing to read or write
  check_view(p.q, "q", p.Hq, p.D);
  check_view(p.k, "k", p.Hkv, p.D);
  check_view(p.v, "v", p.Hkv, p.D);
  check_view(p.out, "out", p.Hq, p.D);
}

void validate(const AttentionBackwardParams& p) {
  validate(static_cast<const AttentionParams&>(p));
  if (p.layout.T == 0) return;
  if (!p.lse) fail("lse: the forward's log-sum-exp is required for the backward (got null)");
  check_view(p.dout, "dout", p.Hq, p.D);
  check_view(p.dq, "dq", p.Hq, p.D);
  check_view(p.dk, "dk", p.Hkv, p.D);
  check_view(p.dv, "dv", p.Hkv, p.D);
}

}  // namespace ksa
