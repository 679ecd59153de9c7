// Decoding through the compressed cache (docs/ksa.md: The compressed cache): a batch of sequences, each with n >= 0 new
// stream tokens (one text token; at a chunk boundary the chunk's k-th text token followed by its S summary tokens; or
// many tokens at once for chunked prefill, crossing chunk boundaries anywhere). Each new token's K/V is written into
// the cache and its query attends to exactly the keys the core rule (ksa::visible) shows it.
#pragma once
#include <cmath>
#include <cstdint>
#include <span>

#include "ksa/attention.hpp"
#include "ksa/cache.hpp"
#include "ksa/error.hpp"

namespace ksa {

// The new tokens' tensors: packed rows [R, H, D] (R = sum of n over the batch, sequence after sequence),
// row r of a view at data + r*row_stride + h*head_stride (batch_stride unused), in the cache's dtype.
struct DecodeIO {
  int64_t Hq = 1;
  DType dtype = DType::f32;  // q, k, v, out; must equal the cache's storage dtype
  TensorView q, k, v, out;   // q, out [R, Hq, D]; k, v [R, Hkv, D]
  float* lse = nullptr;      // [R, Hq] (natural log of the scaled scores), may be null
  float scale = 0.f;         // 0 = 1/sqrt(D)
  int num_threads = 0;       // 0 = all available
};

// Parameters of the decode kernel (docs/design.md: parameters): a plan's plain data plus the tensors.
struct DecodeParams {
  StreamGeometry geo;
  KvPoolView pool;
  const DecodeSeq* seqs = nullptr;
  int64_t B = 0;
  DecodeIO io;

  int64_t G() const { return io.Hq / pool.Hkv; }
  float softmax_scale() const { return io.scale != 0.f ? io.scale : 1.f / std::sqrt(float(pool.D)); }
};

inline DecodeParams make_decode_params(const DecodePlan& plan, const DecodeIO& io) {
  DecodeParams p;
  p.geo = plan.geo;
  p.pool = plan.pool;
  p.seqs = plan.seqs.data();
  p.B = int64_t(plan.seqs.size());
  p.io = io;
  return p;
}

// Throws ksa::Error naming the bad field and value.
inline void validate(const DecodeParams& p) {
  const KvPoolView& c = p.pool;
  const DecodeIO& io = p.io;
  if (io.Hq < 1 || io.Hq % c.Hkv != 0)
    fail("decode: Hq must be a positive multiple of the cache's Hkv=", c.Hkv, " (got ", io.Hq, ")");
  if (io.dtype != c.dtype)
    fail("decode: dtype ", dtype_name(io.dtype), " does not match the cache's storage dtype ", dtype_name(c.dtype));
  if (!(io.scale >= 0.f) || !std::isfinite(io.scale))
    fail("decode: scale must be finite and >= 0 (got ", io.scale, ")");
  if (p.B > 0 && !p.seqs) fail("decode: seqs is null with B=", p.B);
  int64_t rows = 0;
  for (int64_t b = 0; b < p.B; ++b) rows += p.seqs[b].n;
  if (rows == 0) return;
  auto check = [&](const TensorView& t, const char* name, int64_t H) {
    if (!t.data) fail("decode: ", name, ": data pointer is null");
    if (H > 1 && t.head_stride < c.D)
      fail("decode: ", name, ".head_stride must be >= D=", c.D, " (got ", t.head_stride, ")");
    if (rows > 1 && t.row_stride < (H - 1) * t.head_stride + c.D)
      fail("decode: ", name, ".row_stride must be >= (H-1)*head_stride + D = ", (H - 1) * t.head_stride + c.D, " (got ",
           t.row_stride, ")");
  };
  check(io.q, "q", io.Hq);
  check(io.k, "k", c.Hkv);
  check(io.v, "v", c.Hkv);
  check(io.out, "out", io.Hq);
}

}  // namespace ksa

namespace ksa::cpu {

// The kernel: for each (sequence, KV head), on the CPU worker pool, the sequence's new tokens in stream order:
// write the token's K/V rows into its cache rows, then for the G query heads of the group attend to the
// visible cached rows (key_spans of the core), text and summary partials joined with OnlineSoftmax.
void attention_decode(const DecodeParams& p);

// Plan, run, commit on `cache`: writes the new tokens' K/V and attends. n_new[i] stream tokens of sequence
// ids[i] (ids distinct) occupy the next n_new[i] packed rows of io. On error nothing is changed.
inline void attention_decode(KvCache& cache, std::span<const SeqId> ids, std::span<const int64_t> n_new,
                             const DecodeIO& io) {
  const DecodePlan plan = cache.plan_decode(ids, n_new);
  const DecodeParams p = make_decode_params(plan, io);
  try {
    validate(p);  // everything the kernel could reject, before it writes anything
  } catch (...) {
    cache.cancel_decode(plan);
    throw;
  }
  attention_decode(p);
  cache.commit_decode(plan);
}

}  // namespace ksa::cpu
