// CUDA backward, Hopper passes (sm_90a only; attention_bwd.cu runs them instead of the portable dK/dV and dQ
// passes on compute capability 9.0), on the forward's pipeline (sm90a_pipeline.cuh). dK/dV: see
// dkdv_sm90a_kernel (the plan, splits and reduce of attention_bwd.cu are unchanged, built for its tiles).
//
// dQ: a CTA takes 128 query rows (gathered order) of one head, two consumer warpgroups of 64 rows, a producer
// warpgroup that loads Q and dO once and streams 64-key K/V tiles through 3 stages. Per tile, each consumer:
//   S = Q K^T, dP = dO V^T   wgmma m64n64k16, all operands from smem (K-major), issued together;
//   P = 2^(S*scale*log2e - lse2[row]) (0 where the row's key ranges exclude the key), dS = P (dP - Delta[row]);
//   dQ += dS K               wgmma m64nDk16, dS from registers, K from smem MN-major.
// dQ (times the softmax scale) is written in stream order. No atomics: deterministic (this pass runs when the
// caller asks for determinism, or with D = 64, or with KernelOptions::backward_fused_dq = false).
//
// Fused dQ (D = 128, not deterministic; the default there, see use_fused_dq in attention_bwd.cu):
// dkdvdq_sm90a_kernel computes dK, dV and dQ in one pass over the dK/dV plan, 5 instead of 7 matrix products
// per visible tile pair (the dQ pass, which recomputes S and dP, is skipped). Per (key tile, query step) each
// consumer owns 64 of the 128 keys and computes S = Q K^T and dP = dO V^T with the step's queries as rows (so
// lse2, Delta and the key ranges are two values per thread), stores P and dS to smem (stmatrix), then
// dV += P^T dO and dK += dS^T Q read P^T and dS^T from there (MN-major A), and, once both consumers' dS are
// in, dQ[:, 64 wg ..] = dS K (each consumer one 64-column half of D) goes through smem into an fp32
// accumulator with bulk reduce-adds (cp.reduce.async.bulk, one 4 KiB block per warp: the accumulator is kept in
// the consumers' fragment order, dq_acc_chunk).
// Measured on the H200 at T = 128K (32/8 heads, bf16; backward ms, one run each): the earlier fused kernel
// (dS^T orientation, 176 bytes of spills) 205.9; this orientation with red.add from registers 156.8 (without
// the adds, results wrong: 111.6), with red.add.v4 157.0, with each consumer's dQ over its own 64 keys and
// all of D (twice the adds) 194.9, with bulk reduce-adds 146.6 / 144.4; the separate dQ pass 152.7-154.1.
// Walking each item's query tiles backwards (so concurrent CTAs meet on the same dQ rows) gave 142.7 against
// 144.4 at 128K but 2.060 against 1.859 ms at 8K: not kept. One 4 KiB reduce-add per warp instead of 16 of 256
// bytes (issuing those 16 took ~15% of the kernel's warp stall samples in Nsight Compute at 32K) made no
// measurable difference: 140.8 / 141.3 ms against 142.1 / 141.0 at 128K, alternating in one run; kept as the
// simpler code. The same profile: DRAM at 51% of peak, tensor pipes 40% busy, L2 hit rate 42%.
//
// File shape (docs/design.md: kernel files): traits -> device code -> launcher.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "check.cuh"
#include "cuda/attention_bwd.cuh"
#include "cuda/mma.cuh"
#include "cuda/sm90a_pipeline.cuh"
#include "cuda/wgmma.cuh"
#include "ksa/error.hpp"

namespace ksa::cuda::detail {
namespace {

using namespace dev;

// ---------------------------------------------------------------------------------------------- traits
template <class T_, int D_>
struct DqSm90Traits {
  using T = T_;
  static constexpr int D = D_;
  static constexpr int BQ = 128;       // query rows per CTA, 64 per consumer warpgroup
  static constexpr int BK = 64;        // keys per tile (S and dP: 32 accumulators each per thread)
  static constexpr int STAGES = 3;     // K/V tiles in flight
  static constexpr int THREADS = 384;  // consumer warpgroups 0 and 1, producer warpgroup 2
  static constexpr int PRODUCER_REGS = 88, CONSUMER_REGS = 208;  // setmaxnreg (see regs_fit)
  static constexpr uint32_t Q_BYTES = BQ * D * 2, KV_BYTES = BK * D * 2;
  // Q, dO, then STAGES x (K, V), then one TileInfo per stage; +1 KiB to align on the swizzle period.
  static constexpr int SMEM = int(2 * Q_BYTES + STAGES * 2 * KV_BYTES) + STAGES * int(sizeof(TileInfo)) + 1024;
  static_assert(D == 64 || D == 128, "D must be 64 or 128");
  static_assert(kRowPad % BQ == 0, "lse2/Delta padding covers a whole query tile");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
  static_assert(regs_fit(PRODUCER_REGS, CONSUMER_REGS), "setmaxnreg budget");
};

template <class T_, int D_, bool DQ_>
struct DkvSm90Traits {
  using T = T_;
  static constexpr int D = D_;
  static constexpr bool DQ = DQ_;  // dkdvdq_sm90a_kernel: also dQ += dS K into BwdArgs::dq_acc (bulk reduce-adds)
  static constexpr int BKV = kDkvSm90Keys;    // key rows per CTA, 64 per consumer warpgroup
  static constexpr int BQ = kDkvSm90Queries;  // query rows per step (S, dP: 32 accumulators per thread)
  static constexpr int STAGES = DQ ? 2 : 3;   // query steps in flight (DQ: smem for 2)
  static constexpr int THREADS = 384;         // consumer warpgroups 0 and 1, producer warpgroup 2
  // setmaxnreg (see regs_fit). ptxas -v at D = 128: the producer spills below 56 registers; the dK/dV
  // consumers fit in 224, the fused ones need more (40/232: the producer's 60 bytes of spills).
  static constexpr int PRODUCER_REGS = DQ ? 40 : 56, CONSUMER_REGS = DQ ? 232 : 224;
  static constexpr uint32_t KV_BYTES = BKV * D * 2, QS_BYTES = BQ * D * 2;
  // A stage: Q and dO tiles, lse2 and Delta of the step's queries, and each query's visible key range in the
  // key tile's region (int2). Stages start on 1024-byte boundaries (the swizzle period).
  static constexpr uint32_t STAGE_BYTES = (2 * QS_BYTES + 2 * BQ * 4 + BQ * 8 + 1023) / 1024 * 1024;
  // DQ: a P tile and two dS tiles (the step's 64 queries x 128 keys, 128B-swizzled, keys along the rows: one
  // 64-key column block per consumer), the dS tiles used in turn by consecutive steps.
  static constexpr uint32_t P_BYTES = DQ ? BQ * BKV * 2 : 0, DS_BYTES = P_BYTES;
  static constexpr uint32_t STG_BYTES = DQ ? 8 * 4096 : 0;  // DQ: each consumer warp's fp32 dQ staging area
  static constexpr int SMEM = int(2 * KV_BYTES + STAGES * STAGE_BYTES + P_BYTES + 2 * DS_BYTES + STG_BYTES) +
                              STAGES * int(sizeof(TileInfo)) + 1024;
  static_assert(D == 64 || D == 128, "D must be 64 or 128");
  static_assert(!DQ || (D == 128 && BQ == 64 && BKV == 128), "the fused dQ: one 64-column half of D per consumer");
  static_assert(kRowPad % BQ == 0, "lse2/Delta padding covers a whole query step");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
  static_assert(regs_fit(PRODUCER_REGS, CONSUMER_REGS), "setmaxnreg budget");
};

// ------------------------------------------------------------------------------------------ device code
// One CTA: the query rows [g0, g1) (gathered order of a's stream) of head blockIdx.y, batch entry blockIdx.z.
template <class K>
__device__ __forceinline__ void dq_sm90a_cta(const BwdArgs& a, int g0, int g1) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename K::T;
  using B = Bars<K::STAGES>;
  constexpr int D = K::D, BQ = K::BQ, BK = K::BK, NS = BK / 2, NO = D / 2;
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t sQ = (smem_u32(smem) + 1023u) & ~1023u, sO = sQ + K::Q_BYTES, sKV = sO + K::Q_BYTES;
  TileInfo* info = reinterpret_cast<TileInfo*>(smem + (sKV - smem_u32(smem)) + K::STAGES * 2 * K::KV_BYTES);

  const int h = int(blockIdx.y), b = int(blockIdx.z), hk = h / a.G;
  const int wg = int(threadIdx.x) / 128;
  if (wg == 2) {
    setmaxnreg_dec<K::PRODUCER_REGS>();
    const T *qb = head_ptr<T>(a.q, b, h), *ob = head_ptr<T>(a.dout, b, h);
    const T *kb = head_ptr<T>(a.k, b, hk), *vb = head_ptr<T>(a.v, b, hk);
    produce<K::STAGES>(
        sKV, 2 * K::KV_BYTES, info,
        [&] {
          load_rows<T, D, BQ>(a.l32, sQ, qb, a.q.r, g0, g1);
          load_rows<T, D, BQ>(a.l32, sO, ob, a.dout.r, g0, g1);
        },
        KeyTiles<BK>(a.lay, a.W, g0, g1),
        [&](uint32_t st, const TileInfo& t) {
          load_rows<T, D, BK>(a.l32, st, kb, a.k.r, t.begin, t.end);
          load_rows<T, D, BK>(a.l32, st + K::KV_BYTES, vb, a.v.r, t.begin, t.end);
        });
    return;
  }
  setmaxnreg_inc<K::CONSUMER_REGS>();

  // This thread's rows r0 and r0 + 8 (hf = 0, 1): key ranges, lse2 and Delta (padded entries past L are +inf
  // and 0, so those rows get P = 0).
  const int warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32, gid = lane / 4, tig = lane % 4;
  const int r0 = wg * 64 + warp * 16 + gid;
  RowKeyRanges rk[2];
  float l2[2], dl[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int g = g0 + r0 + 8 * hf;
    if (g < g1) rk[hf] = row_key_ranges(a.l32, a.W32, uint32_t(g));
    const int64_t i = (int64_t(b) * a.Hq + h) * a.Lp + g;
    l2[hf] = a.lse2[i];
    dl[hf] = a.delta[i];
  }
  float dq[NO];
#pragma unroll
  for (int x = 0; x < NO; ++x) dq[x] = 0.f;

  // The dQ product of step i runs on the tensor cores while step i + 1's S and dP are issued: it is waited
  // for together with them, and only then is step i's stage (whose K it reads) released. (The same overlap
  // in the dK/dV pass makes ptxas serialize its wgmmas at D = 128 for want of registers.)
  int prev_st = -1;
  uint32_t df[BK / 16][4] = {};  // dS as A fragments: read by the dQ product until it is waited for
  for (int i = 0;; ++i) {
    const int st = i % K::STAGES;
    B::wait_full(st, wg);
    const TileInfo t = info[st];
    const uint32_t sK = sKV + uint32_t(st) * 2 * K::KV_BYTES, sV = sK + K::KV_BYTES;

    // S = Q K^T and dP = dO V^T (64 rows x 64 keys each), issued in turn with the other consumer.
    float s[NS], dp[NS];
    B::products_in_turn(wg, i, !t.last, [&] {  // the wait also covers the previous step's dQ product
      wgmma_ss_rows<T, BK, D, BQ>(s, sQ, wg * 64, sK);
      wgmma_ss_rows<T, BK, D, BQ>(dp, sO, wg * 64, sV);
    });
    fence_reg(s);
    fence_reg(dp);
    fence_reg(dq);
    fence_reg(df);
    if (prev_st >= 0) B::release(prev_st);

    // P and dS = P (dP - Delta) in place of dP; hidden pairs (outside the row's key range) get P = 0.
    const bool text = t.begin < a.lay.T;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const KeyRange kr = key_range(rk[hf], text);
#pragma unroll
      for (int j = 0; j < BK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int x = t.begin + 8 * j + 2 * tig + e, idx = 4 * j + 2 * hf + e;
          const bool vis = !t.masked || kr.sees(x);
          const float p = vis ? ex2(fmaf(s[idx], a.scale_log2, -l2[hf])) : 0.f;
          dp[idx] = p * (dp[idx] - dl[hf]);
        }
    }
    // dQ += dS K: dS (input dtype) as A fragments, one 16-key step per wgmma, K rows MN-major.
    to_a_frags<T>(dp, df);
    fence_reg(dq);
    wgmma_fence();
    wgmma_rs_rows<T, D, BK>(dq, df, sK);
    wgmma_commit();
    fence_reg(dq);
    prev_st = st;
    if (t.last) break;
  }
  wgmma_wait<0>();
  fence_reg(dq);
  B::release(prev_st);

  // dQ (times the softmax scale) in stream order.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int g = g0 + r0 + 8 * hf;
    if (g >= g1) continue;
    store_acc_row<T, D>(row_ptr<T>(a.dq, b, a.l32.stream_of_gathered(uint32_t(g)), h), dq, hf, tig, a.scale);
  }
#endif
}

// PACKED: CTA x takes work item v.tiles[x] (a query tile of one stream, run as for that stream alone);
// otherwise query tile x of the launch's one layout, the heaviest (most summaries) first.
template <class K, bool PACKED>
__global__ void __launch_bounds__(K::THREADS, 1)
    dq_sm90a_kernel(const BwdArgs a, int num_qtiles, const varlen::Tables v) {
  if constexpr (PACKED) {
    const varlen::QueryTile w = v.tiles[blockIdx.x];
    dq_sm90a_cta<K>(stream_args<typename K::T, K::D>(a, v.seqs[w.seq]), w.g0, w.g1);
  } else {
    const int g0 = (num_qtiles - 1 - int(blockIdx.x)) * K::BQ;
    dq_sm90a_cta<K>(a, g0, min(a.L, g0 + K::BQ));
  }
}

// The dK/dV passes' CTA: its plan item's key tile (gathered rows [tb, te) of a's stream), the smem carve-up
// (K, V, then the stages, then with DQ the P and dS tiles, then one TileInfo per stage) and the step count.
template <class K>
struct DkvCtaState {
  bwd::PlanItem item;
  int hk, b, tb, te, nsteps;
  int64_t tb64, te64;
  uint32_t sK, sV, sS0, sP, sDS, sStg;
  uint8_t* gS0;  // the stages through a generic pointer (lse2, Delta, ranges)
  TileInfo* info;
  __device__ DkvCtaState(const BwdArgs& a, const bwd::PlanItem& it, const DkvCta& cta, uint8_t* smem)
      : item(it), hk(cta.hk), b(cta.b) {
    sK = (smem_u32(smem) + 1023u) & ~1023u;
    sV = sK + K::KV_BYTES;
    sS0 = sV + K::KV_BYTES;
    sP = sS0 + K::STAGES * K::STAGE_BYTES;
    sDS = sP + K::P_BYTES;
    sStg = sDS + 2 * K::DS_BYTES;
    gS0 = smem + (sS0 - smem_u32(smem));
    info = reinterpret_cast<TileInfo*>(gS0 + K::STAGES * K::STAGE_BYTES + K::P_BYTES + 2 * K::DS_BYTES + K::STG_BYTES);
    KeyTileGrid(a.lay, K::BKV).rows(item.kt, tb64, te64);
    tb = int(tb64);
    te = int(te64);
    nsteps = (item.e1 - item.e0) * a.G;
  }
  // Stage st: its Q tile (dO follows), and the lse2 [BQ], Delta [BQ] and key ranges [BQ] after dO.
  __device__ uint32_t stage_q(int st) const { return sS0 + uint32_t(st) * K::STAGE_BYTES; }
  __device__ const float* stage_lse2(int st) const {
    return reinterpret_cast<const float*>(gS0 + uint32_t(st) * K::STAGE_BYTES + 2 * K::QS_BYTES);
  }
  __device__ const int2* stage_ranges(int st) const {
    return reinterpret_cast<const int2*>(gS0 + uint32_t(st) * K::STAGE_BYTES + 2 * K::QS_BYTES + 2 * K::BQ * 4);
  }
  // Consumer wg's step i: waits until its stage is full, then what the stage holds.
  struct Step {
    int st;
    TileInfo t;
    uint32_t sQ, sO;            // Q and dO tiles
    const float *lse2, *delta;  // [BQ] each
    const int2* ranges;         // [BQ]
  };
  __device__ Step wait_step(int i, int wg) const {
    const int st = i % K::STAGES;
    Bars<K::STAGES>::wait_full(st, wg);
    const float* lse2 = stage_lse2(st);
    return Step{st, info[st], stage_q(st), stage_q(st) + K::QS_BYTES, lse2, lse2 + K::BQ, stage_ranges(st)};
  }
};

// The dK/dV passes' producer warpgroup: the key tile's K and V once, then per step (query tile of the item's
// entries, query head of the group) Q, dO, lse2 and Delta of the step's queries and each query's key range
// in the key tile's region.
template <class K>
__device__ __forceinline__ void dkdv_produce(const BwdArgs& a, const PlanArgs& pl, const DkvCtaState<K>& c) {
  using T = typename K::T;
  constexpr int D = K::D, BQ = K::BQ, BKV = K::BKV;
  if (c.nsteps == 0) return;
  const bool text_keys = c.tb64 < a.lay.T;
  EntryWalk walk(pl.runs + int64_t(c.item.kt) * bwd::kMaxRuns, c.item.e0, c.hk * a.G, a.G);
  int step = 0;
  auto next = [&](TileInfo& t) {
    if (step >= c.nsteps) return false;
    if (step > 0) walk.next();
    ++step;
    const int g0 = walk.qt * BQ, g1 = min(a.L, g0 + BQ);
    const bool masked = g1 - g0 < BQ || !pl.spans[walk.qt].full_over(c.tb64, c.te64);
    t = TileInfo{g0, g1, int32_t(masked), walk.h, 0, {0, 0, 0}};
    return true;
  };
  auto first = [&] {
    load_rows<T, D, BKV>(a.l32, c.sK, head_ptr<T>(a.k, c.b, c.hk), a.k.r, c.tb, c.te);
    load_rows<T, D, BKV>(a.l32, c.sV, head_ptr<T>(a.v, c.b, c.hk), a.v.r, c.tb, c.te);
  };
  auto load = [&](uint32_t st, const TileInfo& t) {
    load_rows<T, D, BQ>(a.l32, st, head_ptr<T>(a.q, c.b, t.aux), a.q.r, t.begin, t.end);
    load_rows<T, D, BQ>(a.l32, st + K::QS_BYTES, head_ptr<T>(a.dout, c.b, t.aux), a.dout.r, t.begin, t.end);
    const int r = int(threadIdx.x) - 256;
    const uint32_t rv = st + 2 * K::QS_BYTES;  // lse2 [BQ] floats, Delta [BQ] floats, ranges [BQ] int2
    if (r < BQ / 2) {  // BQ floats each: 16-byte chunks, contiguous and aligned (Lp % kRowPad == 0)
      const bool is_delta = r >= BQ / 4;
      const int ch = is_delta ? r - BQ / 4 : r;
      const int64_t off = (int64_t(c.b) * a.Hq + t.aux) * a.Lp + t.begin;
      cp_async16(rv + (is_delta ? BQ * 4 : 0) + ch * 16, (is_delta ? a.delta : a.lse2) + off + ch * 4, true);
    }
    if (r < BQ) {
      const int g = t.begin + r;
      reinterpret_cast<int2*>(c.gS0 + (rv - c.sS0) + 2 * BQ * 4)[r] =
          key_range(a.l32, a.W32, g, t.end, text_keys).packed();
    }
  };
  produce<K::STAGES>(c.sS0, K::STAGE_BYTES, c.info, first, next, load);
}

// dK/dV: the CTA's key tile (K, V loaded once) against the query steps of its plan item (query tile, query
// head of the group), streamed by the producer with their lse2, Delta and key ranges. Per step, each consumer
// (64 keys): S^T = K Q^T and dP^T = V dO^T (wgmma m64n64k16, smem operands), P^T = 2^(S^T*scale*log2e -
// lse2[query]) (0 outside the query's key range), dS^T = P^T (dP^T - Delta[query]); dV += P^T dO and
// dK += dS^T Q (wgmma m64nDk16, P^T and dS^T from registers, dO and Q MN-major).
template <class K>
__device__ __forceinline__ void dkdv_sm90a_cta(const BwdArgs& a, const PlanArgs& pl, const bwd::PlanItem& item,
                                               const DkvCta& cta) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename K::T;
  using B = Bars<K::STAGES>;
  constexpr int D = K::D, BQ = K::BQ, BKV = K::BKV, NS = BQ / 2, NO = D / 2;
  extern __shared__ __align__(1024) uint8_t smem[];
  const DkvCtaState<K> c(a, item, cta, smem);
  const int wg = int(threadIdx.x) / 128;
  if (wg == 2) {
    setmaxnreg_dec<K::PRODUCER_REGS>();
    dkdv_produce<K>(a, pl, c);
    return;
  }
  setmaxnreg_inc<K::CONSUMER_REGS>();

  // This thread's key rows r0 and r0 + 8 of the tile (hf = 0, 1).
  const int warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32, gid = lane / 4, tig = lane % 4;
  const int r0 = wg * 64 + warp * 16 + gid;
  const int xk[2] = {c.tb + r0, c.tb + r0 + 8};
  float dk[NO], dv[NO];
#pragma unroll
  for (int x = 0; x < NO; ++x) dk[x] = dv[x] = 0.f;

  for (int i = 0; i < c.nsteps; ++i) {
    const auto [st, t, sQ, sO, lse2s, dels, rng] = c.wait_step(i, wg);

    // S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries each), issued in turn with the other consumer.
    float s[NS], dp[NS];
    B::products_in_turn(wg, i, i + 1 < c.nsteps, [&] {
      wgmma_ss_rows<T, BQ, D, BKV>(s, c.sK, wg * 64, sQ);
      wgmma_ss_rows<T, BQ, D, BKV>(dp, c.sV, wg * 64, sO);
    });
    fence_reg(s);
    fence_reg(dp);

    // P^T in s, dS^T in dp; columns are the step's queries.
#pragma unroll
    for (int j = 0; j < BQ / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * tig + e;
        const float l2 = lse2s[col], dl = dels[col];
        const KeyRange kr = unpack_range(rng[col]);
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int idx = 4 * j + 2 * hf + e;
          const bool vis = !t.masked || kr.sees(xk[hf]);
          const float p = vis ? ex2(fmaf(s[idx], a.scale_log2, -l2)) : 0.f;
          s[idx] = p;
          dp[idx] = p * (dp[idx] - dl);
        }
      }
    uint32_t pf[BQ / 16][4], df[BQ / 16][4];
    to_a_frags<T>(s, pf);
    to_a_frags<T>(dp, df);
    // dV += P^T dO, dK += dS^T Q (times scale at the end): one 16-query step per wgmma.
    fence_reg(dk);
    fence_reg(dv);
    wgmma_fence();
    wgmma_rs_rows<T, D, BQ>(dv, pf, sO);
    wgmma_rs_rows<T, D, BQ>(dk, df, sQ);
    wgmma_commit();
    wgmma_wait<0>();
    fence_reg(dk);
    fence_reg(dv);
    B::release(st);
  }

  // The whole list -> dk (times scale), dv in the input dtype; a segment -> fp32 partials (reduce_kernel).
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = r0 + 8 * hf, g = c.tb + row;
    if (g < c.te) store_dkdv_row<T, D, BKV>(a, pl, c.item.slot, c.b, c.hk, row, g, hf, tig, dk, dv);
  }
#endif
}

// PACKED: the item's key tile is one stream's (v.ktiles); the CTA runs as for that stream alone
// (stream_item). CTAs past the plan's item count return at once.
template <class K, bool PACKED>
__global__ void __launch_bounds__(K::THREADS, 1)
    dkdv_sm90a_kernel(const BwdArgs a, const PlanArgs pl, const varlen::Tables v) {
  const DkvCta cta = dkdv_cta(a.B, a.Hkv);
  if (cta.item >= pl.counters[0]) return;  // the whole CTA: past the plan's items
  if constexpr (PACKED) {
    const StreamItem si = stream_item<typename K::T, K::D>(a, pl, v, pl.items[cta.item]);
    dkdv_sm90a_cta<K>(si.a, si.pl, si.item, cta);
  } else {
    dkdv_sm90a_cta<K>(a, pl, pl.items[cta.item], cta);
  }
}

// The fused kernel's dQ staging: lane (4 gid + tig) of warp w in consumer wg stores its float2 of rows
// 16 w + gid + 8 hf, columns 64 wg + 8 j + 2 tig at float ((2 j + hf) 32 + lane) 2 of the warp's 1024, which
// is where dq_acc_chunk puts them (checked for every lane, j and hf).
constexpr bool dq_staging_matches_acc_layout() {
  for (int wg = 0; wg < 2; ++wg)
    for (int w = 0; w < 4; ++w)
      for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < 8; ++j)
          for (int hf = 0; hf < 2; ++hf) {
            const int r = 16 * w + lane / 4 + 8 * hf, base = dq_acc_chunk(16 * w, 8 * wg);
            if (((2 * j + hf) * 32 + lane) * 2 != dq_acc_chunk(r, 8 * wg + j) + 2 * (lane % 4) - base) return false;
          }
  return true;
}
static_assert(dq_staging_matches_acc_layout(), "the fused dQ staging order is dq_acc_chunk's");

// dK/dV and dQ in one pass (D = 128; see the top of this file). Per step, consumer wg owns keys
// [64 wg, 64 wg + 64) of the tile; its threads hold query rows qr and qr + 8 of the step (hf = 0, 1):
//   S = Q K_wg^T, dP = dO V_wg^T      wgmma m64n64k16, smem operands, issued in turn with the other consumer;
//   P = 2^(S*scale*log2e - lse2[row]) (0 outside the row's key range), dS = P (dP - Delta[row]);
//   P -> sP, dS -> sDS[i & 1]          stmatrix, this consumer's 64-key column block of each;
//   dV += P_wg^T dO, dK += dS_wg^T Q   wgmma m64n128k16, A MN-major from sP / sDS, dO and Q MN-major;
//   dQ[:, 64 wg ..] += dS K[:, 64 wg ..] over all 128 keys once both consumers' dS are in; through the
//                                      warp's staging area in smem, bulk reduce-added into dq_acc.
template <class K>
__device__ __forceinline__ void dkdvdq_sm90a_cta(const BwdArgs& a, const PlanArgs& pl, const bwd::PlanItem& item,
                                                 const DkvCta& cta) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename K::T;
  using B = Bars<K::STAGES>;
  constexpr int D = K::D, BQ = K::BQ, BKV = K::BKV, NS = 32, NO = D / 2;
  static_assert(K::DQ, "the fused kernel's traits");
  extern __shared__ __align__(1024) uint8_t smem[];
  const DkvCtaState<K> c(a, item, cta, smem);
  const int wg = int(threadIdx.x) / 128;
  if (wg == 2) {
    setmaxnreg_dec<K::PRODUCER_REGS>();
    dkdv_produce<K>(a, pl, c);
    return;
  }
  setmaxnreg_inc<K::CONSUMER_REGS>();
  constexpr int kWgBar = B::kFree, kBothBar = B::kFree + 2;  // this consumer's 128 threads; both consumers

  const int warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32, gid = lane / 4, tig = lane % 4;
  const int qr = warp * 16 + gid;            // this thread's query rows qr, qr + 8 of the step
  const int kx0 = c.tb + wg * 64 + 2 * tig;  // the key of its column 8j + e: kx0 + 8j + e
  float dk[NO], dv[NO];
#pragma unroll
  for (int x = 0; x < NO; ++x) dk[x] = dv[x] = 0.f;

  for (int i = 0; i < c.nsteps; ++i) {
    const auto [st, t, sQ, sO, lse2s, dels, rng] = c.wait_step(i, wg);

    // S = Q K_wg^T and dP = dO V_wg^T (64 queries x 64 keys each).
    float s[NS], dp[NS];
    B::products_in_turn(wg, i, i + 1 < c.nsteps, [&] {
      wgmma_ss_rows<T, 64, D, BQ, BKV>(s, sQ, 0, c.sK, wg * 64);
      wgmma_ss_rows<T, 64, D, BQ, BKV>(dp, sO, 0, c.sV, wg * 64);
    });
    fence_reg(s);
    fence_reg(dp);

    // P in s, dS in dp (rows: the step's queries; padded rows have lse2 = +inf, so P = 0).
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l2 = lse2s[qr + 8 * hf], dl = dels[qr + 8 * hf];
      const KeyRange kr = t.masked ? unpack_range(rng[qr + 8 * hf]) : KeyRange{INT_MIN, INT_MAX};
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int idx = 4 * j + 2 * hf + e, x = kx0 + 8 * j + e;
          const float p = kr.sees(x) ? ex2(fmaf(s[idx], a.scale_log2, -l2)) : 0.f;
          s[idx] = p;
          dp[idx] = p * (dp[idx] - dl);
        }
    }
    // P and dS (input dtype) into this consumer's 64-key column block of sP and sDS[i & 1]. Matrix m of the
    // fragments of k-step kb holds rows 8 (m & 1) .. + 8 of the warp's 16 and keys 16 kb + 8 (m >> 1) .. + 8.
    // sP was last read by this consumer's dV product of the previous step (waited for); sDS[i & 1] by the
    // other consumer's dQ product two steps ago, waited for before it passed the previous step's kBothBar.
    const uint32_t sDSi = c.sDS + uint32_t(i & 1) * K::DS_BYTES;
    {
      uint32_t pf[4][4], df[4][4];
      to_a_frags<T>(s, pf);
      to_a_frags<T>(dp, df);
      const int m = lane >> 3, rr = warp * 16 + 8 * (m & 1) + (lane & 7);
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) {
        const uint32_t off = sw128<BQ>(rr, wg * 8 + 2 * kb + (m >> 1));
        stmatrix_x4(c.sP + off, pf[kb][0], pf[kb][1], pf[kb][2], pf[kb][3]);
        stmatrix_x4(sDSi + off, df[kb][0], df[kb][1], df[kb][2], df[kb][3]);
      }
    }
    fence_proxy_async();  // st.shared before the wgmma (async proxy) reads
    bar_sync(kWgBar + wg, 128);
    const uint32_t pw = c.sP + uint32_t(wg) * (BQ * 128), dsw = sDSi + uint32_t(wg) * (BQ * 128);
    // dV += P_wg^T dO, dK += dS_wg^T Q (times scale at the end): one 16-query step per wgmma.
    fence_reg(dk);
    fence_reg(dv);
    wgmma_fence();
#pragma unroll
    for (int kq = 0; kq < BQ / 16; ++kq)
      wgmma_ss_tt<T, D>(dv, desc_sw128(pw + kq * 2048, BQ * 128, 1024), desc_sw128(sO + kq * 2048, BQ * 128, 1024));
#pragma unroll
    for (int kq = 0; kq < BQ / 16; ++kq)
      wgmma_ss_tt<T, D>(dk, desc_sw128(dsw + kq * 2048, BQ * 128, 1024), desc_sw128(sQ + kq * 2048, BQ * 128, 1024));
    wgmma_commit();
    // dQ[:, 64 wg + (0..63)] = dS K[:, 64 wg + (0..63)] over the tile's 128 keys.
    bar_sync(kBothBar, 256);
    float dqa[32];
#pragma unroll
    for (int x = 0; x < 32; ++x) dqa[x] = 0.f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BKV / 16; ++kk)
      wgmma_ss_tb<T, 64>(dqa, desc_sw128(sDSi + (kk / 4) * (BQ * 128) + (kk % 4) * 32, 16, 1024),
                         desc_sw128(c.sK + wg * (BKV * 128) + kk * 2048, BKV * 128, 1024), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_reg(dk);
    fence_reg(dv);
    fence_reg(dqa);
    B::release(st);
    // Rows past L belong to the padded [L, Lp) range (their dS is 0); dq_acc has Lp rows.
    // This warp's 16 rows x 64 columns (4 KiB) through its staging area in the accumulator's fragment layout
    // (dq_acc_chunk): each float2 store of the warp fills 256 contiguous bytes (no bank conflicts), and the
    // warp's part is one bulk reduce-add, issued by lane 0.
    const uint32_t stg = c.sStg + uint32_t(wg * 4 + warp) * 4096;
    if (i > 0) {
      if (lane == 0) bulk_wait_read0();  // this warp's staging area of the previous step has been read
      __syncwarp();
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        st_shared_f32x2(stg + uint32_t((j * 2 + hf) * 32 + lane) * 8, dqa[4 * j + 2 * hf], dqa[4 * j + 2 * hf + 1]);
    fence_proxy_async();
    __syncwarp();
    if (lane == 0) {
      float* dst = a.dq_acc + ((int64_t(c.b) * a.Hq + t.aux) * a.Lp + t.begin) * D + dq_acc_chunk(warp * 16, wg * 8);
      bulk_reduce_add_f32(dst, stg, 4096);
      bulk_commit();
    }
  }
  if (lane == 0) bulk_wait0();  // the reduces are complete before the CTA's smem goes

  // The whole list -> dk (times scale), dv in the input dtype; a segment -> fp32 partials (reduce_kernel).
  // Accumulator rows are this consumer's keys (wgmma M = 64 keys).
  const int r0 = wg * 64 + warp * 16 + gid;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = r0 + 8 * hf, g = c.tb + row;
    if (g < c.te) store_dkdv_row<T, D, BKV>(a, pl, c.item.slot, c.b, c.hk, row, g, hf, tig, dk, dv);
  }
#endif
}

// As dkdv_sm90a_kernel.
template <class K, bool PACKED>
__global__ void __launch_bounds__(K::THREADS, 1)
    dkdvdq_sm90a_kernel(const BwdArgs a, const PlanArgs pl, const varlen::Tables v) {
  const DkvCta cta = dkdv_cta(a.B, a.Hkv);
  if (cta.item >= pl.counters[0]) return;  // the whole CTA: past the plan's items
  if constexpr (PACKED) {
    const StreamItem si = stream_item<typename K::T, K::D>(a, pl, v, pl.items[cta.item]);
    dkdvdq_sm90a_cta<K>(si.a, si.pl, si.item, cta);
  } else {
    dkdvdq_sm90a_cta<K>(a, pl, pl.items[cta.item], cta);
  }
}

// --------------------------------------------------------------------------------------------- launcher
// Packed when the plan's key tiles are streams' (v.ktiles).
template <class K>
void launch_dkdv(const BwdArgs& a, const PlanArgs& pl, const varlen::Tables& v, int max_items, cudaStream_t stream) {
  auto kern = [&] {
    if constexpr (K::DQ) return v.ktiles ? dkdvdq_sm90a_kernel<K, true> : dkdvdq_sm90a_kernel<K, false>;
    else return v.ktiles ? dkdv_sm90a_kernel<K, true> : dkdv_sm90a_kernel<K, false>;
  }();
  KSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, K::SMEM));
  kern<<<dkdv_grid(max_items, a.B, a.Hkv), K::THREADS, K::SMEM, stream>>>(a, pl, v);
  KSA_CUDA_CHECK_LAUNCH();
}

// Packed when v.tiles is set (num_tiles work items).
template <class K>
void launch(const BwdArgs& a, const varlen::Tables& v, int num_tiles, cudaStream_t stream) {
  auto kern = v.tiles ? dq_sm90a_kernel<K, true> : dq_sm90a_kernel<K, false>;
  KSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, K::SMEM));
  const int nqt = v.tiles ? num_tiles : (a.L + K::BQ - 1) / K::BQ;
  kern<<<dim3(unsigned(nqt), unsigned(a.Hq), unsigned(a.B)), K::THREADS, K::SMEM, stream>>>(a, nqt, v);
  KSA_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_dim(const BwdArgs& a, const varlen::Tables& v, int num_tiles, int D, cudaStream_t s) {
  static_assert(DqSm90Traits<T, 128>::BQ == kDqSm90Queries && DqSm90Traits<T, 64>::BQ == kDqSm90Queries,
                "the packed dQ tiles are built for kDqSm90Queries rows");
  if (D == 128) launch<DqSm90Traits<T, 128>>(a, v, num_tiles, s);
  else if (D == 64) launch<DqSm90Traits<T, 64>>(a, v, num_tiles, s);
  else fail("ksa::cuda::attention_backward (sm_90a dQ): D=", D, " is not supported (64 or 128)");
}

template <class T>
void launch_dkdv_dim(const BwdArgs& a, const PlanArgs& pl, const varlen::Tables& v, int max_items, int D, bool fused_dq,
                     cudaStream_t s) {
  if (fused_dq && D != 128)
    fail("ksa::cuda::attention_backward (sm_90a dK/dV): the fused dQ needs D=128 (got ", D, ")");
  if (fused_dq) launch_dkdv<DkvSm90Traits<T, 128, true>>(a, pl, v, max_items, s);
  else if (D == 128) launch_dkdv<DkvSm90Traits<T, 128, false>>(a, pl, v, max_items, s);
  else if (D == 64) launch_dkdv<DkvSm90Traits<T, 64, false>>(a, pl, v, max_items, s);
  else fail("ksa::cuda::attention_backward (sm_90a dK/dV): D=", D, " is not supported (64 or 128)");
}

}  // namespace

void launch_dkdv_sm90a(const BwdArgs& a, const PlanArgs& pl, const varlen::Tables& v, int max_items, int D, bool f16,
                       bool fused_dq, cudaStream_t stream) {
  if (f16) launch_dkdv_dim<__half>(a, pl, v, max_items, D, fused_dq, stream);
  else launch_dkdv_dim<__nv_bfloat16>(a, pl, v, max_items, D, fused_dq, stream);
}

void launch_dq_sm90a(const BwdArgs& a, const varlen::Tables& v, int num_tiles, int D, bool f16, cudaStream_t stream) {
  if (f16) launch_dim<__half>(a, v, num_tiles, D, stream);
  else launch_dim<__nv_bfloat16>(a, v, num_tiles, D, stream);
}

}  // namespace ksa::cuda::detail
