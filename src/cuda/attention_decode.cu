// CUDA decode through the compressed cache (include/ksa/cuda_cache.hpp): two kernels, queued by run().
//
// 1. attend: grid (work units, KV heads). A unit is a run of visible key rows of one token in one table
//            (text ring or summary table), cut by the plan from the core's key_spans (StreamGeometry::decode_keys)
//            into pieces of split_rows keys (flash-decoding: a 16K-row summary span runs on many SMs). K/V
//            tiles stream through a cp.async pipeline; each K and V row is read once for all G query heads
//            of the group (rows of an mma.sync A operand); the CTA writes one (m, l, acc) partial per
//            (unit, head). The same grid writes the step's new K/V rows into the cache; units read the rows
//            of this step from the step's k/v, so a token sees the rows of earlier tokens of its step without
//            waiting for the writes. The plan rejects steps where a row written by the step would land on a
//            ring row that one of its tokens reads (KvCacheGpu::step_ok).
// 2. merge:  grid (tokens, query heads): the token's partials joined in a fixed order (deterministic), then
//            out (bf16) and lse; launched programmatically behind the attend kernel (sm_90).
// A prefill's writes (a plan without tokens) go through a write kernel of their own.
//
// File shape (docs/design.md: kernel files): traits -> device code -> launcher.
#include <cuda_bf16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <utility>
#include <vector>
#include <cmath>
#include <cstdint>

#include "check.cuh"
#include "cuda/decode_plan.cuh"
#include "cuda/fast_div.hpp"
#include "cuda/tile_rows.hpp"
#include "cuda/mma.cuh"
#include "ksa/softmax.hpp"
#include "launch_checks.hpp"
#include "pdl.cuh"

namespace ksa::cuda::detail {
namespace {

// ---------------------------------------------------------------------------------------------- traits
template <int D_, int G_>
struct DecTraits {
  static constexpr int D = D_, G = G_;
  static constexpr int WARPS = 4, THREADS = 32 * WARPS;
  static constexpr int WKEYS = 16;                 // keys per warp per tile (one mma k-step of P·V)
  static constexpr int TILE = WARPS * WKEYS;       // keys per tile
  static constexpr int CH = D / 8;                 // 16-byte chunks per row
  static constexpr int STAGES = D == 128 ? 2 : 3;  // 32 KiB (D=128) / 16 KiB per stage; 3 CTAs per SM
  static constexpr int STAGE_BYTES = 2 * TILE * D * 2;
  static constexpr int SMEM = STAGES * STAGE_BYTES;
  static constexpr int KEYS_PER_THREAD = TILE * CH / THREADS;  // rows (K and V) each thread copies per tile
  static_assert(D == 64 || D == 128, "D must be 64 or 128");
  static_assert(G >= 1 && G <= 8, "a GQA group fills at most 8 of the 16 mma rows");
  static_assert(SMEM >= WARPS * G * (D + 2) * 4, "the warp join reuses the stage buffers");
};

// ------------------------------------------------------------------------------------------ device code
__device__ __forceinline__ uint16_t to_bf16(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// K row r of KV head h in the block at `blk` (V is Hkv·P·D elements further).
__device__ __forceinline__ const uint16_t* block_row(const DecodeRun& a, const uint16_t* blk, int h, int32_t r) {
  return blk + (int64_t(h) * a.P + r) * a.D;
}

// 16-byte chunk c of new row w's K (kv = 0) or V (kv = 1) row of KV head h into the cache block `blk`, row r.
__device__ __forceinline__ void write_chunk(const DecodeRun& a, const DecodeTensors& io, const DecWrite& w,
                                            const uint16_t* blk, int32_t r, int kv, int h, int c) {
  const uint16_t* src = at<const uint16_t>(kv == 0 ? io.k : io.v, 0, w.src, h);
  uint16_t* dst = const_cast<uint16_t*>(block_row(a, blk, h, r)) + int64_t(kv) * a.Hkv * a.P * a.D;
  reinterpret_cast<uint4*>(dst)[c] = reinterpret_cast<const uint4*>(src)[c];
}

// A prefill's rows (a plan without tokens): one CTA per row, its K and V rows (all KV heads), 16 bytes per
// thread. Decode steps write their rows from the attend kernel instead.
__global__ void __launch_bounds__(256) write_kernel(const DecodeRun* __restrict__ plan, const DecodeTensors io) {
  const DecodeRun& a = *plan;
  const DecWrite w = a.writes[blockIdx.x];
  const int cpr = a.D / 8, n = a.Hkv * cpr;  // 16-byte chunks per head row, per K (or V) row
  for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) {
    const int kv = i / n, h = (i - kv * n) / cpr, c = i - kv * n - h * cpr;
    write_chunk(a, io, w, w.blk, w.r, kv, h, c);
  }
}

// Grid (work units, KV heads). CTA (u, h) first writes head h of the step's new rows u, u + units, ... into
// the cache; the units read rows of this step (>= new_begin) from the step's k/v instead, so no CTA reads a
// row another CTA of the grid writes (KvCacheGpu::step_ok keeps the step's writes off every ring row that
// its tokens read). The unit's keys stream through a STAGES-deep cp.async pipeline of TILE-key
// tiles (K and V rows, swizzled for ldmatrix; keys past the unit's end are zero-filled and masked), whose
// block addresses come from the unit's block list, staged in smem with the unit (no tile waits on a
// block-table load; H200, B=64: 3,574 -> 3,668 GB/s), and whose first STAGES tiles are all issued at the
// start (a two-tile unit has both in flight at once; T=16K, B=1: 17.0 -> 15.8 us). Warp w
// takes keys [16w, 16w + 16) of each tile on the tensor cores: S = Q·K^T with the G query heads of the
// group as rows 0..G-1 of an m16n8k16 A operand (the other rows are zero), an online softmax on the
// accumulator fragments, O += P·V. Each K and V row is read once for all G heads. The warps' states are
// joined in smem in a fixed order and written as one (m, l, acc) partial per (unit, head).
template <class K>
__global__ void __launch_bounds__(K::THREADS)
    attend_kernel(const DecodeRun* __restrict__ plan, const DecodeTensors io) {
  const DecodeRun& a = *plan;
  // Launched programmatically (pdl.cuh): the step's q/k/v come from the kernel before, so q and the step's
  // new rows are read after the wait. The plan and the cached rows are not written by any kernel that may
  // still run: the plan was uploaded by a copy queued before (copies are full dependencies), and the cached
  // rows a unit reads (< new_begin) were written by earlier steps, never by this step's writes (step_ok),
  // nor by an earlier launch of the same plan. So the unit's cached tiles are in flight before the wait,
  // under the tail of the kernels before (the qkv product and the norm/RoPE).
  if (int(blockIdx.x) >= a.n_units) return;  // a launch sized for a graph's capacity
  constexpr int D = K::D, G = K::G, CH = K::CH, TILE = K::TILE, STAGES = K::STAGES, NB = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];  // [STAGES][K, V][TILE rows of D] swizzled
  __shared__ const uint16_t* s_blk[kMaxUnitBlocks];       // the unit's block addresses (DecUnit::blk0, ...)

  // The unit's block list is loaded together with the unit (its address needs only blockIdx).
  for (int i = threadIdx.x; i < a.unit_blocks_stride; i += K::THREADS)
    s_blk[i] = a.unit_blocks[int64_t(blockIdx.x) * a.unit_blocks_stride + i];
  const DecUnit un = a.units[blockIdx.x];
  const int hk = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const bool summary = un.summary != 0;
  const int ntiles = (un.end - un.begin + TILE - 1) / TILE;
  const int64_t v_off = int64_t(a.Hkv) * a.P * a.D;

  // Tile t into stage st: this thread copies chunk `part` of KEYS_PER_THREAD keys, K and V.
  const int part = threadIdx.x % CH, key0 = threadIdx.x / CH;
  // K/V rows are read once per step: their L2 lines go first (instead of other lines, dirty ones included).
  const uint64_t pol = dev::l2_evict_first_policy();
  // fresh = false: the cached rows and the zero fill past the unit's end; true: the rows of this step.
  // A key's storage row y goes to (block, row) = (y / P, y % P) by a multiply-high (FastDiv) instead of a
  // u32 division (~20 instructions; 8 per thread and tile). A tile without rows of this step (all but the
  // last; CTA-uniform) skips the fresh pass. Where a tile's storage rows are its keys' rows in order and
  // blocks hold at least a tile (`contig`, CTA-uniform: the engine's 64-row blocks, all but the unstored
  // summaries), the tile's rows lie in two blocks at most: one division per tile, then per key a compare
  // and a select (TileRows) instead of the division, the table lookup and 64-bit index arithmetic.
  const FastDiv by_p(uint32_t(a.P));
  const bool contig = a.P >= TILE && !(summary && !un.stored);
  const int64_t head_off = int64_t(hk) * a.P * D + part * 8;  // row 0 of head hk, chunk `part`
  auto issue = [&](int t, int st, bool fresh) {
    const int32_t x0 = un.begin + t * TILE;
    if (fresh && max(x0, un.new_begin) >= min(x0 + TILE, un.end)) return;
    const uint32_t base = dev::smem_u32(smem + st * K::STAGE_BYTES);
    // contig: the tile's first storage row is row r0 of block b0 (its list entry; the next entry, where the
    // unit has one, holds the rows past P). Only a tile that starts with a cached row has cached rows (they
    // precede the step's), and only a cached row's block is sure to be in the unit's list.
    TileRows rows;
    const uint16_t *blk_a = nullptr, *blk_b = nullptr;
    if (!fresh && contig && x0 < min(un.new_begin, un.end)) {
      const uint32_t b0 = by_p.div(uint32_t(x0));
      rows = TileRows(by_p.mod(uint32_t(x0), b0), uint32_t(a.P));
      const int32_t e = int32_t(b0) - un.blk0;
      blk_a = s_blk[e] + head_off;
      blk_b = (e + 1 < a.unit_blocks_stride ? s_blk[e + 1] : s_blk[e]) + head_off;
    }
#pragma unroll
    for (int i = 0; i < K::KEYS_PER_THREAD; ++i) {
      const int key = key0 + i * (K::THREADS / CH);
      const int32_t x = x0 + key;
      const bool ok = x < un.end;
      if (fresh != (ok && x >= un.new_begin)) continue;
      const uint16_t *ks = at<const uint16_t>(io.k, 0, 0, 0),
                     *vs = ks;  // any valid address when !ok (0 bytes are read: zero fill)
      if (fresh) {              // written by this step: from the step's k/v
        const uint32_t pos = summary ? a.lay.summary_to_stream(uint32_t(x)) : a.lay.text_to_stream(uint32_t(x));
        const int64_t row = un.src_off + int64_t(pos);
        ks = at<const uint16_t>(io.k, 0, row, hk) + part * 8;
        vs = at<const uint16_t>(io.v, 0, row, hk) + part * 8;
      } else if (ok && contig) {
        const TileRows::At r = rows.at(uint32_t(key));
        ks = (r.next ? blk_b : blk_a) + int64_t(r.row) * D;
        vs = ks + v_off;
      } else if (ok) {
        const uint32_t y = summary && !un.stored ? uint32_t(x) % a.lay.S : uint32_t(x);
        const uint32_t b = by_p.div(y);
        ks = block_row(a, s_blk[int32_t(b) - un.blk0], hk, int32_t(by_p.mod(y, b))) + part * 8;
        vs = ks + v_off;
      }
      const uint32_t off = uint32_t(dev::swz<CH>(key, part));
      dev::cp_async16(base + off, ks, ok, pol);
      dev::cp_async16(base + TILE * D * 2 + off, vs, ok, pol);
    }
  };
  __syncthreads();  // s_blk
  // Every stage is filled at the start (a unit of up to STAGES tiles is in flight at once): the cached rows
  // before the wait, the step's rows after it, all in the first commit group. From then on the stage of
  // tile t - 1 is refilled (with tile t + STAGES - 1) once tile t has landed and every warp is done with
  // tile t - 1 (one CTA barrier per tile).
#pragma unroll
  for (int t = 0; t < STAGES; ++t)
    if (t < ntiles) issue(t, t, false);
  // The merge kernel may launch now (it waits for this grid before it reads), and with it the o product,
  // whose CTAs then stage their weights on the SMs this grid leaves free while its units stream their keys:
  // at batch 1 the attend grid is under a wave and latency bound (16K: ~12 us at ~1 TB/s), so the o
  // product's 21 MB (the 4B shape) load under it instead of after it. A grid of several waves lets the merge
  // launch only once its last wave is resident (every CTA must have passed this point).
  dev::launch_dependents();
  dev::grid_dependency_wait();
#pragma unroll
  for (int t = 0; t < STAGES; ++t) {
    if (t < ntiles) issue(t, t, true);
    dev::cp_async_commit();
  }
  // Q as the A operand: row gid = query head hk·G + gid (zero for gid >= G); rows 8..15 zero.
  uint32_t qa[D / 16][2];
  {
    const bool has = gid < G;
    const uint16_t* qp = at<const uint16_t>(io.q, 0, un.qrow, hk * G + (has ? gid : 0));
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][0] = has ? *reinterpret_cast<const uint32_t*>(qp + kk * 16 + 2 * tig) : 0u;
      qa[kk][1] = has ? *reinterpret_cast<const uint32_t*>(qp + kk * 16 + 8 + 2 * tig) : 0u;
    }
  }
  // The step's new rows for head hk, while the first tiles load: K chunks by threads [0, CH), V by [CH, 2CH).
  if (threadIdx.x < 2 * CH)
    for (int w = blockIdx.x; w < a.n_writes; w += a.n_units) {  // CTAs past n_units returned
      const DecWrite wr = a.writes[w];
      write_chunk(a, io, wr, wr.blk, wr.r, threadIdx.x / CH, hk, threadIdx.x % CH);
    }
  const float sl2 = a.scale * dev::kLog2e;  // scores in log2 units for ex2
  float m2 = -INFINITY, l = 0.f;            // row gid: running max (log2 units) and this lane's sum
  float o[NB][2];                           // row gid, dims 8·nb + 2·tig, +1
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) o[nb][0] = o[nb][1] = 0.f;

  for (int t = 0; t < ntiles; ++t) {
    // Committed groups: tiles 0 .. STAGES - 1 at t = 0, then up to tile t + STAGES - 2.
    if (t == 0) dev::cp_async_wait<STAGES - 1>();
    else dev::cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile t landed for every thread; the stage of tile t - 1 is free
    if (t > 0) {
      if (t + STAGES - 1 < ntiles) {
        issue(t + STAGES - 1, (t + STAGES - 1) % STAGES, false);
        issue(t + STAGES - 1, (t + STAGES - 1) % STAGES, true);
      }
      dev::cp_async_commit();
    }

    const uint32_t ks = dev::smem_u32(smem + (t % STAGES) * K::STAGE_BYTES), vs = ks + TILE * D * 2;
    const int wrow = warp * K::WKEYS;
    // S = Q K^T for this warp's 16 keys: two n-blocks of 8 keys.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int mat = lane / 8, row = wrow + (mat / 2) * 8 + lane % 8, chunk = 2 * kk + (mat % 2);
      uint32_t b0, b1, b2, b3;
      dev::ldsm_x4(b0, b1, b2, b3, ks + uint32_t(dev::swz<CH>(row, chunk)));
      const uint32_t aq[4] = {qa[kk][0], 0u, qa[kk][1], 0u};
      dev::mma16816<__nv_bfloat16>(s[0], aq, b0, b1);
      dev::mma16816<__nv_bfloat16>(s[1], aq, b2, b3);
    }
    // Online softmax on row gid (its 16 scores live in the 4 lanes of the quad).
    const int32_t xk = un.begin + t * TILE + wrow;
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool ok = xk + nb * 8 + 2 * tig + j < un.end;
        s[nb][j] = ok ? s[nb][j] * sl2 : -INFINITY;
        mx = fmaxf(mx, s[nb][j]);
      }
    float f;
    const float mu = dev::online_softmax_step(m2, dev::quad_max(mx), f);
    l *= f;
    // P as two bf16 A operands, hi + lo (lo = the rounding residue of hi), so that P·V keeps fp32-level
    // weights: a decode step sums up to ~17K keys per head, and bf16 weights alone cost ~2^-9 relative.
    uint32_t ph[4] = {0u, 0u, 0u, 0u}, pl[4] = {0u, 0u, 0u, 0u};  // a1, a3 (rows 8..15) stay zero
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      const float p0 = dev::ex2(s[nb][0] - mu), p1 = dev::ex2(s[nb][1] - mu);
      l += p0 + p1;
      ph[2 * nb] = dev::pack2<__nv_bfloat16>(p0, p1);  // a0 (keys 2tig..) / a2 (keys 8 + 2tig..), row gid
      const float2 hi = dev::unpack2<__nv_bfloat16>(ph[2 * nb]);
      pl[2 * nb] = dev::pack2<__nv_bfloat16>(p0 - hi.x, p1 - hi.y);
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) o[nb][0] *= f, o[nb][1] *= f;
      // O += P V: V^T fragments by ldmatrix.trans, two n-blocks (16 dims) per x4.
#pragma unroll
    for (int c = 0; c < CH; c += 2) {
      const int mat = lane / 8, row = wrow + (mat % 2) * 8 + lane % 8, chunk = c + mat / 2;
      uint32_t b0, b1, b2, b3;
      dev::ldsm_x4_t(b0, b1, b2, b3, vs + uint32_t(dev::swz<CH>(row, chunk)));
      float c0[4] = {o[c][0], o[c][1], 0.f, 0.f}, c1[4] = {o[c + 1][0], o[c + 1][1], 0.f, 0.f};
      dev::mma16816<__nv_bfloat16>(c0, ph, b0, b1);
      dev::mma16816<__nv_bfloat16>(c1, ph, b2, b3);
      dev::mma16816<__nv_bfloat16>(c0, pl, b0, b1);
      dev::mma16816<__nv_bfloat16>(c1, pl, b2, b3);
      o[c][0] = c0[0], o[c][1] = c0[1], o[c + 1][0] = c1[0], o[c + 1][1] = c1[1];
    }
  }
  l = dev::quad_sum(l);

  // Join the warps (fixed order) and write this CTA's partial (m in natural units); stage buffers reused.
  dev::cp_async_wait<0>();
  __syncthreads();
  float* s_acc = reinterpret_cast<float*>(smem);                       // [WARPS][G][D]
  float2* s_ml = reinterpret_cast<float2*>(s_acc + K::WARPS * G * D);  // [WARPS][G]
  if (gid < G) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      s_acc[(warp * G + gid) * D + nb * 8 + 2 * tig] = o[nb][0];
      s_acc[(warp * G + gid) * D + nb * 8 + 2 * tig + 1] = o[nb][1];
    }
    if (tig == 0) s_ml[warp * G + gid] = make_float2(m2 == -INFINITY ? -INFINITY : m2 * dev::kLn2, l);
  }
  __syncthreads();
  const int64_t base = (int64_t(blockIdx.x) * a.Hkv + hk) * G;
  for (int i = threadIdx.x; i < G * D; i += K::THREADS) {
    const int g = i / D, d = i % D;
    OnlineSoftmax tot;
    float x = 0.f;
#pragma unroll
    for (int w = 0; w < K::WARPS; ++w) {
      OnlineSoftmax ow;
      ow.m = s_ml[w * G + g].x;
      ow.l = s_ml[w * G + g].y;
      merge_partial(tot, &x, ow, &s_acc[(w * G + g) * D + d], 1);
    }
    a.part_acc[(base + g) * D + d] = x;
    if (d == 0) a.part_ml[base + g] = make_float2(tot.m, tot.l);
  }
}

// One CTA per (token, query head): the token's unit partials joined exactly: M = max m_u, weights
// w_u = exp(m_u - M) into smem, L = sum w_u l_u, out = sum w_u acc_u / L. Each (m, l) is loaded once, and
// NU unit slices per output element with every load of a slice issued before the sums keep the loads in
// flight together (a serial chain of merges over ~60 partials is latency bound). Fixed order throughout:
// deterministic. Tokens with more than kMergeUnits units go through the smem weights in slices.
constexpr int kMergeThreads = 512, kMergeUnits = kMergeThreads;
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(const DecodeRun* __restrict__ plan, const DecodeTensors io) {
  const DecodeRun& a = *plan;
  __shared__ float s_red[2][kMergeThreads / 32];
  __shared__ float s_w[kMergeUnits];
  __shared__ float s_acc[kMergeThreads];
  dev::launch_dependents();  // the next kernel (the o product) may stage its weights under the merge
  const DecTok t = a.toks[blockIdx.x];
  const int h = blockIdx.y, hk = h / a.G, g = h - hk * a.G, D = a.D;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, NW = kMergeThreads / 32;
  auto pidx = [&](int u) { return (int64_t(t.unit0 + u) * a.Hkv + hk) * a.G + g; };
  dev::grid_dependency_wait();  // the attend kernel's partials
  // Slice 0 of the (m, l) pairs in registers; the global max over all units.
  float2 ml0 = make_float2(-INFINITY, 0.f);
  if (tid < t.units) ml0 = a.part_ml[pidx(tid)];
  float m = ml0.x;
  for (int u = tid + kMergeThreads; u < t.units; u += kMergeThreads) m = fmaxf(m, a.part_ml[pidx(u)].x);
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) s_red[0][warp] = m;
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < NW; ++w) M = fmaxf(M, s_red[0][w]);
  const int NU = kMergeThreads / D, us = tid / D, d = tid - us * D;
  float l = 0.f, acc = 0.f;
  for (int u0 = 0; u0 < t.units; u0 += kMergeUnits) {
    const int nu = min(kMergeUnits, t.units - u0);
    if (u0 > 0) {
      __syncthreads();  // s_w of the previous slice is consumed
      ml0 = tid < nu ? a.part_ml[pidx(u0 + tid)] : make_float2(-INFINITY, 0.f);
    }
    const float w = ml0.x == -INFINITY ? 0.f : expf(ml0.x - M);
    if (tid < nu) s_w[tid] = w;
    l += w * ml0.y;
    __syncthreads();
    constexpr int BATCH = 8;
    for (int u = us; u < nu; u += BATCH * NU) {
      float v[BATCH];
#pragma unroll
      for (int j = 0; j < BATCH; ++j) v[j] = u + j * NU < nu ? a.part_acc[pidx(u0 + u + j * NU) * D + d] : 0.f;
#pragma unroll
      for (int j = 0; j < BATCH; ++j)
        if (u + j * NU < nu) acc += s_w[u + j * NU] * v[j];
    }
  }
  for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
  if (lane == 0) s_red[1][warp] = l;
  s_acc[tid] = acc;
  __syncthreads();
  if (us == 0) {
    float L = 0.f, x = 0.f;
    for (int w = 0; w < NW; ++w) L += s_red[1][w];
    for (int j = 0; j < NU; ++j) x += s_acc[j * D + d];
    at<uint16_t>(io.out, 0, t.row, h)[d] = to_bf16(x / L);
    if (d == 0 && io.lse) io.lse[int64_t(t.row) * a.Hq + h] = M + logf(L);
  }
}

// -------------------------------------------------------------------------------------------- launcher
// Launcher state is cached per device (the current one; devices past kMaxDevices are not cached).
constexpr int kMaxDevices = 64;
int current_device() {
  int dev = 0;
  KSA_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// Launches kernel(plan, io); with `pdl` the kernel may start while the previous kernel on the stream runs.
void launch(void (*kernel)(const DecodeRun*, DecodeTensors), dim3 grid, int threads, int smem, bool pdl,
            const DecodeRun* plan, const DecodeTensors& io, cudaStream_t s) {
  launch_kernel(pdl, kernel, grid, dim3(unsigned(threads)), size_t(smem), s, plan, io);
}

// What an attend launch needs: the host copy of the plan (grid), its device copy, the tensors.
struct AttendLaunch {
  const DecodeRun* host;
  const DecodeRun* dev;
  const DecodeTensors* io;
  int64_t units;  // CTAs per KV head (>= host->n_units)
};

template <int D, int G>
void attend_config(int* ctas_per_sm, const AttendLaunch* a, cudaStream_t s, bool pdl) {
  using K = DecTraits<D, G>;
  // The smem attribute is set once per function and device (setting it again is harmless).
  static std::atomic<bool> configured[kMaxDevices] = {};
  const int dev = current_device();
  if (dev < 0 || dev >= kMaxDevices || !configured[dev]) {
    KSA_CUDA_CHECK(cudaFuncSetAttribute(attend_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, K::SMEM));
    if (dev >= 0 && dev < kMaxDevices) configured[dev] = true;
  }
  if (ctas_per_sm)
    KSA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas_per_sm, attend_kernel<K>, K::THREADS, K::SMEM));
  if (a)
    launch(attend_kernel<K>, dim3(unsigned(a->units), unsigned(a->host->Hkv)), K::THREADS, K::SMEM, pdl, a->dev, *a->io,
           s);
}

// attend_config<D, G> for G = 1..8, by G - 1.
using AttendConfigFn = void (*)(int*, const AttendLaunch*, cudaStream_t, bool);
template <int D, int... G>
constexpr std::array<AttendConfigFn, sizeof...(G)> attend_configs(std::integer_sequence<int, G...>) {
  return {attend_config<D, G + 1>...};
}

template <int D>
void attend_d(int G, int* ctas_per_sm, const AttendLaunch* a, cudaStream_t s, bool pdl) {
  static constexpr auto configs = attend_configs<D>(std::make_integer_sequence<int, 8>{});
  if (G < 1 || G > int(configs.size())) fail("cuda decode: GQA group size G=", G, " is not supported (1..8)");
  configs[size_t(G - 1)](ctas_per_sm, a, s, pdl);
}

void attend(int D, int G, int* ctas_per_sm, const AttendLaunch* a, cudaStream_t s, bool pdl) {
  if (D == 64) attend_d<64>(G, ctas_per_sm, a, s, pdl);
  else if (D == 128) attend_d<128>(G, ctas_per_sm, a, s, pdl);
  else fail("cuda decode: head dim D=", D, " is not supported (64 or 128)");
}

}  // namespace

int attend_ctas_per_sm(int D, int G) {
  int n = 0;
  attend(D, G, &n, nullptr, nullptr, false);
  return n;
}

int attend_tile_keys() { return DecTraits<128, 1>::TILE; }

namespace {
template <int D, int... G>
constexpr std::array<const void*, sizeof...(G)> attend_kernels(std::integer_sequence<int, G...>) {
  return {reinterpret_cast<const void*>(attend_kernel<DecTraits<D, G + 1>>)...};
}
}  // namespace

bool is_decode_kernel(const void* func) {
  // A graph's kernel node may name its kernel by the host stub or by the driver's function handle: both.
  static const std::vector<const void*> known = [] {
    std::vector<const void*> v = {reinterpret_cast<const void*>(write_kernel),
                                  reinterpret_cast<const void*>(merge_kernel)};
    for (const auto& ks : {attend_kernels<64>(std::make_integer_sequence<int, 8>{}),
                           attend_kernels<128>(std::make_integer_sequence<int, 8>{})})
      v.insert(v.end(), ks.begin(), ks.end());
    const size_t stubs = v.size();
    for (size_t i = 0; i < stubs; ++i) {
      cudaFunction_t f = nullptr;
      if (cudaGetFuncBySymbol(&f, v[i]) == cudaSuccess && f) v.push_back(reinterpret_cast<const void*>(f));
    }
    cudaGetLastError();
    return v;
  }();
  return std::find(known.begin(), known.end(), func) != known.end();
}

void launch_decode(const DecodeRun& a, const DecodeRun* dev, const DecodeTensors& io, cudaStream_t s,
                   int64_t unit_capacity) {
  if (a.n_units == 0) {  // no tokens (every token has at least its own row as a key)
    if (a.n_writes > 0) launch(write_kernel, dim3(unsigned(a.n_writes)), 256, 0, false, dev, io, s);
    return;
  }
  // Both kernels programmatic (pdl.cuh): attend waits for the kernel before it (which wrote q/k/v) before it
  // reads anything, merge for attend's partials.
  const AttendLaunch al{&a, dev, &io, std::max<int64_t>(a.n_units, unit_capacity)};
  attend(a.D, a.G, nullptr, &al, s, true);
  launch(merge_kernel, dim3(unsigned(a.n_toks), unsigned(a.Hq)), kMergeThreads, 0, pdl_supported(), dev, io, s);
}

}  // namespace ksa::cuda::detail
