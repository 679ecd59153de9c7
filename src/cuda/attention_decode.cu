// CUDA decode through the compressed cache (include/ksa/cuda_cache.hpp): three kernels, queued by run().
//
// 1. write:  one CTA per new token: its K/V rows (all KV heads) into the cache rows the plan made room for.
// 2. attend: grid (work units, KV heads). A unit is a run of visible key rows of one token in one table
//            (text ring or summary table), cut by the plan from the core's key_spans (cpu/decode_keys.hpp)
//            into pieces of split_rows keys (flash-decoding: a 16K-row summary span runs on many SMs). Each
//            K and V row is loaded once (16 bytes per lane, LPK = D/8 lanes per key) and used for all G query
//            heads of the group; the lane groups keep OnlineSoftmax states that the CTA merges in smem in a
//            fixed order and writes as one (m, l, acc) partial per (unit, head).
// 3. merge:  grid (tokens, KV heads): the token's partials merged with merge_partial in unit order (fixed,
//            so results are deterministic), then out (bf16) and lse.
// Kernel 2 runs after kernel 1 has written every new row of the step: a token sees the rows of earlier
// tokens of its step; the plan rejects steps where a later token's row would overwrite a ring row that an
// earlier token reads (KvCacheGpu::step_ok).
//
// File shape (DESIGN.md §3): traits -> device code -> launcher.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "check.cuh"
#include "cuda/decode_plan.cuh"
#include "ksa/softmax.hpp"

namespace ksa::cuda::detail {
namespace {

// ---------------------------------------------------------------------------------------------- traits
template <int D_, int G_>
struct DecTraits {
  static constexpr int D = D_, G = G_;
  static constexpr int THREADS = 128;
  static constexpr int LPK = D / 8;               // lanes per key (16 bytes of bf16 each)
  static constexpr int NG = THREADS / LPK;        // lane groups per CTA
  static constexpr int GPW = 32 / LPK;            // lane groups per warp
  static constexpr int U = 4;                     // keys per lane group per iteration (loads in flight)
  static constexpr int WARP_KEYS = GPW * U;       // keys per warp per iteration
  static_assert(D % 64 == 0 && LPK <= 32 && 32 % LPK == 0, "D must be 64 or 128");
};

// ------------------------------------------------------------------------------------------ device code
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float bf16_at(const uint16_t* p) { return __uint_as_float(uint32_t(*p) << 16); }
__device__ __forceinline__ uint16_t to_bf16(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// Element pointer of row r of KV head h (kv 0 = K, 1 = V) in block blk.
__device__ __forceinline__ uint16_t* cache_row(const DecodeRun& a, int32_t blk, int kv, int h, int32_t r) {
  const uint32_t slab = uint32_t(blk) / uint32_t(a.slab_blocks), in = uint32_t(blk) - slab * uint32_t(a.slab_blocks);
  return static_cast<uint16_t*>(a.slabs[slab]) + int64_t(in) * a.block_elems +
         (int64_t(kv * a.Hkv + h) * a.P + r) * a.D;
}

// Block and row of text row t / summary row s of a sequence (SeqKvView::text_row/summary_row in 32 bits).
__device__ __forceinline__ void locate(const DecodeRun& a, const DecSeq& sq, bool summary, int32_t x, int32_t& blk,
                                       int32_t& r) {
  const uint32_t P = uint32_t(a.P);
  if (!summary) {
    const uint32_t b = uint32_t(x) / P;
    blk = a.tables[sq.text_off + int32_t(b % uint32_t(sq.slots))];
    r = int32_t(uint32_t(x) - b * P);
  } else {
    const uint32_t s = sq.stored ? uint32_t(x) : uint32_t(x) % uint32_t(a.S), b = s / P;
    blk = a.tables[sq.sum_off + int32_t(b)];
    r = int32_t(s - b * P);
  }
}

__global__ void __launch_bounds__(128) write_kernel(const DecodeRun a) {
  const DecWrite w = a.writes[blockIdx.x];
  const DecSeq sq = a.seqs[w.seq];
  int32_t blk, r;
  locate(a, sq, w.summary != 0, w.row, blk, r);
  const int n = a.Hkv * a.D;
  for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) {
    const int kv = i / n, h = (i - kv * n) / a.D, d = i - kv * n - h * a.D;
    const uint16_t v = kv == 0 ? a.k[w.src * a.k_rs + h * a.k_hs + d] : a.v[w.src * a.v_rs + h * a.v_hs + d];
    cache_row(a, blk, kv, h, r)[d] = v;
  }
}

template <class K>
__global__ void __launch_bounds__(K::THREADS) attend_kernel(const DecodeRun a) {
  constexpr int D = K::D, G = K::G, LPK = K::LPK, U = K::U;
  __shared__ float s_acc[K::NG][G][D];
  __shared__ float2 s_ml[K::NG][G];

  const DecUnit un = a.units[blockIdx.x];
  const int hk = blockIdx.y;
  const DecSeq sq = a.seqs[un.seq];
  const int qrow = a.toks[un.tok].row;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gw = lane / LPK, li = lane % LPK, grp = warp * K::GPW + gw;

  // This lane's 8 dimensions of the group's G queries, softmax scale folded in.
  float q[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const uint16_t* qp = a.q + qrow * a.q_rs + (hk * G + g) * a.q_hs + li * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) q[g][j] = bf16_at(qp + j) * a.scale;
  }
  OnlineSoftmax st[G];
  float acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;

  const bool summary = un.summary != 0;
  const int64_t v_off = int64_t(a.Hkv) * a.P * a.D;  // V of a row: the same place one half-block later
  // The loop bound is uniform over the warp (the shuffles below need all 32 lanes); keys past `end` are -inf.
  for (int32_t wb = un.begin + warp * K::WARP_KEYS; wb < un.end; wb += (K::THREADS / 32) * K::WARP_KEYS) {
    uint4 kr[U], vr[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t x = wb + gw * U + u;
      ok[u] = x < un.end;
      kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      if (ok[u]) {
        int32_t blk, r;
        locate(a, sq, summary, x, blk, r);
        const uint16_t* kp = cache_row(a, blk, 0, hk, r);
        kr[u] = __ldg(reinterpret_cast<const uint4*>(kp) + li);
        vr[u] = __ldg(reinterpret_cast<const uint4*>(kp + v_off) + li);
      }
    }
    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t w[4] = {kr[u].x, kr[u].y, kr[u].z, kr[u].w};
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) dot += q[g][2 * j] * bf16_lo(w[j]) + q[g][2 * j + 1] * bf16_hi(w[j]);
#pragma unroll
        for (int o = LPK / 2; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        s[u][g] = ok[u] ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float bm = s[0][g];
#pragma unroll
      for (int u = 1; u < U; ++u) bm = fmaxf(bm, s[u][g]);
      if (bm == -INFINITY) continue;  // no key for this lane group in this iteration
      const float f = st[g].raise_max(bm);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] *= f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p = st[g].add(s[u][g]);
        const uint32_t w[4] = {vr[u].x, vr[u].y, vr[u].z, vr[u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[g][2 * j] += p * bf16_lo(w[j]);
          acc[g][2 * j + 1] += p * bf16_hi(w[j]);
        }
      }
    }
  }

  // Join the lane groups (fixed order) and write this CTA's partial.
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < 8; ++j) s_acc[grp][g][li * 8 + j] = acc[g][j];
    if (li == 0) s_ml[grp][g] = make_float2(st[g].m, st[g].l);
  }
  __syncthreads();
  const int64_t base = (int64_t(blockIdx.x) * a.Hkv + hk) * G;
  for (int i = threadIdx.x; i < G * D; i += K::THREADS) {
    const int g = i / D, d = i % D;
    OnlineSoftmax tot;
    float x = 0.f;
    for (int gr = 0; gr < K::NG; ++gr) {
      OnlineSoftmax o;
      o.m = s_ml[gr][g].x;
      o.l = s_ml[gr][g].y;
      merge_partial(tot, &x, o, &s_acc[gr][g][d], 1);
    }
    a.part_acc[(base + g) * D + d] = x;
    if (d == 0) a.part_ml[base + g] = make_float2(tot.m, tot.l);
  }
}

__global__ void __launch_bounds__(128) merge_kernel(const DecodeRun a) {
  const DecTok t = a.toks[blockIdx.x];
  const int hk = blockIdx.y, G = a.G, D = a.D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i - g * D, h = hk * G + g;
    OnlineSoftmax tot;
    float x = 0.f;
    for (int u = t.unit0; u < t.unit0 + t.units; ++u) {
      const int64_t pi = (int64_t(u) * a.Hkv + hk) * G + g;
      const float2 ml = a.part_ml[pi];
      OnlineSoftmax o;
      o.m = ml.x;
      o.l = ml.y;
      merge_partial(tot, &x, o, &a.part_acc[pi * D + d], 1);
    }
    a.out[t.row * a.o_rs + h * a.o_hs + d] = to_bf16(x * tot.inv_sum());
    if (d == 0 && a.lse) a.lse[int64_t(t.row) * a.Hq + h] = tot.lse();
  }
}

// -------------------------------------------------------------------------------------------- launcher
template <int D, int G>
void launch_attend(const DecodeRun& a, cudaStream_t s) {
  attend_kernel<DecTraits<D, G>><<<dim3(unsigned(a.n_units), unsigned(a.Hkv)), DecTraits<D, G>::THREADS, 0, s>>>(a);
}

template <int D>
void launch_attend_d(const DecodeRun& a, cudaStream_t s) {
  switch (a.G) {
    case 1: return launch_attend<D, 1>(a, s);
    case 2: return launch_attend<D, 2>(a, s);
    case 3: return launch_attend<D, 3>(a, s);
    case 4: return launch_attend<D, 4>(a, s);
    case 5: return launch_attend<D, 5>(a, s);
    case 6: return launch_attend<D, 6>(a, s);
    case 7: return launch_attend<D, 7>(a, s);
    case 8: return launch_attend<D, 8>(a, s);
    default: fail("cuda decode: GQA group size G=", a.G, " is not supported (1..8)");
  }
}

}  // namespace

void launch_decode(const DecodeRun& a, cudaStream_t s) {
  if (a.n_writes > 0) {
    write_kernel<<<unsigned(a.n_writes), 128, 0, s>>>(a);
    KSA_CUDA_CHECK_LAUNCH();
  }
  if (a.n_toks == 0) return;
  if (a.D == 64) launch_attend_d<64>(a, s);
  else if (a.D == 128) launch_attend_d<128>(a, s);
  else fail("cuda decode: head dim D=", a.D, " is not supported (64 or 128)");
  KSA_CUDA_CHECK_LAUNCH();
  merge_kernel<<<dim3(unsigned(a.n_toks), unsigned(a.Hkv)), 128, 0, s>>>(a);
  KSA_CUDA_CHECK_LAUNCH();
}

}  // namespace ksa::cuda::detail
