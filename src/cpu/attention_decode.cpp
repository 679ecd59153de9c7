// CPU decode through the compressed cache (include/ksa/decode.hpp).
//
// Work items are (sequence, KV head), claimed one at a time by the pool (cpu/thread_pool.hpp). An item walks its
// sequence's new stream tokens in order; for each: write the token's K/V rows (this KV head) into the cache rows the
// plan made room for, then attend for the G query heads of the group. Going in stream order is what makes a step that
// crosses chunk boundaries correct: a ring block is reused only once no later query sees its rows. The visible keys are
// the core's key_spans (StreamGeometry::decode_keys, ksa/stream_geometry.hpp) mapped to cache rows; each run of rows
// inside one block is contiguous [n, D] for a head. Each K and V row is loaded (and converted from bf16) once and used
// by all G query heads. The text keys (window and current chunk) and the summary keys accumulate into separate
// OnlineSoftmax partials that are merged at the end (the split a GPU kernel makes across blocks).
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/dense_kernels.hpp"
#include "cpu/thread_pool.hpp"
#include "cpu/tile_kernels.hpp"
#include "ksa/decode.hpp"
#include "ksa/softmax.hpp"

namespace ksa::cpu {
namespace {

// D elements (a row, or a run of rows) as fp32: f32 rows are used in place, bf16 rows converted into buf.
const float* row_f32(DType t, const void* p, int64_t D, float* buf) {
  if (t == DType::f32) return static_cast<const float*>(p);
  detail::widen_bf16_row(static_cast<const uint16_t*>(p), D, buf);
  return buf;
}

// One group's softmax partial: G states and G accumulators [G, D].
struct Partial {
  std::vector<OnlineSoftmax> st;
  std::vector<float> acc;
  void reset(int64_t G, int64_t D) {
    st.assign(size_t(G), OnlineSoftmax{});
    acc.assign(size_t(G * D), 0.f);
  }
};

struct Worker {
  const DecodeParams& p;
  const detail::TileKernels& tk;  // the SIMD target's row primitives (group_scores, axpy)
  int64_t G, D, P;
  float scale;
  std::vector<float> q, s, kbuf, vbuf;  // q [G, D] (scaled), scores [G, P], a run's keys and values as fp32
  Partial text, summ;

  explicit Worker(const DecodeParams& pp)
      : p(pp),
        tk(detail::tile_kernels()),
        G(pp.G()),
        D(pp.pool.D),
        P(pp.pool.block_rows),
        scale(pp.softmax_scale()),
        q(size_t(G * D)),
        s(size_t(G * P)),
        kbuf(size_t(P * D)),
        vbuf(size_t(P * D)) {}

  // Adds n visible keys, rows [r, r+n) of block `blk` for KV head hk, to partial `pa`.
  void add_run(Partial& pa, int32_t blk, int64_t hk, int64_t r, int64_t n) {
    const KvPoolView& pool = p.pool;
    // The run's keys and values, widened once for all G heads.
    const float* kr = row_f32(pool.dtype, pool.row(blk, 0, hk, r), n * D, kbuf.data());
    const float* vr = row_f32(pool.dtype, pool.row(blk, 1, hk, r), n * D, vbuf.data());
    tk.group_scores(q.data(), G, kr, n, D, s.data(), P);
    for (int64_t g = 0; g < G; ++g) {
      const float* sg = &s[size_t(g * P)];
      const float a = pa.st[size_t(g)].raise_max(*std::max_element(sg, sg + n));
      if (a != 1.f) {
        float* acc = &pa.acc[size_t(g * D)];
        for (int64_t d = 0; d < D; ++d) acc[d] *= a;
      }
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t g = 0; g < G; ++g)
        tk.axpy(pa.st[size_t(g)].add(s[size_t(g * P + i)]), vr + i * D, &pa.acc[size_t(g * D)], D);
  }

  // Adds cache rows [b, e) (text or summary rows) in runs that stay inside one block.
  void add_range(Partial& pa, const SeqKvView& kv, bool summary, int64_t b, int64_t e, int64_t hk) {
    while (b < e) {
      const KvRowRef ref = summary ? kv.summary_row(p.pool, p.geo.S, b) : kv.text_row(p.pool, b);
      const int64_t n = std::min(e - b, P - ref.row);
      add_run(pa, ref.block, hk, ref.row, n);
      b += n;
    }
  }

  void run(int64_t b, int64_t hk) {
    const DecodeSeq& sq = p.seqs[b];
    const DecodeIO& io = p.io;
    const KvPoolView& pool = p.pool;
    const int64_t es = pool.elem_bytes(), pos0 = sq.kv.T + sq.kv.sums;
    for (int64_t i = 0; i < sq.n; ++i) {
      const int64_t row = sq.row0 + i;
      const DecodeKeys keys = p.geo.decode_keys(pos0 + i);
      // 1. The token's own K/V, written before any query reads it (it sees itself).
      const KvRowRef dst =
          keys.is_summary ? sq.kv.summary_row(pool, p.geo.S, keys.row) : sq.kv.text_row(pool, keys.row);
      std::memcpy(pool.row(dst.block, 0, hk, dst.row),
                  static_cast<const char*>(io.k.data) + (row * io.k.row_stride + hk * io.k.head_stride) * es,
                  size_t(D * es));
      std::memcpy(pool.row(dst.block, 1, hk, dst.row),
                  static_cast<const char*>(io.v.data) + (row * io.v.row_stride + hk * io.v.head_stride) * es,
                  size_t(D * es));
      // 2. The group's queries, scale folded in.
      for (int64_t g = 0; g < G; ++g) {
        const int64_t off = row * io.q.row_stride + (hk * G + g) * io.q.head_stride;
        for (int64_t d = 0; d < D; ++d) q[size_t(g * D + d)] = load_as_float(io.dtype, io.q.data, off + d) * scale;
      }
      text.reset(G, D);
      summ.reset(G, D);
      for (int r = 0; r < keys.n; ++r)
        add_range(keys.range[r].summary ? summ : text, sq.kv, keys.range[r].summary, keys.range[r].begin,
                  keys.range[r].end, hk);
      // 3. Join the partials; write out and lse.
      for (int64_t g = 0; g < G; ++g) {
        OnlineSoftmax& st = text.st[size_t(g)];
        float* acc = &text.acc[size_t(g * D)];
        merge_partial(st, acc, summ.st[size_t(g)], &summ.acc[size_t(g * D)], int(D));
        const float inv = st.inv_sum();
        const int64_t h = hk * G + g, off = row * io.out.row_stride + h * io.out.head_stride;
        for (int64_t d = 0; d < D; ++d) store_from_float(io.dtype, io.out.data, off + d, acc[d] * inv);
        if (io.lse) io.lse[row * io.Hq + h] = st.lse();
      }
    }
  }
};

}  // namespace

void attention_decode(const DecodeParams& p) {
  validate(p);
  const int64_t Hkv = p.pool.Hkv, items = p.B * Hkv;
  if (items == 0) return;
  const int threads = detail::resolve_threads(p.io.num_threads);
  detail::PerWorker<Worker> workers(threads);
  detail::parallel_for(threads, items, 1, [&](int64_t it, int w) { workers.get(w, p).run(it / Hkv, it % Hkv); });
}

}  // namespace ksa::cpu
