// Device helpers shared by the CUDA attention kernels (attention_fwd.cu, attention_bwd.cu): shared-memory
// addressing and swizzle, cp.async, ldmatrix, the mma.sync m16n8k16 wrappers (bf16/f16 in, fp32 accumulate),
// packing of fp32 pairs to the input dtype, ex2.approx, and the compact 32-bit key tokens staged in smem.
//
// Fragment conventions (PTX ISA, mma.m16n8k16, lane = 4 * gid + tig):
//   A (16x16, row major): a0 = (gid, 2tig..+1), a1 = (gid+8, 2tig..), a2 = (gid, 8+2tig..), a3 = (gid+8, 8+2tig..)
//   B (16x8, "col"):      b0 = (k 2tig..+1, n gid), b1 = (k 8+2tig..+1, n gid)
//   C (16x8, fp32):       c0,c1 = (gid, 2tig..+1), c2,c3 = (gid+8, 2tig..+1)
// so the C layout of two adjacent 16x8 tiles is the A layout of one 16x16 tile (pack2 pairs, no shuffles).
// Tiles in smem are rows of D 16-bit elements split into D/8 16-byte chunks, swizzled by swz().
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/pdl.cuh"
#include "ksa/spec.hpp"

namespace ksa::cuda::dev {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Swizzled byte offset of 16-byte chunk c of row r (conflict-free ldmatrix on 8 consecutive rows).
template <int CHUNKS>
__device__ __forceinline__ int swz(int r, int c) {
  return (r * CHUNKS + (c ^ (r & 7))) * 16;
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // 0 source bytes: zero-fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// A cache policy that makes the lines a load brings into L2 the first candidates for eviction (sm_80+):
// bytes streamed once then displace each other instead of the L2's other lines (dirty ones included).
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
// cp_async16 with an L2 cache policy (l2_evict_first_policy()).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid, uint64_t pol) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src), "r"(n),
               "l"(pol));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Programmatic dependent launch: dev::grid_dependency_wait() and dev::launch_dependents() are in pdl.cuh.

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

template <class T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Row half hf of a thread's C accumulators for a 16-row tile of D columns (element 4j + 2hf + e: row
// gid + 8hf, column 8j + 2tig + e; the mma.sync C layout, also wgmma's per warp) times scale, stored in the
// input dtype at dst (that row's D elements; this thread writes 2 of every 8).
template <class T, int D>
__device__ __forceinline__ void store_acc_row(T* dst, const float* acc, int hf, int tig, float scale) {
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
    *reinterpret_cast<uint32_t*>(dst + j * 8 + 2 * tig) =
        pack2<T>(acc[4 * j + 2 * hf] * scale, acc[4 * j + 2 * hf + 1] * scale);
}

// The inverse of pack2: two stored elements (low half first) as floats.
template <class T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- The online softmax of one query row, shared by the forward, backward and decode kernels. Scores
// live in log2 units (the softmax scale times log2(e) folded into one multiply, so p = ex2(x - m)); a row's
// scores are spread over the 4 lanes of an mma quad (lanes xor 1 and 2). The forward's lse and the decode's
// partial maxima leave in natural-log units.
inline constexpr float kLog2e = 1.4426950408889634f;  // scores -> log2 units
inline constexpr float kLn2 = 0.6931471805599453f;    // log2 units -> natural log

// The max / sum of a row's values over its quad.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One tile of the online-softmax update of a row with running max m (log2 units): tile_max is the row's
// largest score of the tile (log2 units, over the quad). Updates m and returns the offset the tile's
// exponents use, p = ex2(x - offset); alpha is the factor for the running sum and the output accumulators.
// A row that has seen nothing yet (m stays -inf) uses offset 0, so every p is 0 and never NaN.
__device__ __forceinline__ float online_softmax_step(float& m, float tile_max, float& alpha) {
  const float m_new = fmaxf(m, tile_max);
  const float offset = m_new == -INFINITY ? 0.f : m_new;
  alpha = ex2(m - offset);
  m = m_new;
  return offset;
}

// The natural-log lse of a row from its running max m (log2 units) and sum l.
__device__ __forceinline__ float lse_of(float m, float l) { return (m + log2f(l)) * kLn2; }

// ---- THE mask on the device (the forward, backward and their portable and sm_90a kernels). The kernels walk
// key tiles that hold only text rows or only summary rows (KeyTileCursor); within one, the keys a query row
// sees are one inclusive range of gathered rows, the row's range for that region (row_key_ranges, core: the
// rule as ranges). Key rows past a clipped tile's end lie past the region's end and so in no range; query rows
// past the stream's end get the empty range. Staged in shared memory as an int2 (lo, hi).
struct KeyRange {
  int lo = 1, hi = 0;  // empty
  __device__ __forceinline__ bool sees(int x) const { return x >= lo && x <= hi; }
  __device__ __forceinline__ int2 packed() const { return make_int2(lo, hi); }
};
__device__ __forceinline__ KeyRange unpack_range(int2 v) { return KeyRange{v.x, v.y}; }
__device__ __forceinline__ KeyRange key_range(const RowKeyRanges& rk, bool text_tile) {
  return text_tile ? KeyRange{rk.text_lo, rk.text_hi} : KeyRange{rk.sum_lo, rk.sum_hi};
}
// Query row g of a stream of g_end rows, for a tile of the given region.
__device__ __forceinline__ KeyRange key_range(const Layout32& l, int W32, int g, int g_end, bool text_tile) {
  return g < g_end ? key_range(row_key_ranges(l, W32, uint32_t(g)), text_tile) : KeyRange{};
}

}  // namespace ksa::cuda::dev
