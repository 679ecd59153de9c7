// CUDA forward, Hopper path (sm_90a only; attention_fwd.cu dispatches here on compute capability 9.0):
// the same tiles and online softmax as the portable mma.sync kernel, with the products on wgmma.
//
// Work item: 128 query rows (gathered order) of one head, two consumer warpgroups of 64 rows each and a
// producer warpgroup. Persistent CTAs, one per SM, take the items heaviest first; the producer's stage ring
// runs on across items, so the next item's loads overlap the current one's last tile and epilogue. Key tiles
// of 128 rows (KeyTileCursor) stream through a three-stage pipeline (sm90a_pipeline.cuh), 128B-swizzled for
// wgmma: copied by TMA (TmaProducer, FwdMaps: a few boxes of whole chunks per tile) where the launch has one
// stream layout whose k and S divide 128, else row by row with cp.async (Producer; packed streams, other k/S,
// forward_config 6). Then, per tile:
//   S = Q K^T   wgmma m64n128k16, Q and K from smem (K-major), D/16 k-steps per tile;
//   mask        per row, two compares per element against the row's text or summary key range
//               (row_key_ranges, core), only on tiles the cursor marks masked or clipped;
//   softmax     on the accumulator registers (log2 domain, running max and sum per row);
//   O += P V    wgmma m64nDk16, P from registers (the accumulator layout is the A-fragment layout), V from
//               smem MN-major (no transpose pass).
// Out and lse are written in stream order as by the portable kernel. Packed sequences: as the portable kernel
// (a work table of (stream, query tile) items; attention_fwd.cu).
//
// File shape (docs/design.md: kernel files): traits -> device code -> launcher.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "check.cuh"
#include "cuda/attention_fwd.cuh"
#include "cuda/mma.cuh"
#include "cuda/sm90a_pipeline.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"
#include "ksa/error.hpp"

namespace ksa::cuda::detail {
namespace {

using namespace dev;

// ---------------------------------------------------------------------------------------------- traits
template <class T_, int D_>
struct Sm90Traits {
  using T = T_;
  static constexpr int D = D_;
  static constexpr int BQ = 128;                                 // query rows per CTA, 64 per consumer warpgroup
  static constexpr int BK = 128;                                 // keys per tile
  static constexpr int STAGES = 3;                               // K/V tiles in flight
  static constexpr int THREADS = 384;                            // consumer warpgroups 0 and 1, producer warpgroup 2
  static constexpr int PRODUCER_REGS = 120, CONSUMER_REGS = 192;  // setmaxnreg (see regs_fit; no spills)
  static constexpr int REUSE_BAR = Bars<STAGES>::kFree;          // Q consumed (Producer's reuse barrier)
  static constexpr uint32_t Q_BYTES = BQ * D * 2, KV_BYTES = BK * D * 2;
  // Q, then STAGES x (K, V), then one TileInfo per stage, then the TMA path's mbarriers (one per stage, one
  // for Q); +1 KiB to align the base on the 128B swizzle's 1024-byte period.
  static constexpr int SMEM =
      int(Q_BYTES + STAGES * 2 * KV_BYTES) + STAGES * int(sizeof(TileInfo)) + (STAGES + 1) * 8 + 1024;
  static_assert(D == 64 || D == 128, "D must be 64 or 128");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
  static_assert(regs_fit(PRODUCER_REGS, CONSUMER_REGS), "setmaxnreg budget");
};

// The K and V tensor maps of a launch whose key tiles the TMA copies (kv = 0: K, 1: V; tma.cuh). A text tile
// [tb, tb + BK) is the text of chunks tb / k .. + BK / k: one box of `text` (5-D: D, k rows, the full chunks,
// KV heads, batch; box 64 x k x BK/k); a summary tile likewise one box of `sum` (D, S rows from each chunk's
// row k, the full chunks, KV heads, batch). Chunks past the full ones lie outside those maps and are
// zero-filled; a tile that reaches the partial last chunk (its text, or its summaries where the tail is
// summarised) takes `rows_k` / `rows_s` instead (4-D: D, the stream's rows, KV heads, batch; boxes of k and of
// S rows), one copy per chunk, rows past the stream zero-filled. Rows outside a tile's [begin, end) are
// masked by the consumers like the cp.async path's zero rows.
struct FwdMaps {
  CUtensorMap text[2], sum[2], rows_k[2], rows_s[2];
};

// ------------------------------------------------------------------------------------------ device code
// Work item `it` of a launch: f(args of its stream, g0, g1, h, b). Items run KV head by KV head (batch entry
// b, KV head hk), within one the query tiles by rank (0: the heaviest query tile of the launch's one layout,
// or of the packed streams' table), within a tile the G query heads sharing hk: the CTAs in flight then read
// the same K/V rows (the summaries every tile sees stay in L2).
template <class K, bool PACKED, class F>
__device__ __forceinline__ void with_item(const FwdArgs& a, const varlen::Tables& v, int it, F&& f) {
  const int per_kv = a.num_qtiles * a.G, bk = it / per_kv, rem = it % per_kv, rank = rem / a.G;
  const int Hkv = a.Hq / a.G, b = bk / Hkv, h = (bk % Hkv) * a.G + rem % a.G;
  if constexpr (PACKED) {
    const varlen::QueryTile w = v.tiles[rank];
    f(stream_args<typename K::T>(a, v.seqs[w.seq]), w.g0, w.g1, h, b);
  } else {
    int g0, g1;
    query_tile<K::BQ>(a, a.num_qtiles - 1 - rank, g0, g1);
    f(a, g0, g1, h, b);
  }
}

// Consumer warpgroup wg's part of one item: query rows [g0, g1) (gathered order of a's stream) of head h,
// batch entry b; j counts the CTA's tiles over its items (the stage ring's position), last_item: no item
// follows in this CTA.
// TMA: the tiles arrive on the mbarriers at `bars` (one per stage, then Q's, whose phase parity for this item is
// q_parity) instead of the named full barriers.
template <class K, bool TMA>
__device__ __forceinline__ void fwd_sm90a_consume(const FwdArgs& a, int g0, int g1, int h, int b, int wg, uint32_t sQ,
                                                  uint32_t sKV, const TileInfo* info, int& j, bool last_item,
                                                  uint32_t bars, uint32_t q_parity) {
  using T = typename K::T;
  using B = Bars<K::STAGES>;
  constexpr int D = K::D, BK = K::BK, NS = BK / 2, NO = D / 2;
  // This thread's rows: r0 and r0 + 8 (hf = 0, 1) of the consumer's 64; rows past g1 see nothing.
  const int warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32, gid = lane / 4, tig = lane % 4;
  const int r0 = wg * 64 + warp * 16 + gid;
  RowKeyRanges rk[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int g = g0 + r0 + 8 * hf;
    if (g < g1) rk[hf] = row_key_ranges(a.l32, a.W32, uint32_t(g));
  }
  float o[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // m: running max of raw scores * scale_log2

  if constexpr (TMA) {
    mbar_wait(bars + 8u * K::STAGES, q_parity);  // Q (cp.async by the producer threads) has landed
    fence_proxy_async();                         // and is visible to wgmma's async proxy
  }
  for (;; ++j) {
    const int st = j % K::STAGES;
    if constexpr (TMA) mbar_wait(bars + 8u * uint32_t(st), uint32_t(j / K::STAGES) & 1u);
    else B::wait_full(st, wg);
    const TileInfo t = info[st];
    const uint32_t sK = sKV + uint32_t(st) * 2 * K::KV_BYTES, sV = sK + K::KV_BYTES;

    // S = Q K^T (64 rows x 128 keys). The consumers issue it in turn (0, 1, 0, 1, ... over the CTA's tiles)
    // so that one's products run on the tensor cores while the other is in its softmax.
    float s[NS];
    B::products_in_turn(wg, j, !(t.last && last_item), [&] { wgmma_ss_rows<T, BK, D, K::BQ>(s, sQ, wg * 64, sK); });
    fence_reg(s);
    if (t.last && !last_item) B::reuse_done(K::REUSE_BAR);  // Q is free for the next item's rows

    // Mask: key x of the tile is visible to row hf iff it lies in the row's range for the tile's region
    // (a tile is all text or all summaries).
    if (t.masked) {
      const bool text = t.begin < a.lay.T;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const KeyRange kr = key_range(rk[hf], text);
#pragma unroll
        for (int jj = 0; jj < BK / 8; ++jj)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (!kr.sees(t.begin + 8 * jj + 2 * tig + e)) s[4 * jj + 2 * hf + e] = -INFINITY;
      }
    }
    // Online softmax in the log2 domain: p = 2^(s * scale_log2 - m); a row's 128 scores live in its quad.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < BK / 8; ++jj) mx = fmaxf(mx, fmaxf(s[4 * jj + 2 * hf], s[4 * jj + 2 * hf + 1]));
      float alpha;
      const float m_use = online_softmax_step(m[hf], quad_max(mx) * a.scale_log2, alpha);
      float sum = 0.f;
#pragma unroll
      for (int jj = 0; jj < BK / 8; ++jj)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = ex2(fmaf(s[4 * jj + 2 * hf + e], a.scale_log2, -m_use));
          s[4 * jj + 2 * hf + e] = p;
          sum += p;
        }
      l[hf] = l[hf] * alpha + sum;  // per-thread partial; summed over the quad at the end
#pragma unroll
      for (int jj = 0; jj < D / 8; ++jj) {
        o[4 * jj + 2 * hf] *= alpha;
        o[4 * jj + 2 * hf + 1] *= alpha;
      }
    }

    // O += P V: P (input dtype) as A fragments, one 16-key step per wgmma.
    uint32_t pf[BK / 16][4];
    to_a_frags<T>(s, pf);
    fence_reg(o);
    wgmma_fence();
    wgmma_rs_rows<T, D, BK>(o, pf, sV);
    wgmma_commit();
    wgmma_wait<0>();
    fence_reg(o);
    B::release(st);
    if (t.last) break;
  }
  ++j;

  // Epilogue: normalise, write out (stream order) and lse (natural log).
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float sum = quad_sum(l[hf]);
    const int g = g0 + r0 + 8 * hf;
    if (g < g1) store_row<T, D>(a, b, h, g, tig, hf, o, m[hf], sum);
  }
}

// A persistent CTA per SM: CTA x takes items x, x + gridDim.x, ... (with_item; heaviest first), its producer
// running ahead across item boundaries: the next item's first K/V tile is loaded while the consumers finish
// the current one, its Q as soon as both consumers' last S = Q K^T of the current item has completed.
// PACKED: the items' query tiles are v.tiles (a query tile of one stream, with that stream's rows, Layout and
// tile walk); otherwise the query tiles of the launch's one layout, the heaviest (most summaries) first.
// TMA (not PACKED): the K/V tiles are copied by the tensor memory accelerator through the maps m (FwdMaps),
// Q by cp.async as before; otherwise every row by cp.async (load_rows) and m is unused.
template <class K, bool PACKED, bool TMA>
__global__ void __launch_bounds__(K::THREADS, 1)
    fwd_sm90a_kernel(const FwdArgs a, const varlen::Tables v, const __grid_constant__ FwdMaps m) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(!(TMA && PACKED), "the TMA path takes one layout per launch");
  using T = typename K::T;
  constexpr int D = K::D, BQ = K::BQ, BK = K::BK;
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t sQ = (smem_u32(smem) + 1023u) & ~1023u, sKV = sQ + K::Q_BYTES;  // stage st: K, then V
  TileInfo* info = reinterpret_cast<TileInfo*>(smem + (sKV - smem_u32(smem)) + K::STAGES * 2 * K::KV_BYTES);
  const uint32_t bars = smem_u32(info + K::STAGES);  // TMA: STAGES full barriers, then Q's
  const int items = a.num_qtiles * a.Hq * a.B, wg = int(threadIdx.x) / 128;
  if constexpr (TMA) {
    if (threadIdx.x == 0) {
      for (int st = 0; st < K::STAGES; ++st) mbar_init(bars + 8u * uint32_t(st), 1);
      mbar_init(bars + 8u * K::STAGES, 128);  // each producer thread's Q copies
      mbar_init_fence();
    }
    __syncthreads();
  }

  if (wg == 2) {
    setmaxnreg_dec<K::PRODUCER_REGS>();
    if constexpr (TMA) {
      TmaProducer<K::STAGES> p(sKV, 2 * K::KV_BYTES, bars, 2 * K::KV_BYTES, info, K::REUSE_BAR);
      const int k = int(a.l32.chunk_size), S = int(a.l32.S), full = int(a.l32.full), Tt = int(a.l32.T);
      // A text tile takes rows_k from the partial last chunk on, a summary tile rows_s from its summaries on.
      const bool tail_text = a.l32.tail > 0, tail_sums = tail_text && a.lay.summarize_tail;
      for (int it = int(blockIdx.x); it < items; it += int(gridDim.x))
        with_item<K, false>(a, v, it, [&](const FwdArgs& ia, int g0, int g1, int h, int b) {
          const int hk = h / ia.G;
          p.item(
              [&] {
                load_rows<T, D, BQ>(ia.l32, sQ, at<const T>(ia.q, b, 0, h), ia.q.r, g0, g1);
                mbar_cp_async_arrive(bars + 8u * K::STAGES);
              },
              KeyTiles<BK>(ia.lay, ia.W, g0, g1),
              [&](uint32_t st, const TileInfo& t, uint32_t bar) {
                const bool text = t.begin < Tt;
                const int n = text ? BK / k : BK / S, c0 = text ? t.begin / k : (t.begin - Tt) / S;
                const bool one_box = c0 + n <= full || !(text ? tail_text : tail_sums);
#pragma unroll
                for (int kv = 0; kv < 2; ++kv)
#pragma unroll
                  for (int cb = 0; cb < D / 64; ++cb) {
                    const uint32_t dst = st + uint32_t(kv) * K::KV_BYTES + uint32_t(cb) * BK * 128;
                    if (one_box) {
                      tma_load5(dst, text ? &m.text[kv] : &m.sum[kv], 64 * cb, 0, c0, hk, b, bar);
                    } else if (text) {
                      for (int i = 0; i < n; ++i)
                        tma_load4(dst + uint32_t(i * k) * 128, &m.rows_k[kv], 64 * cb, (c0 + i) * (k + S), hk, b, bar);
                    } else {
                      for (int i = 0; i < n; ++i)
                        tma_load4(dst + uint32_t(i * S) * 128, &m.rows_s[kv], 64 * cb,
                                  int(ia.l32.summary_to_stream(uint32_t((c0 + i) * S))), hk, b, bar);
                    }
                  }
              });
        });
      p.finish();
    } else {
      Producer<K::STAGES> p(sKV, 2 * K::KV_BYTES, info, K::REUSE_BAR);
      for (int it = int(blockIdx.x); it < items; it += int(gridDim.x))
        with_item<K, PACKED>(a, v, it, [&](const FwdArgs& ia, int g0, int g1, int h, int b) {
          const T* kb = at<const T>(ia.k, b, 0, h / ia.G);
          const T* vb = at<const T>(ia.v, b, 0, h / ia.G);
          p.item([&] { load_rows<T, D, BQ>(ia.l32, sQ, at<const T>(ia.q, b, 0, h), ia.q.r, g0, g1); },
                 KeyTiles<BK>(ia.lay, ia.W, g0, g1),
                 [&](uint32_t st, const TileInfo& t) {
                   load_rows<T, D, BK>(ia.l32, st, kb, ia.k.r, t.begin, t.end);
                   load_rows<T, D, BK>(ia.l32, st + K::KV_BYTES, vb, ia.v.r, t.begin, t.end);
                 });
        });
      p.finish();
    }
    return;
  }
  setmaxnreg_inc<K::CONSUMER_REGS>();
  int j = 0;
  uint32_t n_item = 0;
  for (int it = int(blockIdx.x); it < items; it += int(gridDim.x), ++n_item)
    with_item<K, PACKED>(a, v, it, [&](const FwdArgs& ia, int g0, int g1, int h, int b) {
      fwd_sm90a_consume<K, TMA>(ia, g0, g1, h, b, wg, sQ, sKV, info, j, it + int(gridDim.x) >= items, bars,
                                n_item & 1u);
    });
#endif
}

// --------------------------------------------------------------------------------------------- launcher
// The maps of FwdMaps for the launch's K and V (B batch entries, Hkv = Hq / G heads, Layout a.lay); false where
// the TMA path does not apply: packed streams, k or S not dividing the key tile, a map the driver rejects.
template <class K>
bool make_maps(const FwdArgs& a, int B, FwdMaps& m) {
  const int64_t k = a.lay.chunk_size, S = a.lay.S, L = a.lay.length(), full = a.lay.full_chunks();
  if (K::BK % k != 0 || K::BK % S != 0) return false;
  const uint64_t Hkv = uint64_t(a.Hq / a.G);
  const bool tail_text = a.lay.tail_len() > 0, tail_sums = tail_text && a.lay.summarize_tail;
  for (int kv = 0; kv < 2; ++kv) {
    const View& t = kv == 0 ? a.k : a.v;
    // Byte strides; a dimension of size 1 gets any stride the driver takes (its coordinate is always 0).
    const uint64_t rs = uint64_t(t.r) * 2, hs = Hkv > 1 ? uint64_t(t.h) * 2 : 16, bs = B > 1 ? uint64_t(t.b) * 2 : 16;
    const uint32_t box0 = uint32_t(K::D < 64 ? K::D : 64);
    if (full > 0) {
      const uint64_t dt[5] = {uint64_t(K::D), uint64_t(k), uint64_t(full), Hkv, uint64_t(B)};
      const uint64_t st[4] = {rs, uint64_t(k + S) * rs, hs, bs};
      const uint32_t bt[5] = {box0, uint32_t(k), uint32_t(K::BK / k), 1, 1};
      if (!encode_map16(m.text[kv], t.p, 5, dt, st, bt)) return false;
      const uint64_t ds[5] = {uint64_t(K::D), uint64_t(S), uint64_t(full), Hkv, uint64_t(B)};
      const uint32_t bs5[5] = {box0, uint32_t(S), uint32_t(K::BK / S), 1, 1};
      if (!encode_map16(m.sum[kv], static_cast<const uint8_t*>(t.p) + k * rs, 5, ds, st, bs5)) return false;
    }
    // The per-chunk maps only where a partial last chunk exists (its summaries only where they are kept).
    const uint64_t dr[4] = {uint64_t(K::D), uint64_t(L), Hkv, uint64_t(B)};
    const uint64_t sr[3] = {rs, hs, bs};
    const uint32_t bk[4] = {box0, uint32_t(k), 1, 1}, bss[4] = {box0, uint32_t(S), 1, 1};
    if (tail_text && !encode_map16(m.rows_k[kv], t.p, 4, dr, sr, bk)) return false;
    if (tail_sums && !encode_map16(m.rows_s[kv], t.p, 4, dr, sr, bss)) return false;
  }
  return true;
}

// tma: copy K/V tiles by TMA where make_maps allows it (else by cp.async, as with tma = false).
template <class K>
void launch(const FwdArgs& a, int B, const varlen::Streams* packed, bool tma, cudaStream_t s) {
  FwdMaps m{};
  if (tma && !packed && make_maps<K>(a, B, m)) {
    launch_fwd<K>(fwd_sm90a_kernel<K, false, true>, fwd_sm90a_kernel<K, true, false>, a, B, packed, s,
                  /*persistent=*/true, m);
    return;
  }
  launch_fwd<K>(fwd_sm90a_kernel<K, false, false>, fwd_sm90a_kernel<K, true, false>, a, B, packed, s,
                /*persistent=*/true, m);
}

template <class T>
void launch_dim(const FwdArgs& a, int B, int D, const varlen::Streams* packed, bool tma, cudaStream_t s) {
  if (D == 128) launch<Sm90Traits<T, 128>>(a, B, packed, tma, s);
  else if (D == 64) launch<Sm90Traits<T, 64>>(a, B, packed, tma, s);
  else fail("ksa::cuda::attention_forward (sm_90a): D=", D, " is not supported (64 or 128)");
}

}  // namespace

void launch_fwd_sm90a(const FwdArgs& a, int B, int D, bool f16, const varlen::Streams* packed, bool tma,
                      cudaStream_t stream) {
  if (f16) launch_dim<__half>(a, B, D, packed, tma, stream);
  else launch_dim<__nv_bfloat16>(a, B, D, packed, tma, stream);
}

}  // namespace ksa::cuda::detail
