// CUDA backward (sm80+): FlashAttention-2's math (P recomputed from the forward's lse) with tensor cores
// (mma.sync m16n8k16, bf16/f16 in, fp32 accumulate), over only the tile pairs the core's tile walk visits,
// in the core's gathered order (text rows, then all summaries), like the forward. Deterministic (same bits
// every run) when params.deterministic is set: every sum then runs in an order fixed by the shapes and SM
// count (without it, the sm_90a fused dQ below adds with fp32 atomics).
//
// Passes, all on the caller's stream (workspace from cudaMallocAsync, freed with cudaFreeAsync):
//   1. preprocess  (b, q head, row): Delta = rowsum(dout * out) and lse in the log2 domain, gathered order.
//   2. plan        (attention_bwd_plan.cu) spans_kernel: key_spans of every dK/dV query tile; runs_kernel:
//                  for every key tile, the runs of query tiles that see it (the inverse of the tile walk,
//                  attention_bwd_plan.hpp); schedule_kernel: work items, splitting long lists (see below).
//   3. dK/dV       one CTA per (item, kv head, batch): the key tile's K and V stay in smem; for each query
//                  tile of the item and each query head of the GQA group (Q, dO, lse, Delta double-buffered
//                  with cp.async): S^T = K Q^T, P^T = 2^(S^T*scale*log2e - lse2), dP^T = V dO^T,
//                  dS^T = P^T (dP^T - Delta); dV += P^T dO, dK += dS^T Q (rows = keys, 16 per warp).
//   4. reduce      key tiles whose list was split: sum the fp32 partials in segment order, write dk, dv.
//   5. dQ          one CTA per (query tile, q head, batch), over the key tiles of KeyTileCursor (as the
//                  forward): S = Q K^T, P, dP = dO V^T, dS; dQ += dS K (rows = queries, 16 per warp). On
//                  compute capability 9.0 the wgmma kernels of attention_bwd_sm90a.cu run passes 3 and
//                  5 instead (128-key tiles, 64-query steps; KernelOptions::backward_sm90a = false keeps these).
// Recomputing S and dP in the dQ pass costs 7 tile GEMMs per tile pair instead of 5: the price of a dQ
// without atomics (the CPU backward makes the same trade), taken when params.deterministic is set. Otherwise,
// on sm_90a with D = 128, the dK/dV pass computes dQ too (5 GEMMs; each step's dQ tile is added into a zeroed
// fp32 accumulator with bulk reduce-adds, then dq_store_kernel scales and scatters it); the summation order
// of dQ then varies from run to run. KernelOptions::backward_fused_dq = false keeps the dQ pass (use_fused_dq).
//
// Old summaries are one contiguous block of key tiles that every later query tile sees, so a summary key
// tile's list is ~L/BQ long while a text tile's is ~W*k/BQ. The schedule cuts every list longer than U
// entries into ceil(n/U) near-equal segments (U = max(8, total / target), target = 2 * resident CTAs /
// (B * Hkv)); each segment writes fp32 partials to its own slot and the reduce kernel adds the slots in
// order. Items run heaviest first (summary tiles, oldest first, then text tiles), over all heads and batch
// entries at once (the item is the slowest index of the CTA order: detail::dkdv_cta).
//
// Packed sequences (AttentionParams::cu_seqlens): one launch of each pass for all streams, each stream walked
// with its own Layout and tiles (varlen_plan.hpp; the tables are built on the host and copied into the
// workspace). Rows of lse2, Delta and the fused dQ accumulator are padded per stream (each from its own
// multiple of 128), so every tile reads and writes what it would for that stream alone. Preprocess, the plan's
// spans and the fused dQ's store walk the padded rows (row_blocks gives a row's stream); the plan's key tiles
// are every stream's text tiles, then every stream's summary tiles (the schedule is unchanged), and a key
// tile's runs list its own stream's query tiles; a dK/dV CTA runs its item as for its stream alone
// (detail::stream_item); the dQ pass's grid walks a table of (stream, query tile) items, as the forward's.
// Deterministic mode stays deterministic (no new atomics; every order is fixed by the tables). With the same
// split (KernelOptions::backward_split, or the automatic U at its minimum on both sides) a packed call gives the bits
// of one call per stream; the automatic U depends on the whole call's work, so dk/dv may round differently. The heavy
// kernels are instantiated twice (PACKED) so that plain calls run the code they ran before.
//
// File shape (docs/design.md: kernel files): traits -> device code (passes 1, 3, 4, 5) -> launcher. The plan (pass 2,
// its sizes and workspace, the test hook that copies it back) is attention_bwd_plan.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_bwd_plan.hpp"
#include "attention_bwd_plan_launch.cuh"
#include "check.cuh"
#include "cuda/attention_bwd.cuh"
#include "cuda/varlen_plan.hpp"
#include "cuda/workspace.cuh"
#include "ksa/cuda.hpp"
#include "ksa/error.hpp"
#include "launch_checks.hpp"
#include "mma.cuh"

namespace ksa::cuda {
namespace {

using namespace dev;  // shared device helpers (mma.cuh)
using bwd::kMaxRuns;
using bwd::PlanItem;
using bwd::PlanRun;
using bwd::PlanSplit;

using detail::kLog2e;
using detail::kRowPad;
using detail::view_of;

// ---------------------------------------------------------------------------------------------- traits
// dK/dV pass: NW warps x 16 key rows; BQ query rows per step; KVREG: the warp's K and V A-fragments are held
// in registers for the whole CTA (else re-read from smem every step).
template <class T_, int D_, int NW_, int BQ_, bool KVREG_, int MINB_>
struct DkvTraits {
  using T = T_;
  static constexpr int D = D_, NW = NW_, BQ = BQ_, MINB = MINB_;
  static constexpr bool KVREG = KVREG_;
  static constexpr int BKV = 16 * NW;  // key rows per CTA
  static constexpr int THREADS = 32 * NW;
  static constexpr int CHUNKS = D / 8;
  static constexpr int KV_BYTES = BKV * D * 2;  // K or V
  static constexpr int QS_BYTES = BQ * D * 2;   // one stage of Q or dO
  // K, V; two stages of Q; two of dO; two of (lse2, Delta) floats; two of the queries' key ranges (int2).
  static constexpr int SMEM = 2 * KV_BYTES + 4 * QS_BYTES + 2 * 2 * BQ * 4 + 2 * BQ * 8;
  static_assert(kRowPad % BQ == 0 && BQ % 16 == 0 && THREADS >= BQ / 2, "dK/dV query tile");
};

// dQ pass: NW warps x 16 query rows; BK keys per step (K and V double-buffered).
template <class T_, int D_, int NW_, int BK_, int MINB_>
struct DqTraits {
  using T = T_;
  static constexpr int D = D_, NW = NW_, BK = BK_, MINB = MINB_;
  static constexpr int BQ = 16 * NW;
  static constexpr int THREADS = 32 * NW;
  static constexpr int CHUNKS = D / 8;
  static constexpr int KV_BYTES = BK * D * 2;
  // Q, dO; two stages of K and V.
  static constexpr int SMEM = 2 * BQ * D * 2 + 4 * KV_BYTES;
  static_assert(kRowPad % BQ == 0 && BK % 16 == 0, "dQ tiles");
};

// One configuration per head dim. nvcc 13 -Xptxas -v (sm_90 / sm_80), no spills: dK/dV D=64 240/252
// registers, D=128 254/254 (BQ=64 at D=128 spills: 200 bytes); dQ D=64 205/199, D=128 189/183 (BK=64 at
// D=128: 255 registers and 12 bytes of spills). 2 CTAs of 4 warps per SM in all four.
template <class T, int D>
struct Config;
template <class T>
struct Config<T, 64> {
  using Dkv = DkvTraits<T, 64, 4, 64, true, 2>;
  using Dq = DqTraits<T, 64, 4, 64, 2>;
};
template <class T>
struct Config<T, 128> {
  using Dkv = DkvTraits<T, 128, 4, 32, false, 2>;
  using Dq = DqTraits<T, 128, 4, 32, 2>;
};

using detail::BwdArgs;
using detail::View;

using detail::PlanArgs;

// ------------------------------------------------------------------------------------------ device code
// Loads `rows` gathered rows [g0, g0 + rows) of one head into swizzled smem, zero-filling rows at or past
// g_end, and (if asked) each row's key range for key tiles of one region (text_keys: text rows, else
// summary rows); base points at element 0 of the head in batch entry b. Four threads share a row (one
// stream-row computation per thread and tile), as in the forward.
template <class T, int THREADS, int CHUNKS>
__device__ __forceinline__ void load_tile(const Layout32& l32, uint32_t smem, const T* base, int64_t rstride, int g0,
                                          int g_end, int rows, int2* ranges = nullptr, int W32 = 0,
                                          bool text_keys = true) {
  constexpr int TPR = 4, CPT = CHUNKS / TPR;
  const int c0 = threadIdx.x % TPR;  // chunks c0, c0 + TPR, ...: a row's TPR threads read 64 contiguous bytes
  for (int r = threadIdx.x / TPR; r < rows; r += THREADS / TPR) {
    const int g = g0 + r;
    const bool valid = g < g_end;
    const int64_t srow = valid ? int64_t(l32.stream_of_gathered(uint32_t(g))) : 0;
    if (ranges && c0 == 0) ranges[r] = key_range(l32, W32, g, g_end, text_keys).packed();
    const T* src = base + srow * rstride;
#pragma unroll
    for (int i = 0; i < CPT; ++i) cp_async16(smem + swz<CHUNKS>(r, c0 + i * TPR), src + (c0 + i * TPR) * 8, valid);
  }
}

using detail::head_ptr;
using detail::row_ptr;

// ---- pass 1: Delta and lse2, 8 threads per (b, q head, gathered row) over [0, Lp) (packed: padded rows)
template <class T, int D>
__global__ void __launch_bounds__(256) preprocess_kernel(const BwdArgs a, const varlen::Tables v) {
  constexpr int TPR = 8, PER = D / TPR;  // 8 or 16 elements per thread
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = t / TPR;
  const int sub = int(t % TPR), b = int(blockIdx.y);
  const int h = int(row % a.Hq);
  const int64_t g = row / a.Hq;  // gathered row; packed: padded row
  bool valid;
  int64_t srow = 0;
  if (v.seqs) {  // packed: the padded row's stream; rows past its L are its padding
    valid = false;
    if (g < a.Lp) {
      const varlen::Seq s = v.seqs[v.row_blocks[g / kRowPad]];
      const int64_t gs = g - s.p0;
      valid = gs < s.L;
      if (valid) srow = s.row0 + s.l32.stream_of_gathered(uint32_t(gs));
    }
  } else {
    valid = g < a.L;
    if (valid) srow = a.l32.stream_of_gathered(uint32_t(g));
  }
  float acc = 0.f;
  if (valid) {
    const T* o = row_ptr<T>(a.out, b, srow, h) + sub * PER;
    const T* d = row_ptr<T>(a.dout, b, srow, h) + sub * PER;
#pragma unroll
    for (int c = 0; c < PER; c += 8) {
      const uint4 x = *reinterpret_cast<const uint4*>(o + c), y = *reinterpret_cast<const uint4*>(d + c);
      const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 u = unpack2<T>(xs[i]), w = unpack2<T>(ys[i]);
        acc = fmaf(u.x, w.x, acc);
        acc = fmaf(u.y, w.y, acc);
      }
    }
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  if (sub == 0 && g < a.Lp) {
    const int64_t i = (int64_t(b) * a.Hq + h) * a.Lp + g;
    a.delta[i] = valid ? acc : 0.f;
    a.lse2[i] = valid ? a.lse[(int64_t(b) * a.L + srow) * a.Hq + h] * kLog2e : INFINITY;
  }
}

// ---- pass 2, the plan: attention_bwd_plan.cu
// ---- pass 3: dK, dV
using detail::EntryWalk;

// One CTA: plan item `item` (key tile item.kt of a's stream) for KV head hk of batch entry b.
template <class K>
__device__ __forceinline__ void dkdv_cta(const BwdArgs& a, const PlanArgs& pl, const PlanItem item, int b, int hk) {
  using T = typename K::T;
  constexpr int D = K::D, BQ = K::BQ, BKV = K::BKV, CH = K::CHUNKS, QS = K::QS_BYTES;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sK = smem_u32(smem), sV = sK + K::KV_BYTES, sQ0 = sV + K::KV_BYTES, sO0 = sQ0 + 2 * QS;
  float* rv0 = reinterpret_cast<float*>(smem + 2 * K::KV_BYTES + 4 * QS);  // [stage][lse2 | Delta][BQ]
  int2* rng0 = reinterpret_cast<int2*>(rv0 + 4 * BQ);                      // [stage][BQ] query key ranges

  int64_t tb64, te64;
  KeyTileGrid(a.lay, BKV).rows(item.kt, tb64, te64);
  const int tb = int(tb64), te = int(te64);

  // This thread's key rows (for masked steps; rows past te lie in no query's range) and the tile's region.
  const int xk[2] = {tb + warp * 16 + gid, tb + warp * 16 + gid + 8};
  const bool text_keys = tb < int(a.l32.T);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;

  const int nsteps = (item.e1 - item.e0) * a.G;
  if (nsteps > 0) {
    load_tile<T, K::THREADS, CH>(a.l32, sK, head_ptr<T>(a.k, b, hk), a.k.r, tb, te, BKV, nullptr);
    load_tile<T, K::THREADS, CH>(a.l32, sV, head_ptr<T>(a.v, b, hk), a.v.r, tb, te, BKV, nullptr);

    // Issues the loads of one step (query tile qt, head h) into `stage`; returns whether it needs the mask.
    auto issue = [&](int stage, int qt, int h) {
      const int g0 = qt * BQ, g1 = min(a.L, g0 + BQ);
      load_tile<T, K::THREADS, CH>(a.l32, sQ0 + stage * QS, head_ptr<T>(a.q, b, h), a.q.r, g0, g1, BQ,
                                   rng0 + stage * BQ, a.W32, text_keys);
      load_tile<T, K::THREADS, CH>(a.l32, sO0 + stage * QS, head_ptr<T>(a.dout, b, h), a.dout.r, g0, g1, BQ, nullptr);
      // lse2 and Delta of the tile: BQ floats each, contiguous and 16-byte aligned (Lp % kRowPad == 0).
      const int64_t off = (int64_t(b) * a.Hq + h) * a.Lp + g0;
      const uint32_t dst = smem_u32(rv0 + stage * 2 * BQ);
      for (int i = threadIdx.x; i < BQ / 2; i += K::THREADS) {
        const bool is_delta = i >= BQ / 4;
        const int c = is_delta ? i - BQ / 4 : i;
        cp_async16(dst + (is_delta ? BQ * 4 : 0) + c * 16, (is_delta ? a.delta : a.lse2) + off + c * 4, true);
      }
      // Short query tiles (past L) take the masked path: their missing rows carry token -1.
      return g1 - g0 < BQ || !pl.spans[qt].full_over(tb64, te64);
    };

    EntryWalk walk(pl.runs + int64_t(item.kt) * kMaxRuns, item.e0, hk * a.G, a.G);
    bool masked = issue(0, walk.qt, walk.h);
    cp_async_commit();

    uint32_t kf[K::KVREG ? D / 16 : 1][4], vf[K::KVREG ? D / 16 : 1][4];
    const int arow = warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2);  // A-fragment rows (keys) of this lane
    int stage = 0;
    for (int step = 0;; ++step) {
      const bool more = step + 1 < nsteps;
      bool nmasked = false;
      if (more) {
        walk.next();
        nmasked = issue(stage ^ 1, walk.qt, walk.h);
        cp_async_commit();
        cp_async_wait_one();  // this step's group (and K, V) have landed
      } else {
        cp_async_wait_all();
      }
      __syncthreads();
      if constexpr (K::KVREG) {
        if (step == 0) {
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            ldsm_x4(kf[kk][0], kf[kk][1], kf[kk][2], kf[kk][3], sK + swz<CH>(arow, kk * 2 + lane / 16));
            ldsm_x4(vf[kk][0], vf[kk][1], vf[kk][2], vf[kk][3], sV + swz<CH>(arow, kk * 2 + lane / 16));
          }
        }
      }
      const uint32_t sQ = sQ0 + stage * QS, sO = sO0 + stage * QS;
      const float* lse2s = rv0 + stage * 2 * BQ;
      const float* dels = lse2s + BQ;
      const int2* qrng = rng0 + stage * BQ;

      // rows (keys) x columns (queries) = A (K or V rows) x B (Q or dO rows, non-transposed ldmatrix).
      auto gemm_rows_by_queries = [&](float(*acc)[4], uint32_t sA, uint32_t(*areg)[4], uint32_t sB) {
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t af[4];
          if constexpr (K::KVREG) {
            af[0] = areg[kk][0], af[1] = areg[kk][1], af[2] = areg[kk][2], af[3] = areg[kk][3];
          } else {
            ldsm_x4(af[0], af[1], af[2], af[3], sA + swz<CH>(arow, kk * 2 + lane / 16));
          }
#pragma unroll
          for (int nb = 0; nb < BQ / 16; ++nb) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4(b0, b1, b2, b3, sB + swz<CH>(nb * 16 + (lane % 8) + 8 * (lane / 16), kk * 2 + (lane / 8) % 2));
            mma16816<T>(acc[2 * nb], af, b0, b1);
            mma16816<T>(acc[2 * nb + 1], af, b2, b3);
          }
        }
      };
      // acc (keys x D) += X (keys x queries, C layout in fp32) x B (rows = queries, transposed ldmatrix).
      auto gemm_accumulate = [&](float(*acc)[4], float(*x)[4], uint32_t sB) {
#pragma unroll
        for (int kb = 0; kb < BQ / 16; ++kb) {
          const uint32_t pf[4] = {pack2<T>(x[2 * kb][0], x[2 * kb][1]), pack2<T>(x[2 * kb][2], x[2 * kb][3]),
                                  pack2<T>(x[2 * kb + 1][0], x[2 * kb + 1][1]),
                                  pack2<T>(x[2 * kb + 1][2], x[2 * kb + 1][3])};
#pragma unroll
          for (int db = 0; db < D / 16; ++db) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4_t(b0, b1, b2, b3, sB + swz<CH>(kb * 16 + (lane % 8) + 8 * ((lane / 8) % 2), db * 2 + lane / 16));
            mma16816<T>(acc[2 * db], pf, b0, b1);
            mma16816<T>(acc[2 * db + 1], pf, b2, b3);
          }
        }
      };

      // S^T = K Q^T, then P^T = 2^(S^T * scale * log2e - lse2[query]), 0 where the rule hides the pair.
      float s[BQ / 8][4];
      gemm_rows_by_queries(s, sK, kf, sQ);
#pragma unroll
      for (int j = 0; j < BQ / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = j * 8 + 2 * tig + e;
          const float l2 = lse2s[col];
          const KeyRange kr = masked ? unpack_range(qrng[col]) : KeyRange{};
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float& x = s[j][2 * hf + e];
            const bool vis = !masked || kr.sees(xk[hf]);
            x = vis ? ex2(fmaf(x, a.scale_log2, -l2)) : 0.f;
          }
        }
      gemm_accumulate(dv, s, sO);  // dV += P^T dO

      // dP^T = V dO^T, then dS^T = P^T (dP^T - Delta[query]).
      float dp[BQ / 8][4];
      gemm_rows_by_queries(dp, sV, vf, sO);
#pragma unroll
      for (int j = 0; j < BQ / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float dl = dels[j * 8 + 2 * tig + e];
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) dp[j][2 * hf + e] = s[j][2 * hf + e] * (dp[j][2 * hf + e] - dl);
        }
      gemm_accumulate(dk, dp, sQ);  // dK += dS^T Q (times scale at the end)

      if (!more) break;
      masked = nmasked;
      stage ^= 1;
      __syncthreads();  // every warp is done with this stage before the next iteration refills it
    }
  }

  // Epilogue: the whole list -> dk (times scale), dv in the input dtype; a segment -> fp32 partials.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = warp * 16 + gid + 8 * hf, g = tb + row;
    if (g < te) store_dkdv_row<T, D, BKV>(a, pl, item.slot, b, hk, row, g, hf, tig, &dk[0][0], &dv[0][0]);
  }
}

// PACKED: the item's key tile is one stream's (v.ktiles); the CTA runs as for a call on that stream alone
// (detail::stream_item).
template <class K, bool PACKED>
__global__ void __launch_bounds__(K::THREADS, K::MINB)
    dkdv_kernel(const BwdArgs a, const PlanArgs pl, const varlen::Tables v) {
  const detail::DkvCta cta = detail::dkdv_cta(a.B, a.Hkv);
  if (cta.item >= pl.counters[0]) return;
  if constexpr (PACKED) {
    const detail::StreamItem si = detail::stream_item<typename K::T, K::D>(a, pl, v, pl.items[cta.item]);
    dkdv_cta<K>(si.a, si.pl, si.item, cta.b, cta.hk);
  } else {
    dkdv_cta<K>(a, pl, pl.items[cta.item], cta.b, cta.hk);
  }
}

// ---- pass 4: sum the partials of split key tiles in segment order
template <class T, int D, int BKV>
__global__ void __launch_bounds__(256) reduce_kernel(const BwdArgs a, const PlanArgs pl, const varlen::Tables v) {
  if (int(blockIdx.x) >= pl.counters[1]) return;
  const PlanSplit sp = pl.splits[blockIdx.x];
  const int hk = int(blockIdx.y), b = int(blockIdx.z);
  int64_t tb, te, row0 = 0;
  Layout32 l32 = a.l32;
  if (v.ktiles) {  // packed: the key tile in its stream
    const varlen::KeyTile r = v.ktiles[sp.kt];
    const varlen::Seq s = v.seqs[r.seq];
    KeyTileGrid(Layout(a.lay.chunk_size, a.lay.S, s.l32.T, a.lay.summarize_tail), BKV).rows(r.kt, tb, te);
    l32 = s.l32;
    row0 = s.row0;
  } else {
    KeyTileGrid(a.lay, BKV).rows(sp.kt, tb, te);
  }
  const int rows = int(te - tb);
  const int64_t slot_stride = int64_t(a.B) * a.Hkv * BKV * D, base = (int64_t(b) * a.Hkv + hk) * (BKV * D);
  for (int i = threadIdx.x; i < rows * (D / 4); i += blockDim.x) {
    const int row = i / (D / 4), c = (i % (D / 4)) * 4;
    float4 sk = make_float4(0.f, 0.f, 0.f, 0.f), sv = sk;
    for (int s = 0; s < sp.nseg; ++s) {
      const int64_t o = (int64_t(sp.slot0) + s) * slot_stride + base + int64_t(row) * D + c;
      const float4 x = *reinterpret_cast<const float4*>(pl.part_k + o);
      const float4 y = *reinterpret_cast<const float4*>(pl.part_v + o);
      sk.x += x.x, sk.y += x.y, sk.z += x.z, sk.w += x.w;
      sv.x += y.x, sv.y += y.y, sv.z += y.z, sv.w += y.w;
    }
    const int64_t srow = row0 + l32.stream_of_gathered(uint32_t(tb + row));
    *reinterpret_cast<uint2*>(row_ptr<T>(a.dk, b, srow, hk) + c) =
        make_uint2(pack2<T>(sk.x * a.scale, sk.y * a.scale), pack2<T>(sk.z * a.scale, sk.w * a.scale));
    *reinterpret_cast<uint2*>(row_ptr<T>(a.dv, b, srow, hk) + c) =
        make_uint2(pack2<T>(sv.x, sv.y), pack2<T>(sv.z, sv.w));
  }
}

// ---- pass 5 after a fused-dQ dK/dV pass (sm_90a): dq = scale * dq_acc in stream order; a thread per 8
// elements of one (gathered row, q head), consecutive threads along a stream row of dq.
template <class T, int D>
__global__ void __launch_bounds__(256) dq_store_kernel(const BwdArgs a, const varlen::Tables v) {
  constexpr int CH = D / 8;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int c = int(t % CH), h = int(t / CH % a.Hq), b = int(blockIdx.y);
  const int64_t g = t / CH / a.Hq;  // gathered row; packed: padded row (threads over [0, Lp))
  int64_t srow;
  if (v.seqs) {  // packed: the padded row's stream; its padding is not stored
    if (g >= a.Lp) return;
    const varlen::Seq s = v.seqs[v.row_blocks[g / kRowPad]];
    const int64_t gs = g - s.p0;
    if (gs >= s.L) return;
    srow = s.row0 + s.l32.stream_of_gathered(uint32_t(gs));
  } else {
    if (g >= a.L) return;
    srow = a.l32.stream_of_gathered(uint32_t(g));
  }
  if constexpr (D != 128) return;  // the fused pass and its accumulator layout (dq_acc_chunk) are D = 128 only
  // Padded rows: a stream's p0 is a multiple of 128, so its 64-row tiles are the accumulator's.
  const float* src =
      a.dq_acc + ((int64_t(b) * a.Hq + h) * a.Lp + g / 64 * 64) * D + detail::dq_acc_chunk(int(g % 64), c);
  const float4 x = *reinterpret_cast<const float4*>(src), y = *reinterpret_cast<const float4*>(src + 4);
  *reinterpret_cast<uint4*>(row_ptr<T>(a.dq, b, srow, h) + c * 8) =
      make_uint4(pack2<T>(x.x * a.scale, x.y * a.scale), pack2<T>(x.z * a.scale, x.w * a.scale),
                 pack2<T>(y.x * a.scale, y.y * a.scale), pack2<T>(y.z * a.scale, y.w * a.scale));
}

// ---- pass 5: dQ over the key tiles of KeyTileCursor (the forward's loop structure)
// One CTA: the query rows [g0, g1) (gathered order of a's stream) of head blockIdx.y, batch entry blockIdx.z.
template <class K>
__device__ __forceinline__ void dq_cta(const BwdArgs& a, int g0, int g1) {
  using T = typename K::T;
  constexpr int D = K::D, BK = K::BK, BQ = K::BQ, CH = K::CHUNKS;
  extern __shared__ __align__(128) uint8_t smem[];
  constexpr uint32_t KV = K::KV_BYTES;
  const uint32_t sQ = smem_u32(smem), sO = sQ + BQ * D * 2, sK0 = sO + BQ * D * 2, sV0 = sK0 + 2 * KV;

  const int h = int(blockIdx.y), b = int(blockIdx.z), hk = h / a.G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;

  KeyTileCursor cur(a.lay, key_spans(a.lay, a.W, g0, g1), BK);
  int64_t tb, te;
  bool masked;
  cur.next(tb, te, masked);  // every valid row sees itself: at least one tile

  load_tile<T, K::THREADS, CH>(a.l32, sQ, head_ptr<T>(a.q, b, h), a.q.r, g0, g1, BQ);
  load_tile<T, K::THREADS, CH>(a.l32, sO, head_ptr<T>(a.dout, b, h), a.dout.r, g0, g1, BQ);
  load_tile<T, K::THREADS, CH>(a.l32, sK0, head_ptr<T>(a.k, b, hk), a.k.r, int(tb), int(te), BK);
  load_tile<T, K::THREADS, CH>(a.l32, sV0, head_ptr<T>(a.v, b, hk), a.v.r, int(tb), int(te), BK);
  cp_async_commit();

  // This thread's query rows warp*16 + gid + 8*hf: key ranges, lse2 and Delta (padded entries: +inf and 0,
  // so rows past L get P = 0).
  RowKeyRanges rk[2];
  float l2[2], dl[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int g = g0 + warp * 16 + gid + 8 * hf;
    if (g < g1) rk[hf] = row_key_ranges(a.l32, a.W32, uint32_t(g));
    const int64_t i = (int64_t(b) * a.Hq + h) * a.Lp + g;
    l2[hf] = a.lse2[i];
    dl[hf] = a.delta[i];
  }
  float dq[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;

  const int arow = warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2);  // A-fragment rows (queries) of this lane
  // rows (queries) x keys = A (Q or dO rows) x B (K or V rows, non-transposed ldmatrix).
  auto gemm_rows_by_keys = [&](float(*acc)[4], uint32_t sA, uint32_t sB) {
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t af[4];
      ldsm_x4(af[0], af[1], af[2], af[3], sA + swz<CH>(arow, kk * 2 + lane / 16));
#pragma unroll
      for (int nb = 0; nb < BK / 16; ++nb) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3, sB + swz<CH>(nb * 16 + (lane % 8) + 8 * (lane / 16), kk * 2 + (lane / 8) % 2));
        mma16816<T>(acc[2 * nb], af, b0, b1);
        mma16816<T>(acc[2 * nb + 1], af, b2, b3);
      }
    }
  };

  int stage = 0;
  for (;;) {
    int64_t nb_, ne_;
    bool nmasked;
    const bool more = cur.next(nb_, ne_, nmasked);
    if (more) {
      load_tile<T, K::THREADS, CH>(a.l32, sK0 + (stage ^ 1) * KV, head_ptr<T>(a.k, b, hk), a.k.r, int(nb_), int(ne_),
                                   BK);
      load_tile<T, K::THREADS, CH>(a.l32, sV0 + (stage ^ 1) * KV, head_ptr<T>(a.v, b, hk), a.v.r, int(nb_), int(ne_),
                                   BK);
      cp_async_commit();
      cp_async_wait_one();
    } else {
      cp_async_wait_all();
    }
    __syncthreads();
    const uint32_t sK = sK0 + stage * KV, sV = sV0 + stage * KV;

    // S = Q K^T, P = 2^(S * scale * log2e - lse2[row]) (0 where hidden: span edges, or keys past a short tile).
    float s[BK / 8][4];
    gemm_rows_by_keys(s, sQ, sK);
    const bool need_mask = masked || (te - tb) < BK, text = tb < a.l32.T;
    const KeyRange kr[2] = {key_range(rk[0], text), key_range(rk[1], text)};
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int x_key = int(tb) + j * 8 + 2 * tig + e;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float& x = s[j][2 * hf + e];
          const bool vis = !need_mask || kr[hf].sees(x_key);
          x = vis ? ex2(fmaf(x, a.scale_log2, -l2[hf])) : 0.f;
        }
      }
    // dP = dO V^T, dS = P (dP - Delta[row]).
    float dp[BK / 8][4];
    gemm_rows_by_keys(dp, sO, sV);
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - dl[e / 2]);
        // dQ += dS K (K rows as the B operand through a transposed ldmatrix, like V in the forward).
#pragma unroll
    for (int kb = 0; kb < BK / 16; ++kb) {
      const uint32_t pf[4] = {pack2<T>(dp[2 * kb][0], dp[2 * kb][1]), pack2<T>(dp[2 * kb][2], dp[2 * kb][3]),
                              pack2<T>(dp[2 * kb + 1][0], dp[2 * kb + 1][1]),
                              pack2<T>(dp[2 * kb + 1][2], dp[2 * kb + 1][3])};
#pragma unroll
      for (int db = 0; db < D / 16; ++db) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(b0, b1, b2, b3, sK + swz<CH>(kb * 16 + (lane % 8) + 8 * ((lane / 8) % 2), db * 2 + lane / 16));
        mma16816<T>(dq[2 * db], pf, b0, b1);
        mma16816<T>(dq[2 * db + 1], pf, b2, b3);
      }
    }
    if (!more) break;
    tb = nb_;
    te = ne_;
    masked = nmasked;
    stage ^= 1;
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int g = g0 + warp * 16 + gid + 8 * hf;
    if (g >= g1) continue;
    T* out = row_ptr<T>(a.dq, b, a.l32.stream_of_gathered(uint32_t(g)), h);
    store_acc_row<T, D>(out, &dq[0][0], hf, tig, a.scale);
  }
}

// PACKED: CTA x takes work item v.tiles[x] (a query tile of one stream, run as for that stream alone);
// otherwise query tile x of the launch's one layout, the last (most summaries) first.
template <class K, bool PACKED>
__global__ void __launch_bounds__(K::THREADS, K::MINB)
    dq_kernel(const BwdArgs a, int num_qtiles, const varlen::Tables v) {
  if constexpr (PACKED) {
    const varlen::QueryTile w = v.tiles[blockIdx.x];
    dq_cta<K>(detail::stream_args<typename K::T, K::D>(a, v.seqs[w.seq]), w.g0, w.g1);
  } else {
    const int g0 = (num_qtiles - 1 - int(blockIdx.x)) * K::BQ;
    dq_cta<K>(a, g0, min(a.L, g0 + K::BQ));
  }
}

// --------------------------------------------------------------------------------------------- launcher
// The plan's sizes, workspace and kernels: attention_bwd_plan.cu (attention_bwd_plan_launch.cuh).
using detail::carve_plan;
using detail::Carver;
using detail::fill_plan_args;
using detail::launch_plan;
using detail::plan_sizes;
using detail::PlanSizes;
using detail::Workspace;

// The dK/dV and dQ passes on the sm_90a wgmma kernels (attention_bwd_sm90a.cu) where they run, unless the
// options ask for the portable ones.
bool use_sm90a(const KernelOptions& o) { return detail::sm90a_usable() && o.backward_sm90a; }

// dQ inside the sm_90a dK/dV pass (fp32 bulk reduce-adds) instead of its own pass: by default where it can
// run (sm_90a, D = 128) unless the caller asks for determinism; KernelOptions::backward_fused_dq = false turns
// it off. On the H200 (32/8 heads, D = 128, bf16) it measured backward 1.859 / 12.72 / 144.4 ms at
// T = 8K / 32K / 128K against 2.082 / 13.29 / 154.1 ms for the separate dQ pass in the same run.
bool use_fused_dq(bool sm90a, int D, bool deterministic, const KernelOptions& o) {
  return sm90a && D == 128 && !deterministic && o.backward_fused_dq;
}

// packed: the streams of a packed call (a.Lp their padded rows), else null.
template <class T, int D>
void run_backward(const BwdArgs& a0, bool deterministic, const KernelOptions& o, const varlen::Streams* packed,
                  cudaStream_t s) {
  using KV = typename Config<T, D>::Dkv;
  using KQ = typename Config<T, D>::Dq;
  BwdArgs a = a0;
  const bool sm90a = use_sm90a(o);  // the plan is built for the tiles of the dK/dV kernel that runs
  const bool fused_dq = use_fused_dq(sm90a, D, deterministic, o);
  const int64_t acc_floats = fused_dq ? int64_t(a.B) * a.Hq * a.Lp * D : 0;
  const int pBQ = sm90a ? detail::kDkvSm90Queries : KV::BQ, pBK = sm90a ? detail::kDkvSm90Keys : KV::BKV;
  const int dqBQ = sm90a ? detail::kDqSm90Queries : KQ::BQ;  // the dQ pass's query tiles
  const int64_t bh = int64_t(a.B) * a.Hkv;
  const int minb = sm90a ? 1 : KV::MINB;

  // Packed: the launch's tables (varlen_plan.hpp) in one host image, copied into the workspace: the streams,
  // the stream of each padded row block, the plan's key tiles (in its numbering) and the dQ pass's work items.
  detail::HostImage img;
  size_t o_seqs = 0, o_blocks = 0, o_ktiles = 0, o_dq = 0;
  int64_t n_dq_tiles = 0;
  PlanSizes ps;
  if (packed) {
    const varlen::KeyTiles kts = varlen::key_tiles(*packed, pBK);
    std::vector<varlen::QueryTile> dq_tiles;
    if (!fused_dq) dq_tiles = varlen::query_tiles(*packed, a.W, dqBQ);
    n_dq_tiles = int64_t(dq_tiles.size());
    if (n_dq_tiles >= (int64_t(1) << 31))
      fail("ksa::cuda::attention_backward: ", n_dq_tiles, " dQ tiles (over 2^31 - 1)");
    o_seqs = img.add(packed->seqs);
    o_blocks = img.add(varlen::row_blocks(*packed));
    o_ktiles = img.add(kts.tiles);
    o_dq = img.add(dq_tiles);
    int64_t longest = 0;  // rows of the longest stream: its query tiles bound every list
    for (const varlen::Seq& q : packed->seqs) longest = std::max<int64_t>(longest, q.L);
    ps = plan_sizes(a.Lp / pBQ, kts.ntext, int64_t(kts.tiles.size()), (longest + pBQ - 1) / pBQ, pBQ, pBK, bh, minb,
                    o.backward_split);
  } else {
    ps = plan_sizes(a.lay, pBQ, pBK, bh, minb, o.backward_split);
  }
  const int64_t part_floats = int64_t(a.B) * a.Hkv * pBK * D;  // one slot
  const int64_t rowvals = int64_t(a.B) * a.Hq * a.Lp;

  Carver measure;
  measure.take<float>(rowvals);
  measure.take<float>(rowvals);
  measure.take<float>(acc_floats);
  PlanArgs pl{};
  carve_plan(measure, pl, ps, part_floats);
  if (packed) measure.take<char>(int64_t(img.size()));
  Workspace ws(measure.off, s);
  Carver c{static_cast<char*>(ws.p), 0};
  a.lse2 = c.take<float>(rowvals);
  a.delta = c.take<float>(rowvals);
  a.dq_acc = fused_dq ? c.take<float>(acc_floats) : nullptr;
  if (fused_dq) KSA_CUDA_CHECK(cudaMemsetAsync(a.dq_acc, 0, size_t(acc_floats) * sizeof(float), s));
  carve_plan(c, pl, ps, part_floats);
  fill_plan_args(pl, ps);
  varlen::Tables v;  // null pointers for a plain call
  if (packed) {
    char* tables = c.take<char>(int64_t(img.size()));
    img.upload(tables, s);
    v.seqs = detail::HostImage::at<varlen::Seq>(tables, o_seqs);
    v.row_blocks = detail::HostImage::at<int32_t>(tables, o_blocks);
    v.tiles = n_dq_tiles > 0 ? detail::HostImage::at<varlen::QueryTile>(tables, o_dq) : nullptr;
    v.ktiles = detail::HostImage::at<varlen::KeyTile>(tables, o_ktiles);
  }

  const int64_t pre_blocks = (int64_t(a.Lp) * a.Hq * 8 + 255) / 256;
  if (pre_blocks >= (int64_t(1) << 31))
    fail("ksa::cuda::attention_backward: L*Hq too large (", int64_t(a.Lp) * a.Hq, ")");
  preprocess_kernel<T, D><<<dim3(unsigned(pre_blocks), unsigned(a.B)), 256, 0, s>>>(a, v);
  KSA_CUDA_CHECK_LAUNCH();
  launch_plan(a.lay, a.W, ps, pl, v, s);

  [[maybe_unused]] constexpr bool f16 = std::is_same_v<T, __half>;  // the sm_90a launchers' dtype
  const dim3 reduce_grid(unsigned(ps.max_splits), unsigned(a.Hkv), unsigned(a.B));
  if (sm90a) {
#if defined(KSA_HAVE_SM90A)
    detail::launch_dkdv_sm90a(a, pl, v, int(ps.max_items), D, f16, fused_dq, s);
#endif
    if (ps.max_splits > 0) reduce_kernel<T, D, detail::kDkvSm90Keys><<<reduce_grid, 256, 0, s>>>(a, pl, v);
  } else {
    auto kv = packed ? dkdv_kernel<KV, true> : dkdv_kernel<KV, false>;
    KSA_CUDA_CHECK(cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, KV::SMEM));
    kv<<<detail::dkdv_grid(ps.max_items, a.B, a.Hkv), KV::THREADS, KV::SMEM, s>>>(a, pl, v);
    KSA_CUDA_CHECK_LAUNCH();
    if (ps.max_splits > 0) reduce_kernel<T, D, KV::BKV><<<reduce_grid, 256, 0, s>>>(a, pl, v);
  }
  KSA_CUDA_CHECK_LAUNCH();

  if (fused_dq) {
    const int64_t rows = packed ? a.Lp : a.L;  // packed: threads over the padded rows (row_blocks finds the stream)
    const int64_t blocks = (rows * a.Hq * (D / 8) + 255) / 256;
    dq_store_kernel<T, D><<<dim3(unsigned(blocks), unsigned(a.B)), 256, 0, s>>>(a, v);
    KSA_CUDA_CHECK_LAUNCH();
  } else if (sm90a) {
#if defined(KSA_HAVE_SM90A)
    detail::launch_dq_sm90a(a, v, int(n_dq_tiles), D, f16, s);
#endif
  } else {
    auto qk = packed ? dq_kernel<KQ, true> : dq_kernel<KQ, false>;
    KSA_CUDA_CHECK(cudaFuncSetAttribute(qk, cudaFuncAttributeMaxDynamicSharedMemorySize, KQ::SMEM));
    const int nqt = packed ? int(n_dq_tiles) : (a.L + KQ::BQ - 1) / KQ::BQ;
    qk<<<dim3(unsigned(nqt), unsigned(a.Hq), unsigned(a.B)), KQ::THREADS, KQ::SMEM, s>>>(a, nqt, v);
    KSA_CUDA_CHECK_LAUNCH();
  }
  ws.release();
}

template <class T>
void dispatch_dim(const BwdArgs& a, int64_t D, bool deterministic, const KernelOptions& o,
                  const varlen::Streams* packed, cudaStream_t s) {
  if (D == 128) run_backward<T, 128>(a, deterministic, o, packed, s);
  else if (D == 64) run_backward<T, 64>(a, deterministic, o, packed, s);
  else fail("ksa::cuda::attention_backward: D=", D, " is not supported (64 or 128)");
}

}  // namespace

detail::DkvTiles detail::portable_dkv_tiles(int64_t D) {
  auto tiles = [](auto cfg) {
    using KV = typename decltype(cfg)::Dkv;
    return DkvTiles{KV::BQ, KV::BKV, KV::MINB};
  };
  if (D == 64) return tiles(Config<__nv_bfloat16, 64>{});
  if (D == 128) return tiles(Config<__nv_bfloat16, 128>{});
  fail("ksa::cuda::detail::portable_dkv_tiles: D=", D, " (64 or 128)");
}

dim3 detail::dkdv_grid(int64_t max_items, int64_t B, int64_t Hkv) {
  const int64_t n = max_items * B * Hkv;
  if (n >= (int64_t(1) << 31))
    fail("ksa::cuda::attention_backward: the dK/dV pass needs ", n, " CTAs (items x batch x KV heads), over 2^31 - 1");
  return dim3(unsigned(std::max<int64_t>(n, 1)));
}

bool supports(const AttentionBackwardParams& p, std::string* why, const KernelOptions& o) {
  if (!supports(static_cast<const AttentionParams&>(p), why, o)) return false;
  auto no = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  if (p.L() + kRowPad >= (int64_t(1) << 31)) return no("L: must be < 2^31 - 128 (got " + std::to_string(p.L()) + ")");
  // The passes read q, dout, out and lse of every row (the PyTorch binding pads the rows before q_begin).
  if (p.q_begin != 0)
    return no("q_begin: the CUDA backward takes every row (q_begin 0; got " + std::to_string(p.q_begin) + ")");
  if (o.backward_split < 0) return no("backward_split: must be >= 0 (got " + std::to_string(o.backward_split) + ")");
  return detail::views_aligned16({{"dout", &p.dout}, {"dq", &p.dq}, {"dk", &p.dk}, {"dv", &p.dv}}, why);
}

// p.deterministic: no floating-point atomics (the separate dQ pass); otherwise the fused dQ where it runs.
void attention_backward(const AttentionBackwardParams& p, CudaStream stream, const KernelOptions& o) {
  validate(p);
  std::string why;
  if (!supports(p, &why, o)) fail("ksa::cuda::attention_backward: unsupported: ", why);
  if (p.L() == 0) return;
  BwdArgs a{};
  // Packed: the streams' common k, S and tail; each CTA takes its stream's T from the tables.
  a.lay = p.packed() ? Layout(p.layout.chunk_size, p.layout.S, 0, p.layout.summarize_tail) : p.layout;
  a.l32 = Layout32(a.lay);
  a.W = p.W;
  a.W32 = detail::window32(p.W);
  a.B = int(p.B);
  a.Hq = int(p.Hq);
  a.Hkv = int(p.Hkv);
  a.G = int(p.group());
  a.L = int(p.L());
  const varlen::Streams streams = p.packed() ? varlen::streams_of(p) : varlen::Streams{};
  const varlen::Streams* pk = p.packed() ? &streams : nullptr;
  a.Lp = int(pk ? streams.padded_rows : (p.L() + kRowPad - 1) / kRowPad * kRowPad);
  a.scale = p.softmax_scale();
  a.scale_log2 = a.scale * kLog2e;
  a.q = view_of(p.q);
  a.k = view_of(p.k);
  a.v = view_of(p.v);
  a.out = view_of(p.out);
  a.dout = view_of(p.dout);
  a.dq = view_of(p.dq);
  a.dk = view_of(p.dk);
  a.dv = view_of(p.dv);
  a.lse = p.lse;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::bf16) dispatch_dim<__nv_bfloat16>(a, p.D, p.deterministic, o, pk, s);
  else dispatch_dim<__half>(a, p.D, p.deterministic, o, pk, s);
}

}  // namespace ksa::cuda
