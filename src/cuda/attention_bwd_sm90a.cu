// CUDA backward, Hopper passes (sm_90a only; attention_bwd.cu runs them instead of the portable dK/dV and dQ
// passes on compute capability 9.0), on the forward's pipeline (sm90a_pipeline.cuh). dK/dV: see
// dkdv_sm90a_kernel (the plan, splits and reduce of attention_bwd.cu are unchanged, built for its tiles).
//
// dQ: a CTA takes 128 query rows (gathered order) of one head, two consumer warpgroups of 64 rows, a producer
// warpgroup that loads Q and dO once and streams 64-key K/V tiles through 3 stages. Per tile, each consumer:
//   S = Q K^T, dP = dO V^T   wgmma m64n64k16, all operands from smem (K-major), issued together;
//   P = 2^(S*scale*log2e - lse2[row]) (0 where the row's key ranges exclude the key), dS = P (dP - Delta[row]);
//   dQ += dS K               wgmma m64nDk16, dS from registers, K from smem MN-major.
// dQ (times the softmax scale) is written in stream order. No atomics: deterministic.
//
// Fused dQ (opt-in, KSA_CUDA_BWD_FUSED_DQ=1; D = 128, not deterministic; see use_fused_dq in attention_bwd.cu): the dK/dV pass already has dS for each
// (key tile, query step), so it also computes dQ = dS K there (dS through smem, each consumer one 64-column
// half of D) and adds it into an fp32 accumulator with atomics; the dQ pass, which recomputes S and dP, is
// skipped. 5 instead of 7 matrix products per visible tile pair.
//
// File shape (DESIGN.md §3): traits -> device code -> launcher.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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
  static constexpr bool DQ = DQ_;  // also dQ += dS K into BwdArgs::dq_acc (fp32 atomics)
  static constexpr int BKV = kDkvSm90Keys;     // key rows per CTA, 64 per consumer warpgroup
  static constexpr int BQ = kDkvSm90Queries;   // query rows per step (S^T, dP^T: 32 accumulators per thread)
  static constexpr int STAGES = 3;             // query steps in flight
  static constexpr int THREADS = 384;          // consumer warpgroups 0 and 1, producer warpgroup 2
  static constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;  // setmaxnreg (see regs_fit)
  static constexpr uint32_t KV_BYTES = BKV * D * 2, QS_BYTES = BQ * D * 2;
  // A stage: Q and dO tiles, lse2 and Delta of the step's queries, and each query's visible key range in the
  // key tile's region (int2). Stages start on 1024-byte boundaries (the swizzle period).
  static constexpr uint32_t STAGE_BYTES = (2 * QS_BYTES + 2 * BQ * 4 + BQ * 8 + 1023) / 1024 * 1024;
  // With DQ: two dS tiles (the step's 64 queries x 128 keys, 128B-swizzled, K-major for dQ = dS K), used in
  // turn by consecutive steps.
  static constexpr uint32_t DS_BYTES = DQ ? BQ * BKV * 2 : 0;
  static constexpr int SMEM =
      int(2 * KV_BYTES + STAGES * STAGE_BYTES + 2 * DS_BYTES) + STAGES * int(sizeof(TileInfo)) + 1024;
  static_assert(D == 64 || D == 128, "D must be 64 or 128");
  static_assert(!DQ || D == 128, "the fused dQ splits D = 128 into one 64-column half per consumer");
  static_assert(kRowPad % BQ == 0, "lse2/Delta padding covers a whole query step");
  static_assert(SMEM <= 227 * 1024, "shared memory per CTA");
  static_assert(regs_fit(PRODUCER_REGS, CONSUMER_REGS), "setmaxnreg budget");
};

// ------------------------------------------------------------------------------------------ device code
template <class K>
__global__ void __launch_bounds__(K::THREADS, 1) dq_sm90a_kernel(const BwdArgs a, int num_qtiles) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename K::T;
  using B = Bars<K::STAGES>;
  constexpr int D = K::D, BQ = K::BQ, BK = K::BK, NS = BK / 2, NO = D / 2;
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t sQ = (smem_u32(smem) + 1023u) & ~1023u, sO = sQ + K::Q_BYTES, sKV = sO + K::Q_BYTES;
  TileInfo* info = reinterpret_cast<TileInfo*>(smem + (sKV - smem_u32(smem)) + K::STAGES * 2 * K::KV_BYTES);

  const int qt = num_qtiles - 1 - int(blockIdx.x);  // heaviest tiles (most summaries) first
  const int h = int(blockIdx.y), b = int(blockIdx.z), hk = h / a.G;
  const int g0 = qt * BQ, g1 = min(a.L, g0 + BQ);
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
      int lo, hi;
      key_range_for(rk[hf], text, lo, hi);
#pragma unroll
      for (int j = 0; j < BK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int x = t.begin + 8 * j + 2 * tig + e, idx = 4 * j + 2 * hf + e;
          const bool vis = !t.masked || (x >= lo && x <= hi);
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

// dK/dV: the CTA's key tile (K, V loaded once) against the query steps of its plan item (query tile, query
// head of the group), streamed by the producer with their lse2, Delta and key ranges. Per step, each consumer
// (64 keys): S^T = K Q^T and dP^T = V dO^T (wgmma m64n64k16, smem operands), P^T = 2^(S^T*scale*log2e -
// lse2[query]) (0 outside the query's key range), dS^T = P^T (dP^T - Delta[query]); dV += P^T dO and
// dK += dS^T Q (wgmma m64nDk16, P^T and dS^T from registers, dO and Q MN-major).
template <class K>
__global__ void __launch_bounds__(K::THREADS, 1) dkdv_sm90a_kernel(const BwdArgs a, const PlanArgs pl) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename K::T;
  using B = Bars<K::STAGES>;
  constexpr int D = K::D, BQ = K::BQ, BKV = K::BKV, NS = BQ / 2, NO = D / 2;
  const DkvCta cta = dkdv_cta(a.B, a.Hkv);
  if (cta.item >= pl.counters[0]) return;  // the whole CTA: past the plan's items
  const bwd::PlanItem item = pl.items[cta.item];
  const int hk = cta.hk, b = cta.b;
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t sK = (smem_u32(smem) + 1023u) & ~1023u, sV = sK + K::KV_BYTES, sS0 = sV + K::KV_BYTES;
  uint8_t* gS0 = smem + (sS0 - smem_u32(smem));  // the stages through a generic pointer (lse2, Delta, ranges)
  [[maybe_unused]] const uint32_t sDS = sS0 + K::STAGES * K::STAGE_BYTES;  // DQ: the two dS tiles
  TileInfo* info = reinterpret_cast<TileInfo*>(gS0 + K::STAGES * K::STAGE_BYTES + 2 * K::DS_BYTES);
  int64_t tb64, te64;
  bwd::key_tile_rows(a.lay, BKV, item.kt, tb64, te64);
  const int tb = int(tb64), te = int(te64);
  const bool text_keys = tb64 < a.lay.T;
  const int nsteps = (item.e1 - item.e0) * a.G;
  const int wg = int(threadIdx.x) / 128;

  if (wg == 2) {
    setmaxnreg_dec<K::PRODUCER_REGS>();
    if (nsteps == 0) return;
    EntryWalk walk(pl.runs + int64_t(item.kt) * bwd::kMaxRuns, item.e0, hk * a.G, a.G);
    int step = 0;
    auto next = [&](TileInfo& t) {
      if (step >= nsteps) return false;
      if (step > 0) walk.next();
      ++step;
      const int g0 = walk.qt * BQ, g1 = min(a.L, g0 + BQ);
      const bool masked = g1 - g0 < BQ || bwd::tile_masked(pl.spans[walk.qt], tb64, te64);
      t = TileInfo{g0, g1, int32_t(masked), walk.h, 0, {0, 0, 0}};
      return true;
    };
    auto first = [&] {
      load_rows<T, D, BKV>(a.l32, sK, head_ptr<T>(a.k, b, hk), a.k.r, tb, te);
      load_rows<T, D, BKV>(a.l32, sV, head_ptr<T>(a.v, b, hk), a.v.r, tb, te);
    };
    auto load = [&](uint32_t st, const TileInfo& t) {
      load_rows<T, D, BQ>(a.l32, st, head_ptr<T>(a.q, b, t.aux), a.q.r, t.begin, t.end);
      load_rows<T, D, BQ>(a.l32, st + K::QS_BYTES, head_ptr<T>(a.dout, b, t.aux), a.dout.r, t.begin, t.end);
      const int r = int(threadIdx.x) - 256;
      const uint32_t rv = st + 2 * K::QS_BYTES;  // lse2 [BQ] floats, Delta [BQ] floats, ranges [BQ] int2
      if (r < BQ / 2) {  // BQ floats each: 16-byte chunks, contiguous and aligned (Lp % kRowPad == 0)
        const bool is_delta = r >= BQ / 4;
        const int c = is_delta ? r - BQ / 4 : r;
        const int64_t off = (int64_t(b) * a.Hq + t.aux) * a.Lp + t.begin;
        cp_async16(rv + (is_delta ? BQ * 4 : 0) + c * 16, (is_delta ? a.delta : a.lse2) + off + c * 4, true);
      }
      if (r < BQ) {
        const int g = t.begin + r;
        int2 rg = make_int2(1, 0);
        if (g < t.end) {
          const RowKeyRanges rk = row_key_ranges(a.l32, a.W32, uint32_t(g));
          key_range_for(rk, text_keys, rg.x, rg.y);
        }
        reinterpret_cast<int2*>(gS0 + (rv - sS0) + 2 * BQ * 4)[r] = rg;
      }
    };
    produce<K::STAGES>(sS0, K::STAGE_BYTES, info, first, next, load);
    return;
  }
  setmaxnreg_inc<K::CONSUMER_REGS>();

  // This thread's key rows r0 and r0 + 8 of the tile (hf = 0, 1).
  const int warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32, gid = lane / 4, tig = lane % 4;
  const int r0 = wg * 64 + warp * 16 + gid;
  const int xk[2] = {tb + r0, tb + r0 + 8};
  float dk[NO], dv[NO];
#pragma unroll
  for (int x = 0; x < NO; ++x) dk[x] = dv[x] = 0.f;

  for (int i = 0; i < nsteps; ++i) {
    const int st = i % K::STAGES;
    B::wait_full(st, wg);
    const TileInfo t = info[st];
    const uint32_t sQ = sS0 + uint32_t(st) * K::STAGE_BYTES, sO = sQ + K::QS_BYTES;
    const uint8_t* rv = gS0 + uint32_t(st) * K::STAGE_BYTES + 2 * K::QS_BYTES;
    const float* lse2s = reinterpret_cast<const float*>(rv);
    const float* dels = lse2s + BQ;
    const int2* rng = reinterpret_cast<const int2*>(rv + 2 * BQ * 4);

    // S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries each), issued in turn with the other consumer.
    float s[NS], dp[NS];
    B::products_in_turn(wg, i, i + 1 < nsteps, [&] {
      wgmma_ss_rows<T, BQ, D, BKV>(s, sK, wg * 64, sQ);
      wgmma_ss_rows<T, BQ, D, BKV>(dp, sV, wg * 64, sO);
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
        const int2 rg = rng[col];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int idx = 4 * j + 2 * hf + e;
          const bool vis = !t.masked || (xk[hf] >= rg.x && xk[hf] <= rg.y);
          const float p = vis ? ex2(fmaf(s[idx], a.scale_log2, -l2)) : 0.f;
          s[idx] = p;
          dp[idx] = p * (dp[idx] - dl);
        }
      }
    uint32_t pf[BQ / 16][4], df[BQ / 16][4];
    to_a_frags<T>(s, pf);
    to_a_frags<T>(dp, df);
    // DQ: dS (queries x keys) into this step's dS tile, each consumer its 64 keys (one 64-column block):
    // stmatrix.trans turns each 8x8 block of dS^T (keys x queries) into 8 query rows of 8 keys (16 bytes).
    // Matrix m of df[kb] is key half hf = m & 1 of query block j = 2kb + (m >> 1).
    [[maybe_unused]] const uint32_t sDSi = sDS + uint32_t(i & 1) * K::DS_BYTES;
    if constexpr (K::DQ) {
      const int m = lane >> 3, c = lane & 7;
#pragma unroll
      for (int kb = 0; kb < BQ / 16; ++kb)
        stmatrix_x4_trans(sDSi + sw128<BQ>(8 * (2 * kb + (m >> 1)) + c, wg * 8 + 2 * warp + (m & 1)), df[kb][0],
                          df[kb][1], df[kb][2], df[kb][3]);
      fence_proxy_async();  // st.shared before the wgmma (async proxy) reads of both consumers
    }
    // dV += P^T dO, dK += dS^T Q (times scale at the end): one 16-query step per wgmma.
    fence_reg(dk);
    fence_reg(dv);
    wgmma_fence();
    wgmma_rs_rows<T, D, BQ>(dv, pf, sO);
    wgmma_rs_rows<T, D, BQ>(dk, df, sQ);
    wgmma_commit();
    if constexpr (K::DQ) {
      // dQ[:, 64 wg + (0..63)] = dS K[:, 64 wg + (0..63)] over the tile's 128 keys, once both halves of dS are
      // in. The other consumer last read this dS tile two steps ago and has passed this barrier's previous
      // phase since (after its wgmma_wait), so the tile was free to overwrite.
      bar_sync(B::kFree, 256);
      wgmma_wait<0>();  // dV, dK done: their A registers (pf, df) are free for dQ's accumulators
      fence_reg(dk);
      fence_reg(dv);
      float dqa[32];
#pragma unroll
      for (int x = 0; x < 32; ++x) dqa[x] = 0.f;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BKV / 16; ++kk)
        wgmma_ss_tb<T, 64>(dqa, desc_sw128(sDSi + (kk / 4) * (BQ * 128) + (kk % 4) * 32, 16, 1024),
                           desc_sw128(sK + wg * (BKV * 128) + kk * 2048, BKV * 128, 1024), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_reg(dqa);
      // Rows past L belong to the padded [L, Lp) range (their dS is 0); dq_acc has Lp rows.
      float* acc = a.dq_acc + ((int64_t(b) * a.Hq + t.aux) * a.Lp + t.begin + warp * 16 + gid) * D + wg * 64 + 2 * tig;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) red_add_f32x2(acc + hf * 8 * D + 8 * j, dqa[4 * j + 2 * hf], dqa[4 * j + 2 * hf + 1]);
    } else {
      wgmma_wait<0>();
    }
    fence_reg(dk);
    fence_reg(dv);
    B::release(st);
  }

  // The whole list -> dk (times scale), dv in the input dtype; a segment -> fp32 partials (reduce_kernel).
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = r0 + 8 * hf, g = tb + row;
    if (g < te) store_dkdv_row<T, D, BKV>(a, pl, item.slot, b, hk, row, g, hf, tig, dk, dv);
  }
#endif
}

// --------------------------------------------------------------------------------------------- launcher
template <class K>
void launch_dkdv(const BwdArgs& a, const PlanArgs& pl, int max_items, cudaStream_t stream) {
  auto kern = dkdv_sm90a_kernel<K>;
  KSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, K::SMEM));
  kern<<<dkdv_grid(max_items, a.B, a.Hkv), K::THREADS, K::SMEM, stream>>>(a, pl);
  KSA_CUDA_CHECK_LAUNCH();
}

template <class K>
void launch(const BwdArgs& a, cudaStream_t stream) {
  auto kern = dq_sm90a_kernel<K>;
  KSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, K::SMEM));
  const int nqt = (a.L + K::BQ - 1) / K::BQ;
  kern<<<dim3(unsigned(nqt), unsigned(a.Hq), unsigned(a.B)), K::THREADS, K::SMEM, stream>>>(a, nqt);
  KSA_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_dim(const BwdArgs& a, int D, cudaStream_t s) {
  if (D == 128) launch<DqSm90Traits<T, 128>>(a, s);
  else if (D == 64) launch<DqSm90Traits<T, 64>>(a, s);
  else fail("ksa::cuda::attention_backward (sm_90a dQ): D=", D, " is not supported (64 or 128)");
}

template <class T>
void launch_dkdv_dim(const BwdArgs& a, const PlanArgs& pl, int max_items, int D, bool fused_dq, cudaStream_t s) {
  if (fused_dq && D != 128) fail("ksa::cuda::attention_backward (sm_90a dK/dV): the fused dQ needs D=128 (got ", D, ")");
  if (fused_dq) launch_dkdv<DkvSm90Traits<T, 128, true>>(a, pl, max_items, s);
  else if (D == 128) launch_dkdv<DkvSm90Traits<T, 128, false>>(a, pl, max_items, s);
  else if (D == 64) launch_dkdv<DkvSm90Traits<T, 64, false>>(a, pl, max_items, s);
  else fail("ksa::cuda::attention_backward (sm_90a dK/dV): D=", D, " is not supported (64 or 128)");
}

}  // namespace

void launch_dkdv_sm90a(const BwdArgs& a, const PlanArgs& pl, int max_items, int D, bool f16, bool fused_dq,
                       cudaStream_t stream) {
  if (f16) launch_dkdv_dim<__half>(a, pl, max_items, D, fused_dq, stream);
  else launch_dkdv_dim<__nv_bfloat16>(a, pl, max_items, D, fused_dq, stream);
}

void launch_dq_sm90a(const BwdArgs& a, int D, bool f16, cudaStream_t stream) {
  if (f16) launch_dim<__half>(a, D, stream);
  else launch_dim<__nv_bfloat16>(a, D, stream);
}

}  // namespace ksa::cuda::detail
