// The CUDA backward's kernel arguments and shared device pieces, for the portable passes (attention_bwd.cu)
// and the Hopper passes (attention_bwd_sm90a.cu); include only from .cu files. Filled once by
// attention_backward; kernels take it by value.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_bwd_plan.hpp"
#include "cuda/mma.cuh"
#include "cuda/varlen_plan.hpp"
#include "cuda/views.cuh"
#include "ksa/spec.hpp"

namespace ksa::cuda::detail {

using dev::kLog2e;
constexpr int kRowPad = 128;  // lse2/Delta rows are padded to a multiple of this (>= every BQ)
static_assert(kRowPad == varlen::kRowBlock, "a packed call pads each stream's rows as a plain call pads its L");

struct BwdArgs {
  Layout lay;  // packed: k, S and summarize_tail of every stream (T: see stream_args)
  Layout32 l32;
  int64_t W;
  int W32;  // W clamped to int range (any W >= #chunks behaves the same)
  int B, Hq, Hkv, G, L, Lp;
  float scale, scale_log2;
  View q, k, v, out, dout, dq, dk, dv;
  const float* lse;  // [B, L, Hq] stream order, natural log (the forward's)
  float* lse2;       // [B, Hq, Lp] gathered order, lse * log2(e); +inf past L
  float* delta;      // [B, Hq, Lp] gathered order; 0 past L
  float* dq_acc;     // [B, Hq, Lp / 64, 64 * D] gathered order in the fragment layout of dq_acc_chunk, zeroed:
                     // dQ / scale summed by the fused sm_90a dK/dV pass (bulk reduce-adds; null when the dQ
                     // pass runs instead)
  // Packed sequences (the kernels' varlen::Tables argument): lse2, Delta and dq_acc are in the padded row space
  // (Lp: each stream's rows from its p0, padded as a plain call pads its L), gathered order per stream.
};

// The arguments of one stream of a packed call, as a call on that stream alone would have them: its Layout
// and length, the tensors and lse from its first row (B = 1), and lse2, Delta and dq_acc from its first padded
// row (their stride Lp stays the call's: [1, Hq, Lp]).
template <class T, int D>
__device__ __forceinline__ BwdArgs stream_args(const BwdArgs& a, const varlen::Seq& s) {
  BwdArgs o = a;
  o.lay = Layout(a.lay.chunk_size, a.lay.S, s.l32.T, a.lay.summarize_tail);
  o.l32 = s.l32;
  o.L = s.L;
  const int64_t r0 = s.row0;
  o.q = rows_on<T>(a.q, r0), o.k = rows_on<T>(a.k, r0), o.v = rows_on<T>(a.v, r0), o.out = rows_on<T>(a.out, r0);
  o.dout = rows_on<T>(a.dout, r0), o.dq = rows_on<T>(a.dq, r0), o.dk = rows_on<T>(a.dk, r0),
  o.dv = rows_on<T>(a.dv, r0);
  o.lse = a.lse + r0 * a.Hq;
  o.lse2 = a.lse2 + s.p0;
  o.delta = a.delta + s.p0;
  if (a.dq_acc) o.dq_acc = a.dq_acc + int64_t(s.p0) * D;
  return o;
}

// The fused dQ accumulator (D = 128) holds each 64-row query tile (8192 floats) in the order the fused
// kernel's consumers produce it, so that each warp's part is one contiguous 4 KiB bulk reduce-add and its
// staging stores are conflict-free: [column half wg][warp w][8-column block j][row half hf][lane][2], where
// consumer wg holds columns [64 wg, 64 wg + 64), warp w rows [16 w, 16 w + 16), and lane (4 gid + tig) the
// columns 8 j + 2 tig, +1 of rows 16 w + gid + 8 hf. The 8 columns [8 c, 8 c + 8) of row r of the tile are
// contiguous there, from this offset (floats):
__host__ __device__ constexpr int dq_acc_chunk(int r, int c) {
  return (c / 8) * 4096 + (r / 16) * 1024 + (((c % 8) * 2 + (r % 16) / 8) * 32 + (r % 8) * 4) * 2;
}
// Every (row, 8-column chunk) of a tile gets its own 8 floats of the tile's 8192.
constexpr bool dq_acc_chunks_tile() {
  bool seen[1024] = {};
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 16; ++c) {
      const int o = dq_acc_chunk(r, c);
      if (o < 0 || o >= 8192 || o % 8 != 0 || seen[o / 8]) return false;
      seen[o / 8] = true;
    }
  return true;
}
static_assert(dq_acc_chunks_tile(), "dq_acc_chunk is a permutation of the tile's 8-float chunks");

// The dK/dV plan on the device (attention_bwd.cu builds it).
struct PlanArgs {
  KeySpans* spans;  // [nq] key spans of each dK/dV query tile
  int nq, nk, ntext, BQ, BK;
  bwd::PlanRun* runs;      // [nk * kMaxRuns]
  int* nruns;              // [nk]
  int* count;              // [nk] entries (query tiles) per key tile
  bwd::PlanItem* items;    // [max_items]
  bwd::PlanSplit* splits;  // [max_splits]
  int* counters;           // [0] items, [1] split tiles, [2] partial slots
  float *part_k, *part_v;  // [max_slots, B, Hkv, BK, D]
  int max_items, max_splits, max_slots;
  // Packed sequences (varlen::Tables): query tile qt is padded rows [qt BQ, qt BQ + BQ) (nq = Lp / BQ; a
  // stream's tiles from p0 / BQ on, in its own gathered order); key tile kt is Tables::ktiles[kt] (every
  // stream's text tiles, then every stream's summary tiles; ntext counts the former). A key tile's runs list its
  // stream's query tiles numbered from 0, as a call on the stream alone numbers them.
};

// A packed dK/dV item's CTA: its stream's args (stream_args), the plan with spans from the stream's first query
// tile and runs shifted so that runs + kt * kMaxRuns is the key tile's, and the item with kt the key tile's
// index in its stream. The dK/dV kernels then run the item as for a call on that stream alone.
struct StreamItem {
  BwdArgs a;
  PlanArgs pl;
  bwd::PlanItem item;
};
template <class T, int D>
__device__ __forceinline__ StreamItem stream_item(const BwdArgs& a, const PlanArgs& pl, const varlen::Tables& v,
                                                  bwd::PlanItem item) {
  const varlen::KeyTile kt = v.ktiles[item.kt];
  const varlen::Seq s = v.seqs[kt.seq];
  StreamItem o{stream_args<T, D>(a, s), pl, item};
  o.pl.spans = pl.spans + s.p0 / pl.BQ;
  o.pl.runs = pl.runs + int64_t(item.kt - kt.kt) * bwd::kMaxRuns;
  o.item.kt = kt.kt;
  return o;
}

// Element pointers of a View: head h of batch b (row 0), and stream row srow of it.
template <class T>
__device__ __forceinline__ const T* head_ptr(const View& v, int b, int h) {
  return static_cast<const T*>(v.p) + b * v.b + h * v.h;
}
template <class T>
__device__ __forceinline__ T* row_ptr(const View& v, int b, int64_t srow, int h) {
  return static_cast<T*>(v.p) + b * v.b + srow * v.r + h * v.h;
}

// The dK/dV passes' epilogue for one key row g (row `row` of its BKV-row tile) of a finished item: the whole
// list -> dk (times scale) and dv in the input dtype, stream order; a segment (slot >= 0) -> fp32 partials
// that reduce_kernel sums. dk, dv: this thread's accumulators in the mma C layout (element 4j + 2hf + e is
// row half hf, column 8j + 2tig + e).
template <class T, int D, int BKV>
__device__ __forceinline__ void store_dkdv_row(const BwdArgs& a, const PlanArgs& pl, int slot, int b, int hk, int row,
                                               int g, int hf, int tig, const float* dk, const float* dv) {
  if (slot < 0) {
    const int64_t srow = a.l32.stream_of_gathered(uint32_t(g));
    dev::store_acc_row<T, D>(row_ptr<T>(a.dk, b, srow, hk), dk, hf, tig, a.scale);
    dev::store_acc_row<T, D>(row_ptr<T>(a.dv, b, srow, hk), dv, hf, tig, 1.f);
  } else {
    const int64_t base = ((int64_t(slot) * a.B + b) * a.Hkv + hk) * (BKV * D) + int64_t(row) * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<float2*>(pl.part_k + base + j * 8 + 2 * tig) =
          make_float2(dk[4 * j + 2 * hf], dk[4 * j + 2 * hf + 1]);
      *reinterpret_cast<float2*>(pl.part_v + base + j * 8 + 2 * tig) =
          make_float2(dv[4 * j + 2 * hf], dv[4 * j + 2 * hf + 1]);
    }
  }
}

// The dK/dV passes' CTA order: one grid dimension, item-major (CTA i = (item · B + b) · Hkv + hk), so that
// the heaviest items of every head and batch run first (the schedule orders items heaviest first). With the
// item in grid.x and the head in grid.y, all of head 0's items came before head 1's, and the last head's
// long summary items started late and ran alone: Nsight Compute saw the SMs busy 75% of the dK/dV pass.
struct DkvCta {
  int item, b, hk;
};
__device__ __forceinline__ DkvCta dkdv_cta(int B, int Hkv) {
  const int i = int(blockIdx.x), hk = i % Hkv, ib = i / Hkv;
  return DkvCta{ib / B, ib % B, hk};
}
// The grid of dkdv_cta (fails past 2^31 - 1 CTAs).
dim3 dkdv_grid(int64_t max_items, int64_t B, int64_t Hkv);

// Walks the entries (query tiles of the key tile's runs) from e0, each for every query head of the group.
struct EntryWalk {
  const bwd::PlanRun* runs;
  int r = 0, qt = 0, h = 0, h0 = 0, h1 = 0;
  // Requires e0 < the key tile's entry count.
  __device__ EntryWalk(const bwd::PlanRun* runs_, int e0, int hbeg, int G)
      : runs(runs_), h(hbeg), h0(hbeg), h1(hbeg + G) {
    for (int e = e0;;) {
      const int len = runs[r].end - runs[r].begin;
      if (e < len) {
        qt = runs[r].begin + e;
        break;
      }
      e -= len;
      ++r;
    }
  }
  // Requires a further step.
  __device__ void next() {
    if (++h < h1) return;
    h = h0;
    if (++qt < runs[r].end) return;
    ++r;
    qt = runs[r].begin;
  }
};

// The sm_90a dK/dV pass's tiles (its plan is built with them): key tiles of 128 rows (64 per consumer
// warpgroup), query steps of 64 rows.
constexpr int kDkvSm90Keys = 128, kDkvSm90Queries = 64;
// Launches the wgmma dK/dV pass over the plan's items (grid: dkdv_grid; CTAs past the plan's item count
// return at once; packed when v.ktiles is set). Requires sm90a_usable(). With fused_dq (D = 128 only, a.dq_acc
// zeroed) the pass also adds each step's dS K into a.dq_acc, so the dQ pass is not needed (not deterministic:
// fp32 reduce-adds).
void launch_dkdv_sm90a(const BwdArgs& a, const PlanArgs& pl, const varlen::Tables& v, int max_items, int D, bool f16,
                       bool fused_dq, cudaStream_t stream);

// The sm_90a dQ pass's query tiles (a packed call's dQ work items are built for them).
constexpr int kDqSm90Queries = 128;
// Launches the wgmma dQ pass (grid: query tiles of 128 rows, Hq, B; packed when v.tiles is set: its num_tiles
// work items, Hq, 1) for D = 64 or 128 (f16 selects half, else bf16); needs a.lse2 and a.delta from the
// preprocess pass. Requires sm90a_usable() (launch_checks.hpp).
void launch_dq_sm90a(const BwdArgs& a, const varlen::Tables& v, int num_tiles, int D, bool f16, cudaStream_t stream);

}  // namespace ksa::cuda::detail
