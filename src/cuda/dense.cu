// Dense CUDA operations of the Qwen3-KSA forward (include/ksa/cuda_dense.hpp): cuBLASLt matrix products and
// the small kernels around them. Each kernel is one pass over its rows; the reductions are fp32 trees.
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <climits>
#include <cmath>
#include <iterator>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>

#include "check.cuh"
#include "cuda/pdl.cuh"
#include "ksa/cuda_dense.hpp"
#include "ksa/error.hpp"

namespace ksa::cuda {
namespace {

cudaStream_t cs(CudaStream s) { return static_cast<cudaStream_t>(s); }
unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }
// Whether p is a multiple of `bytes` (a vector load's or store's width).
bool aligned(const void* p, uintptr_t bytes = 16) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

#define KSA_CUBLAS_CHECK(expr)                                                                          \
  do {                                                                                                  \
    const cublasStatus_t st_ = (expr);                                                                  \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                                   \
      ::ksa::fail("cuBLASLt error in ", #expr, ": status ", int(st_), " (", cublasLt_status(st_), ")"); \
  } while (0)

const char* cublasLt_status(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "allocation failed (out of device memory?)";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "architecture mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "execution failed";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "not supported";
    default:
      return "error";
  }
}

// ----------------------------------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float bf(const void* p, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// Activations of either dtype a kernel takes (fp32, bf16), to and from fp32.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_f32(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------------------------- small kernels
__global__ void embed_kernel(const __nv_bfloat16* table, const int32_t* ids, int64_t H, float* x) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  const int64_t r = blockIdx.x;
  const __nv_bfloat16* src = table + int64_t(ids[r]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) x[r * H + i] = __bfloat162float(src[i]);
}

// One block per row: x normalised with w (or ws on summary rows) into bf16 out. Rows of up to kNormVec·4·256
// floats (n % 4 == 0, 16-byte aligned rows) are read once with float4 loads held in registers (all loads in
// flight before the sum: a decode step's single row is latency bound); others take the plain strided loop.
constexpr int kNormThreads = 256, kNormVec = 4;
// The vector path's second half, shared by rms_norm_kernel and the normed thin product (gemv_kernel, NORM),
// so that both compute the same values: the block's row of n floats is in the threads' v (thread t holds
// float4 t + j·kNormThreads, zeros past n4 = n / 4); o[0, n) = bf16(x / rms(x) * w) (o: the row's output,
// global or shared memory). red: 32 floats of shared memory for block_sum.
__device__ __forceinline__ void normed_row(const float4 (&v)[kNormVec], int n4, const void* w, float eps, float* red,
                                           __nv_bfloat16* o) {
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kNormVec; ++j) ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(4 * n4) + eps);
#pragma unroll
  for (int j = 0; j < kNormVec; ++j) {
    const int i = threadIdx.x + j * kNormThreads;
    if (i >= n4) break;
    o[4 * i] = __float2bfloat16(v[j].x * inv * bf(w, 4 * i));
    o[4 * i + 1] = __float2bfloat16(v[j].y * inv * bf(w, 4 * i + 1));
    o[4 * i + 2] = __float2bfloat16(v[j].z * inv * bf(w, 4 * i + 2));
    o[4 * i + 3] = __float2bfloat16(v[j].w * inv * bf(w, 4 * i + 3));
  }
}

__global__ void __launch_bounds__(kNormThreads)
    rms_norm_kernel(const float* x, int64_t n, const void* w, const void* ws, const uint8_t* is_summary, float eps,
                    __nv_bfloat16* out) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * n;
  const void* wr = (ws && is_summary && is_summary[r]) ? ws : w;
  const bool vec = n % 4 == 0 && n <= int64_t(kNormVec) * 4 * kNormThreads;
  if (vec) {
    const int n4 = int(n / 4);
    float4 v[kNormVec];
#pragma unroll
    for (int j = 0; j < kNormVec; ++j) {
      const int i = threadIdx.x + j * kNormThreads;
      v[j] = i < n4 ? reinterpret_cast<const float4*>(xr)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    normed_row(v, n4, wr, eps, red, out + r * n);
    return;
  }
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(n) + eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[r * n + i] = __float2bfloat16(xr[i] * inv * bf(wr, i));
}

// V consecutive elements per thread (V = 4: 16-byte loads and stores, where count and the addresses allow).
template <int V>
__global__ void add_kernel(float* x, const float* h, int64_t count) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (i >= count) return;
  if constexpr (V == 4) {
    float4 a = *reinterpret_cast<const float4*>(x + i);
    const float4 b = *reinterpret_cast<const float4*>(h + i);
    a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
    *reinterpret_cast<float4*>(x + i) = a;
  } else {
    x[i] += h[i];
  }
}

__global__ void gather_kernel(const uint32_t* in, int64_t words, const int32_t* rows, uint32_t* out, bool scatter) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  const int64_t i = blockIdx.x, r = rows[i];
  for (int64_t c = threadIdx.x; c < words; c += blockDim.x) {
    if (scatter) out[r * words + c] = in[i * words + c];
    else out[i * words + c] = in[r * words + c];
  }
}

template <class T>
__global__ void blend_kernel(T* y, int64_t ldy, const T* ys, const int32_t* rows, int64_t cols, float mix, bool whole) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  const int64_t i = blockIdx.x, r = rows[i];
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    T& d = y[r * ldy + c];
    const float s = to_f32(ys[i * cols + c]);
    d = from_f32<T>(whole ? s : mix * s + (1.f - mix) * to_f32(d));
  }
}

// cs[r, i] = (cos, sin) of positions[r] * inv_freq[i] for i < half: the angle in fp32 (as the reference
// computes it), cos and sin in double, rounded to fp32. One table per step, read by every layer's
// qk_norm_rope_kernel (the same values it computed per head before).
__global__ void rope_table_kernel(const int32_t* positions, int64_t n, int half, const float* inv_freq, float2* cs) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * half) return;
  const int64_t r = i / half;
  const float angle = float(positions[r]) * inv_freq[i - r * half];
  cs[i] = make_float2(float(cos(double(angle))), float(sin(double(angle))));
}

// One warp per (row, head): per-head RMSNorm, RoPE (lane holds elements lane + 32 j; element i pairs with
// i + D/2, i.e. j with j + D/64; cos and sin from the step's table, rope_table_kernel), bf16 out. Heads
// [0, Hq) are q, [Hq, Hq + Hkv) k, [Hq + Hkv, Hq + 2 Hkv) v, read from qkv rows of (Hq + 2 Hkv) D values
// (T: fp32 or bf16).
template <int D, class T>
__global__ void qk_norm_rope_kernel(const T* qkv, int64_t n, int Hq, int Hkv, const void* qn, const void* kn,
                                    float eps, const float2* rope, __nv_bfloat16* qc, __nv_bfloat16* kc,
                                    __nv_bfloat16* vc) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  constexpr int J = D / 32, HALF = J / 2;
  const int64_t gw = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32, H = Hq + 2 * Hkv;
  if (gw >= n * H) return;
  const int64_t r = gw / H;
  const int h = int(gw % H);
  const T* src = qkv + (r * H + h) * D;
  __nv_bfloat16* dst;
  const void* w = nullptr;
  if (h < Hq) dst = qc + (r * Hq + h) * D, w = qn;
  else if (h < Hq + Hkv) dst = kc + (r * Hkv + h - Hq) * D, w = kn;
  else dst = vc + (r * Hkv + h - Hq - Hkv) * D;
  float e[J];
#pragma unroll
  for (int j = 0; j < J; ++j) e[j] = to_f32(src[lane + 32 * j]);
  if (w) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < J; ++j) ss += e[j] * e[j];
    ss = warp_sum(ss);
    const float inv = rsqrtf(ss / float(D) + eps);
#pragma unroll
    for (int j = 0; j < J; ++j) e[j] = e[j] * inv * bf(w, lane + 32 * j);
#pragma unroll
    for (int j = 0; j < HALF; ++j) {
      const float2 t = rope[r * (D / 2) + lane + 32 * j];
      const float a = e[j], b = e[j + HALF];
      e[j] = a * t.x - b * t.y;
      e[j + HALF] = b * t.x + a * t.y;
    }
  }
#pragma unroll
  for (int j = 0; j < J; ++j) dst[lane + 32 * j] = __float2bfloat16(e[j]);
}

__device__ __forceinline__ __nv_bfloat16 silu_times(float g, float u) {
  return __float2bfloat16(g / (1.f + expf(-g)) * u);
}

// V consecutive columns per thread (V = 16 bytes of T where I and the addresses allow: 16-byte loads of the
// gate and up halves; 1.95 TB/s with one fp32 column per thread on an H100, a prefill piece's 5% there). gu
// holds T = fp32 or bf16 (the product's values rounded to bf16, as the reference's bf16 linears round them).
template <class T, int V>
__global__ void silu_mul_kernel(const T* gu, int64_t n, int64_t I, __nv_bfloat16* out) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (i >= n * I) return;
  const int64_t r = i / I, c = i - r * I;
  const T* g = gu + r * 2 * I + c;
  if constexpr (V > 1) {
    static_assert(V * sizeof(T) == 16, "16-byte loads");
    __align__(16) T a[V], b[V];
    *reinterpret_cast<uint4*>(a) = *reinterpret_cast<const uint4*>(g);
    *reinterpret_cast<uint4*>(b) = *reinterpret_cast<const uint4*>(g + I);
    __align__(16) __nv_bfloat16 o[V];
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = silu_times(to_f32(a[j]), to_f32(b[j]));
    if constexpr (V == 8) *reinterpret_cast<uint4*>(out + i) = *reinterpret_cast<const uint4*>(o);
    else *reinterpret_cast<uint2*>(out + i) = *reinterpret_cast<const uint2*>(o);
  } else {
    out[i] = silu_times(to_f32(g[0]), to_f32(g[I]));
  }
}

// ------------------------------------------------------------------------------------------ sampling
constexpr int kSampleThreads = 1024;
using u64 = unsigned long long;

struct SampleShared {
  u64 hist[256];
  u64 warp[32];
  float fv[32];
  int iv[32];
  uint32_t prefix;
  u64 rem;
};

// Calls f(i, lg[i]) for i = begin, begin + step, ... < end, in that order, with kLogitLoads loads in flight
// per thread: a loop that waits for each load is latency bound (a 152K vocabulary is 148 round trips of a
// 1024-thread block, ~100 us from DRAM when a batch's logits no longer sit in L2).
constexpr int kLogitLoads = 8;
template <class F>
__device__ __forceinline__ void for_logits(const float* lg, int begin, int end, int step, F&& f) {
  for (int i0 = begin; i0 < end; i0 += kLogitLoads * step) {
    float v[kLogitLoads];
#pragma unroll
    for (int j = 0; j < kLogitLoads; ++j) v[j] = i0 + j * step < end ? lg[i0 + j * step] : 0.f;
#pragma unroll
    for (int j = 0; j < kLogitLoads; ++j)
      if (i0 + j * step < end) f(i0 + j * step, v[j]);
  }
}

// Order-preserving key of a float: larger float, larger key.
__device__ __forceinline__ uint32_t fkey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum over the block in thread order; `total` gets the sum (deterministic).
__device__ u64 block_exclusive_scan(u64 v, u64& total, SampleShared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  u64 inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  __syncthreads();
  if (lane == 31) sh.warp[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    u64 w = sh.warp[lane], wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 t = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += t;
    }
    sh.warp[lane] = wi - w;  // exclusive offset of each warp
    if (lane == 31) sh.rem = wi;
  }
  __syncthreads();
  total = sh.rem;
  const u64 r = sh.warp[warp] + inc - v;
  __syncthreads();
  return r;
}

// The largest key K with weight(keys >= K) >= target among elements whose key is >= lo (weight(l): 1 for
// counts, fixed-point probability mass for top-p), by four 8-bit radix passes.
template <class WeightFn>
__device__ uint32_t select_key(const float* lg, int V, uint32_t lo, u64 target, WeightFn weight, SampleShared& sh) {
  uint32_t prefix = 0, mask = 0;
  u64 rem = target;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for_logits(lg, int(threadIdx.x), V, int(blockDim.x), [&](int, float l) {
      const uint32_t key = fkey(l);
      if (key >= lo && (key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], weight(l));
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      u64 cum = 0;
      int d = 255;
      for (; d > 0; --d) {
        if (cum + sh.hist[d] >= rem) break;
        cum += sh.hist[d];
      }
      sh.prefix = prefix | (uint32_t(d) << shift);
      sh.rem = rem - cum;
    }
    __syncthreads();
    prefix = sh.prefix;
    rem = sh.rem;
    mask |= 255u << shift;
    __syncthreads();
  }
  return prefix;
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(float* logits, int V, const SampleArgs* args, const int32_t* pairs, int32_t* out) {
  dev::launch_dependents();
  dev::grid_dependency_wait();  // launched programmatically (pdl.cuh)
  __shared__ SampleShared sh;
  const SampleArgs a = args[blockIdx.x];
  float* lg = logits + a.row * int64_t(V);
  for (int i = threadIdx.x; i < a.hist_n; i += blockDim.x) {
    const int t = pairs[2 * (a.hist0 + i)], c = pairs[2 * (a.hist0 + i) + 1];
    if (t < 0 || t >= V) continue;
    float x = lg[t];
    if (a.repetition_penalty != 1.f) x = x > 0.f ? x / a.repetition_penalty : x * a.repetition_penalty;
    lg[t] = x - (a.presence_penalty + a.frequency_penalty * float(c));
  }
  __syncthreads();
  // Loads are coalesced: thread t reads ids t, t + blockDim.x, ... (the argmax keeps the lowest id of the
  // largest logit; sums of integer masses do not depend on the order); for the draw, warp w owns the
  // contiguous ids [w0, w1) and walks them 32 at a time, in id order.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, stride = int(blockDim.x);
  float best = -INFINITY;
  int bid = INT_MAX;
  for_logits(lg, int(threadIdx.x), V, stride, [&](int i, float l) {
    if (l > best) best = l, bid = i;
  });
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bid, o);
    if (ob > best || (ob == best && oi < bid)) best = ob, bid = oi;
  }
  if (lane == 0) sh.fv[warp] = best, sh.iv[warp] = bid;
  __syncthreads();
  if (warp == 0) {
    best = lane < int(blockDim.x / 32) ? sh.fv[lane] : -INFINITY;
    bid = lane < int(blockDim.x / 32) ? sh.iv[lane] : INT_MAX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bid, o);
      if (ob > best || (ob == best && oi < bid)) best = ob, bid = oi;
    }
    if (lane == 0) sh.fv[0] = best, sh.iv[0] = bid;
  }
  __syncthreads();
  best = sh.fv[0];
  bid = sh.iv[0];
  __syncthreads();
  if (a.temperature == 0.f || bid == INT_MAX) {
    if (threadIdx.x == 0) out[blockIdx.x] = bid == INT_MAX ? 0 : bid;
    return;
  }
  const float m = best, invT = 1.f / a.temperature;
  auto prob = [&](float l) { return expf((l - m) * invT); };
  auto mass = [&](float l) { return u64(prob(l) * 4294967296.f); };  // fixed point 2^32: p <= 1
  uint32_t lo = 0;
  if (a.top_k > 0 && a.top_k < V)
    lo = select_key(
        lg, V, 0u, u64(a.top_k), [](float) { return u64(1); }, sh);
  if (a.top_p < 1.f) {
    u64 my = 0, Z = 0;
    for_logits(lg, int(threadIdx.x), V, stride, [&](int, float l) {
      if (fkey(l) >= lo) my += mass(l);
    });
    block_exclusive_scan(my, Z, sh);
    u64 target = u64(double(a.top_p) * double(Z));
    if (target < 1) target = 1;
    const uint32_t kp = select_key(lg, V, lo, target, mass, sh);
    lo = kp > lo ? kp : lo;
  }
  auto kept = [&](float l) { return fkey(l) >= lo && prob(l) >= a.min_p; };
  const int wchunk = (V + stride / 32 - 1) / (stride / 32), w0 = min(V, warp * wchunk), w1 = min(V, w0 + wchunk);
  u64 my = 0, total = 0;
  for_logits(lg, w0 + lane, w1, 32, [&](int, float l) {
    if (kept(l)) my += mass(l);
  });
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) my += __shfl_xor_sync(0xffffffffu, my, o);  // the warp's sum, in every lane
  // Exclusive prefix of the warps' sums in warp order (lane 0 of each warp carries its warp's sum).
  const u64 excl = __shfl_sync(0xffffffffu, block_exclusive_scan(lane == 0 ? my : 0, total, sh), 0);
  u64 r = u64(a.u * double(total));
  if (r >= total) r = total - 1;
  if (r >= excl && r < excl + my) {  // the drawn token is among this warp's ids
    u64 c = excl;
    for (int base = w0; base < w1; base += 32) {
      const int i = base + lane;
      u64 inc = i < w1 && kept(lg[i]) ? mass(lg[i]) : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += t;
      }
      const u64 strip = __shfl_sync(0xffffffffu, inc, 31);
      if (r < c + strip) {  // the first id whose inclusive sum passes r
        const unsigned hit = __ballot_sync(0xffffffffu, r < c + inc);
        if (lane == 0) out[blockIdx.x] = base + __ffs(int(hit)) - 1;
        break;
      }
      c += strip;
    }
  }
}

// ------------------------------------------------------------------------------------ small-M products
// y[m, n] = sum_k x[m, k] W[n, k] for M <= kGemvMaxM rows (decode: one row per sequence). A product this thin
// is a read of W: a block of 256 threads takes kGemvRows rows of W, every thread a strided share of each row's
// 16-byte chunks, all its loads issued before the sums (not kept in L1); x is read from global memory beside
// them (through the read-only cache: every block reads all of x, so it is served from L1/L2), with no
// staging barrier in front of the first weight loads; the sums are reduced across the warp, then across the
// block's warps in shared memory. Enough blocks and bytes in
// flight for a full read even where N is a few thousand rows and K long (the down projection). K % 8 == 0,
// 16-byte aligned.
// The block shape is a template parameter (GemvShape): THREADS per block, ROWS of W per block, UNROLL chunks
// per row in flight per thread. kGemvShapes lists the shapes `ksa bench-gemm --gemv-shape` compares (batch-1
// products only); shape 0 is the one the engine runs.
// (Persistent blocks with x staged in shared memory, as the NORM form below, did not pay for the plain
// products: H100, 2026-12-07, with 2, 3 or all resident blocks per SM, batch 1 at 16K 0.2-0.6% longer
// graphs; docs/benchmarks.md.)
struct GemvShape {
  int threads, rows, unroll;
};
constexpr GemvShape kGemvShapes[] = {{256, 4, 2}, {128, 4, 4}, {128, 8, 2}, {64, 4, 4},
                                     {64, 8, 4},  {32, 4, 8},  {256, 2, 4}, {256, 8, 2}};
constexpr int kGemvShapeCount = int(sizeof(kGemvShapes) / sizeof(kGemvShapes[0]));

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* y = reinterpret_cast<const __nv_bfloat162*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 u = __bfloat1622float2(x[i]), v = __bfloat1622float2(y[i]);
    s = fmaf(u.x, v.x, s);
    s = fmaf(u.y, v.y, s);
  }
  return s;
}

// The epilogue of a thin product: store y; GLU: W is [gate; up] ([2N, K], gate rows then up rows) and
// y[m, n] = bf16(silu(x·gate_n) · (x·up_n)): a block takes kGemvRows / 2 gate rows and the same up rows, and
// joins them in its epilogue (the SwiGLU of silu_mul, without the [M, 2N] fp32 round trip and its kernel);
// add: y is the fp32 residual stream and y[m, n] += x·W_n (the sums add_kernel would add, without the fp32
// round trip and its kernel).
enum class Epi { store, glu, add };

// NORM: x is the fp32 residual stream `nx.x` [M, K], and the product's input is bf16(x / rms(x) * w), computed
// by every block into shared memory as rms_norm_kernel computes it (the same loads, sums and roundings: the
// block has kNormThreads threads and K <= kNormVec * 4 * kNormThreads), so the RMSNorm needs no kernel of its
// own. The blocks are then persistent: gridDim.x blocks (those resident at once) take the groups of rows
// blockIdx.x, + gridDim.x, ..., so each block normalises x once (with a block per group, every block would
// read x and the norm weight through L2: 3x the plain product's L2 reads, measured slower on 2026-12-07). The
// next group's first weight loads are issued before the current group's reduction.
struct GemvNorm {
  const float* x = nullptr;
  const __nv_bfloat16* w = nullptr;
  float eps = 0.f;
};

template <int M, class YT, Epi EPI, bool NORM, int kGemvThreads, int kGemvRows, int kGemvUnroll>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const uint4* __restrict__ x, int chunks, const uint4* __restrict__ W, int N, YT* __restrict__ y,
                int64_t ldy, const GemvNorm nx) {
  constexpr bool GLU = EPI == Epi::glu;
  static_assert(!GLU || (std::is_same_v<YT, __nv_bfloat16> && kGemvRows % 2 == 0), "GLU: bf16 out, row pairs");
  static_assert(EPI != Epi::add || std::is_same_v<YT, float>, "add: into the fp32 residual stream");
  static_assert(!NORM || kGemvThreads == kNormThreads, "NORM sums as rms_norm_kernel does");
  constexpr int OUT_ROWS = GLU ? kGemvRows / 2 : kGemvRows;  // output columns per group
  __shared__ float red[kGemvThreads / 32][kGemvRows * M];
  extern __shared__ uint4 sx[];  // NORM: the normed x, M rows of `chunks` 16-byte chunks (bf16)
  const int groups = (N + OUT_ROWS - 1) / OUT_ROWS;
  int n0 = blockIdx.x * OUT_ROWS;
  const uint4* w[kGemvRows];
  auto point = [&](int r0) {
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      if constexpr (GLU) w[r] = W + (int64_t(min(r0 + r % OUT_ROWS, N - 1)) + (r < OUT_ROWS ? 0 : N)) * chunks;
      else w[r] = W + int64_t(min(r0 + r, N - 1)) * chunks;
    }
  };
  point(n0);
  float acc[kGemvRows][M];
  uint4 a[kGemvUnroll][kGemvRows];
  auto load = [&](int c0) {
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        const int c = c0 + kGemvThreads * u;
        a[u][r] = c < chunks ? ld_stream16(w[r] + c) : make_uint4(0, 0, 0, 0);
      }
  };
  // The weights are constant for the step: the first batch is in flight before the wait for x (pdl.cuh).
  load(threadIdx.x);
  dev::launch_dependents();
  dev::grid_dependency_wait();
  if constexpr (NORM) {
    // As rms_norm_kernel's vector path, row by row; the bf16 results into sx.
    const int n4 = chunks * 2;
    for (int m = 0; m < M; ++m) {
      const float* xr = nx.x + int64_t(m) * chunks * 8;
      float4 v[kNormVec];
#pragma unroll
      for (int j = 0; j < kNormVec; ++j) {
        const int i = threadIdx.x + j * kNormThreads;
        v[j] = i < n4 ? __ldcg(reinterpret_cast<const float4*>(xr) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      normed_row(v, n4, nx.w, nx.eps, &red[0][0], reinterpret_cast<__nv_bfloat16*>(sx + m * chunks));
      __syncthreads();  // red is reused by the next row's sum (and by the reduction below)
    }
  }
  for (;;) {
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    for (int c0 = threadIdx.x; c0 < chunks; c0 += kGemvThreads * kGemvUnroll) {
      if (c0 != int(threadIdx.x)) load(c0);
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int c = c0 + kGemvThreads * u;
        if (c >= chunks) break;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          uint4 xv;
          if constexpr (NORM) xv = sx[m * chunks + c];
          else xv = __ldcg(x + int64_t(m) * chunks + c);  // written by the kernel before: not via .nc
#pragma unroll
          for (int r = 0; r < kGemvRows; ++r) acc[r][m] += dot8(a[u][r], xv);
        }
      }
    }
    // NORM: the block's next group, its first loads in flight under this group's reduction.
    const int next = n0 + int(gridDim.x) * OUT_ROWS;
    const bool more = NORM && next < groups * OUT_ROWS;
    if (more) {
      point(next);
      load(threadIdx.x);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float v = warp_sum(acc[r][m]);
        if (lane == 0) red[warp][r * M + m] = v;
      }
    __syncthreads();
    auto total = [&](int i) {
      float v = 0.f;
#pragma unroll
      for (int j = 0; j < kGemvThreads / 32; ++j) v += red[j][i];
      return v;
    };
    for (int i = threadIdx.x; i < OUT_ROWS * M; i += kGemvThreads) {
      const int r = i / M, m = i % M;
      if (n0 + r >= N) continue;
      if constexpr (GLU) {
        const float g = total(i), u = total(i + OUT_ROWS * M);
        y[m * ldy + n0 + r] = silu_times(g, u);  // as silu_mul_kernel
      } else if constexpr (EPI == Epi::add) {
        y[m * ldy + n0 + r] += total(i);  // as add_kernel
      } else {
        y[m * ldy + n0 + r] = from_f32<YT>(total(i));
      }
    }
    if (!more) break;
    n0 = next;
    __syncthreads();  // red is read above before the next group's sums land in it
  }
}

// Blocks of `kernel` resident per SM with `smem` dynamic bytes, times the SMs (cached: NORM launches size
// their persistent grid by it).
int resident_blocks(const void* kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, threads, smem);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int dev = 0, sms = 0, per_sm = 0;
  KSA_CUDA_CHECK(cudaGetDevice(&dev));
  KSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  KSA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  return cache[key] = std::max(1, per_sm) * sms;
}

template <int M, class YT, Epi EPI, bool NORM = false, int SH = 0>
void launch_gemv(const void* x, int64_t K, const void* W, int64_t N, void* y, int64_t ldy, cudaStream_t s,
                 const GemvNorm& nx = {}) {
  constexpr GemvShape g = kGemvShapes[SH];
  const int chunks = int(K / 8);
  const auto kernel = gemv_kernel<M, YT, EPI, NORM, g.threads, g.rows, g.unroll>;
  unsigned grid = blocks_for(N, EPI == Epi::glu ? g.rows / 2 : g.rows);
  const size_t smem = NORM ? size_t(M) * size_t(K) * 2 : 0;
  if (NORM) grid = std::min(grid, unsigned(resident_blocks(reinterpret_cast<const void*>(kernel), g.threads, smem)));
  detail::launch_pdl(kernel, grid, g.threads, smem, s, static_cast<const uint4*>(x), chunks,
                     static_cast<const uint4*>(W), int(N), static_cast<YT*>(y), ldy, nx);
}

// epi glu: bf16 out (ydt ignored); add: fp32 y += (ydt ignored).
template <int M, int SH = 0>
void gemv_m(const void* x, int64_t K, const void* W, int64_t N, void* y, DType ydt, int64_t ldy, cudaStream_t s,
            Epi epi) {
  if (epi == Epi::glu) launch_gemv<M, __nv_bfloat16, Epi::glu, false, SH>(x, K, W, N, y, ldy, s);
  else if (epi == Epi::add) launch_gemv<M, float, Epi::add, false, SH>(x, K, W, N, y, ldy, s);
  else if (ydt == DType::f32) launch_gemv<M, float, Epi::store, false, SH>(x, K, W, N, y, ldy, s);
  else launch_gemv<M, __nv_bfloat16, Epi::store, false, SH>(x, K, W, N, y, ldy, s);
}

// The normed forms (NORM: x is the fp32 residual stream nx.x): store (fp32 or bf16 out) or glu.
template <int M>
void gemv_norm_m(const GemvNorm& nx, int64_t K, const void* W, int64_t N, void* y, DType ydt, int64_t ldy,
                 cudaStream_t s, bool glu) {
  if (glu) launch_gemv<M, __nv_bfloat16, Epi::glu, true>(nullptr, K, W, N, y, ldy, s, nx);
  else if (ydt == DType::f32) launch_gemv<M, float, Epi::store, true>(nullptr, K, W, N, y, ldy, s, nx);
  else launch_gemv<M, __nv_bfloat16, Epi::store, true>(nullptr, K, W, N, y, ldy, s, nx);
}

// Batch-1 products in block shape `shape` (kGemvShapes; ksa bench-gemm).
template <int SH = 0>
void gemv_1(int shape, const void* x, int64_t K, const void* W, int64_t N, void* y, DType ydt, int64_t ldy,
            cudaStream_t s, Epi epi) {
  if constexpr (SH < kGemvShapeCount) {
    if (shape == SH) return gemv_m<1, SH>(x, K, W, N, y, ydt, ldy, s, epi);
    return gemv_1<SH + 1>(shape, x, K, W, N, y, ydt, ldy, s, epi);
  } else {
    fail("cuda linear: no GEMV block shape ", shape, " (0..", kGemvShapeCount - 1, ")");
  }
}

// Whether gemv() takes this product.
bool gemv_fits(const void* x, int64_t M, int64_t K, const void* W, int64_t N) {
  return M >= 1 && M <= kGemvMaxM && K % 8 == 0 && K / 8 < (int64_t(1) << 31) && N < (int64_t(1) << 31) && aligned(x) &&
         aligned(W);
}

// Whether gemv_norm() takes this product: gemv_fits, a row rms_norm_kernel reads in one vector pass, and the
// normed rows within the default 48 KiB of shared memory.
bool gemv_norm_fits(const float* x, int64_t M, int64_t K, const void* W, int64_t N) {
  return gemv_fits(x, M, K, W, N) && K <= int64_t(kNormVec) * 4 * kNormThreads && M * K * 2 <= 48 * 1024;
}

void gemv(const void* x, int64_t M, int64_t K, const void* W, int64_t N, void* y, DType ydt, int64_t ldy,
          cudaStream_t s, Epi epi = Epi::store, int shape = 0) {
  if (M == 1 && shape != 0) return gemv_1(shape, x, K, W, N, y, ydt, ldy, s, epi);
  // gemv_m<M> at index M - 1.
  static constexpr decltype(&gemv_m<1>) kByRows[] = {&gemv_m<1>, &gemv_m<2>, &gemv_m<3>, &gemv_m<4>,
                                                     &gemv_m<5>, &gemv_m<6>, &gemv_m<7>, &gemv_m<8>};
  static_assert(std::size(kByRows) == kGemvMaxM);
  if (M < 1 || M > kGemvMaxM) fail("cuda linear: internal error: gemv with M=", M);
  kByRows[M - 1](x, K, W, N, y, ydt, ldy, s, epi);
}

void gemv_norm(const GemvNorm& nx, int64_t M, int64_t K, const void* W, int64_t N, void* y, DType ydt, int64_t ldy,
               cudaStream_t s, bool glu) {
  static constexpr decltype(&gemv_norm_m<1>) kByRows[] = {&gemv_norm_m<1>, &gemv_norm_m<2>, &gemv_norm_m<3>,
                                                          &gemv_norm_m<4>, &gemv_norm_m<5>, &gemv_norm_m<6>,
                                                          &gemv_norm_m<7>, &gemv_norm_m<8>};
  static_assert(std::size(kByRows) == kGemvMaxM);
  if (M < 1 || M > kGemvMaxM) fail("cuda linear: internal error: normed gemv with M=", M);
  kByRows[M - 1](nx, K, W, N, y, ydt, ldy, s, glu);
}

}  // namespace

// ---------------------------------------------------------------------------------------------- Gemm
struct Gemm::Impl {
  cublasLtHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  void* workspace = nullptr;
  size_t ws_bytes = size_t(32) << 20;
  bool small_m = true;  // products of at most kGemvMaxM rows through gemv_kernel
  int gemv_shape = 0;   // kGemvShapes index for batch-1 products (set_gemv_shape)
  bool autotune = false;
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int>, Plan> plans;
  // Autotuning: the fastest algorithm found per (rows rounded up to a power of two, K, N, ldy, output type),
  // tried first for every product of that class; a scratch output to time the candidates into; two events.
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int>, cublasLtMatmulAlgo_t> tuned;
  void* tune_y = nullptr;
  size_t tune_y_bytes = 0;
  cudaEvent_t ev[2] = {nullptr, nullptr};

  // y = x W^T (epi store) or y += x W^T (epi add: fp32 y) through the thin kernel where it fits, else
  // cuBLASLt (beta 0 or 1).
  void product(const void* x, int64_t M, int64_t K, const void* W, int64_t N, void* y, DType ydt, int64_t ldy,
               Epi epi) {
    if (ldy == 0) ldy = N;
    if (M < 1 || K < 1 || N < 1 || ldy < N) fail("cuda linear: bad shape M=", M, " K=", K, " N=", N, " ldy=", ldy);
    if (small_m && gemv_fits(x, M, K, W, N)) return gemv(x, M, K, W, N, y, ydt, ldy, stream, epi, gemv_shape);
    Plan& p = plan(M, K, N, ldy, ydt, x, W);
    const float alpha = 1.f, beta = epi == Epi::add ? 1.f : 0.f;
    KSA_CUBLAS_CHECK(cublasLtMatmul(handle, p.op, &alpha, W, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo, workspace,
                                    ws_bytes, stream));
  }

  // The plan of a product shape, made at its first use: cuBLASLt's first heuristic choice, or with autotune
  // the fastest of its candidates timed on the product's own x and W (at the first use of the shape's class
  // outside a CUDA graph capture; its rows' class reuses that choice where cuBLASLt accepts it).
  Plan& plan(int64_t M, int64_t K, int64_t N, int64_t ldy, DType ydt, const void* x, const void* W) {
    const auto key = std::make_tuple(M, K, N, ldy, int(ydt));
    auto it = plans.find(key);
    if (it != plans.end()) return it->second;
    Plan p;
    // Column-major view: y^T [N, M] = W [K, N]^T x^T [K, M].
    KSA_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    KSA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    KSA_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    const cudaDataType_t yt = ydt == DType::f32 ? CUDA_R_32F : CUDA_R_16BF;
    KSA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, uint64_t(K), uint64_t(N), K));
    KSA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, uint64_t(K), uint64_t(M), K));
    KSA_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, yt, uint64_t(N), uint64_t(M), ldy));
    cublasLtMatmulPreference_t pref = nullptr;
    KSA_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    KSA_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                          sizeof ws_bytes));
    constexpr int kCandidates = 8;
    cublasLtMatmulHeuristicResult_t res[kCandidates] = {};
    int found = 0;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.a, p.b, p.c, p.c, pref, autotune ? kCandidates : 1, res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0)
      fail("cuBLASLt: no algorithm for the matrix product M=", M, " K=", K, " N=", N, " (bf16 in, ", dtype_name(ydt),
           " out)");
    p.algo = res[0].algo;
    if (autotune) {
      int64_t mb = 1;
      while (mb < M) mb *= 2;
      const auto cls = std::make_tuple(mb, K, N, ldy, int(ydt));
      auto t = tuned.find(cls);
      cublasLtMatmulHeuristicResult_t check{};
      if (t != tuned.end()) {
        if (cublasLtMatmulAlgoCheck(handle, p.op, p.a, p.b, p.c, p.c, &t->second, &check) == CUBLAS_STATUS_SUCCESS &&
            check.workspaceSize <= ws_bytes)
          p.algo = t->second;
      } else if (found > 1 && !capturing()) {
        p.algo = fastest(p, res, found, M, N, ldy, ydt, x, W);
        tuned.emplace(cls, p.algo);
      }
    }
    return plans.emplace(key, p).first->second;
  }

  bool capturing() const {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    KSA_CUDA_CHECK(cudaStreamIsCapturing(stream, &cs));
    return cs != cudaStreamCaptureStatusNone;
  }

  // The candidate that runs the product fastest: each twice untimed, then the mean of 5 behind events, into a
  // scratch output (x and W are the product's own: read only).
  cublasLtMatmulAlgo_t fastest(const Plan& p, const cublasLtMatmulHeuristicResult_t* res, int found, int64_t M,
                               int64_t N, int64_t ldy, DType ydt, const void* x, const void* W) {
    const size_t y_bytes = size_t(ldy * (M - 1) + N) * dtype_size(ydt);
    if (y_bytes > tune_y_bytes) {
      KSA_CUDA_CHECK(cudaStreamSynchronize(stream));
      cudaFree(tune_y);
      tune_y = nullptr;
      tune_y_bytes = 0;
      KSA_CUDA_CHECK(cudaMalloc(&tune_y, y_bytes));
      tune_y_bytes = y_bytes;
    }
    KSA_CUDA_CHECK(cudaMemsetAsync(tune_y, 0, y_bytes, stream));
    for (cudaEvent_t& e : ev)
      if (!e) KSA_CUDA_CHECK(cudaEventCreate(&e));
    const float alpha = 1.f, beta = 0.f;
    float best_ms = 0;
    int best = -1;
    for (int i = 0; i < found; ++i) {
      if (res[i].state != CUBLAS_STATUS_SUCCESS || res[i].workspaceSize > ws_bytes) continue;
      auto launch = [&] {
        return cublasLtMatmul(handle, p.op, &alpha, W, p.a, x, p.b, &beta, tune_y, p.c, tune_y, p.c, &res[i].algo,
                              workspace, ws_bytes, stream);
      };
      constexpr int kRuns = 5;
      bool ok = launch() == CUBLAS_STATUS_SUCCESS && launch() == CUBLAS_STATUS_SUCCESS;
      KSA_CUDA_CHECK(cudaEventRecord(ev[0], stream));
      for (int r = 0; ok && r < kRuns; ++r) ok = launch() == CUBLAS_STATUS_SUCCESS;
      KSA_CUDA_CHECK(cudaEventRecord(ev[1], stream));
      KSA_CUDA_CHECK(cudaEventSynchronize(ev[1]));
      float ms = 0;
      KSA_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
      if (ok && (best < 0 || ms < best_ms)) best_ms = ms, best = i;
    }
    return res[std::max(best, 0)].algo;
  }
};

Gemm::Gemm(CudaStream stream, bool small_m_kernel, bool autotune) : impl_(std::make_unique<Impl>()) {
  impl_->stream = cs(stream);
  impl_->small_m = small_m_kernel;
  impl_->autotune = autotune;
  KSA_CUBLAS_CHECK(cublasLtCreate(&impl_->handle));
  KSA_CUDA_CHECK(cudaMalloc(&impl_->workspace, impl_->ws_bytes));
}

Gemm::~Gemm() {
  for (auto& [k, p] : impl_->plans) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
  }
  cudaFree(impl_->workspace);
  cudaFree(impl_->tune_y);
  for (cudaEvent_t e : impl_->ev)
    if (e) cudaEventDestroy(e);
  if (impl_->handle) cublasLtDestroy(impl_->handle);
}

void Gemm::run(const void* x, int64_t M, int64_t K, const void* W, int64_t N, void* y, DType ydt, int64_t ldy) {
  if (ydt != DType::f32 && ydt != DType::bf16) fail("cuda linear: output must be f32 or bf16");
  impl_->product(x, M, K, W, N, y, ydt, ldy, Epi::store);
}

bool Gemm::swiglu_fits(const void* x, int64_t M, int64_t K, const void* Wgu, int64_t I) const {
  return impl_->small_m && gemv_fits(x, M, K, Wgu, 2 * I);
}

void Gemm::run_swiglu(const void* x, int64_t M, int64_t K, const void* Wgu, int64_t I, void* out) {
  if (!swiglu_fits(x, M, K, Wgu, I))
    fail("cuda swiglu: the product M=", M, " K=", K, " I=", I, " does not fit the thin kernel (swiglu_fits)");
  gemv(x, M, K, Wgu, I, out, DType::bf16, I, impl_->stream, Epi::glu, impl_->gemv_shape);
}

void Gemm::run_add(const void* x, int64_t M, int64_t K, const void* W, int64_t N, float* y, int64_t ldy) {
  impl_->product(x, M, K, W, N, y, DType::f32, ldy, Epi::add);
}

bool Gemm::norm_fits(const float* x, int64_t M, int64_t K, const void* W, int64_t N) const {
  return impl_->small_m && gemv_norm_fits(x, M, K, W, N);
}

void Gemm::run_norm(const float* x, int64_t M, int64_t K, const void* norm_w, float eps, const void* W, int64_t N,
                    void* y, DType ydt, int64_t ldy, bool glu) {
  if (ldy == 0) ldy = N;
  if (!norm_fits(x, M, K, W, glu ? 2 * N : N) || ldy < N || !aligned(norm_w, 2))
    fail("cuda linear: the normed product M=", M, " K=", K, " N=", N, " does not fit the thin kernel (norm_fits)");
  if (!glu && ydt != DType::f32 && ydt != DType::bf16) fail("cuda linear: output must be f32 or bf16");
  gemv_norm(GemvNorm{x, static_cast<const __nv_bfloat16*>(norm_w), eps}, M, K, W, N, y, ydt, ldy, impl_->stream, glu);
}

int Gemm::gemv_shapes() { return kGemvShapeCount; }

int64_t Gemm::tuned_classes() const { return int64_t(impl_->tuned.size()); }

std::string Gemm::gemv_shape_name(int shape) {
  if (shape < 0 || shape >= kGemvShapeCount) fail("cuda linear: no GEMV block shape ", shape);
  const GemvShape& g = kGemvShapes[shape];
  return std::to_string(g.threads) + " threads x " + std::to_string(g.rows) + " rows x unroll " +
         std::to_string(g.unroll);
}

void Gemm::set_gemv_shape(int shape) {
  if (shape < 0 || shape >= kGemvShapeCount)
    fail("cuda linear: no GEMV block shape ", shape, " (0..", kGemvShapeCount - 1, ")");
  impl_->gemv_shape = shape;
}

// ------------------------------------------------------------------------------------------ launchers
void embed_rows(const void* table, const int32_t* ids, int64_t n, int64_t H, float* x, CudaStream stream) {
  if (n == 0) return;
  detail::launch_pdl(embed_kernel, unsigned(n), 256, 0, cs(stream), static_cast<const __nv_bfloat16*>(table), ids, H,
                     x);
}

void rms_norm(const float* x, int64_t rows, int64_t n, const void* w, const void* ws, const uint8_t* is_summary,
              float eps, void* out, CudaStream stream) {
  if (rows == 0) return;
  detail::launch_pdl(rms_norm_kernel, unsigned(rows), kNormThreads, 0, cs(stream), x, n, w, ws, is_summary, eps,
                     static_cast<__nv_bfloat16*>(out));
}

void add(float* x, const float* h, int64_t count, CudaStream stream) {
  if (count == 0) return;
  if (count % 4 == 0 && aligned(x) && aligned(h))
    detail::launch_pdl(add_kernel<4>, blocks_for(count / 4, 256), 256, 0, cs(stream), x, h, count);
  else detail::launch_pdl(add_kernel<1>, blocks_for(count, 256), 256, 0, cs(stream), x, h, count);
}

void gather_rows(const void* in, int64_t row_bytes, const int32_t* rows, int64_t m, void* out, CudaStream stream) {
  if (m == 0) return;
  if (row_bytes % 4) fail("cuda gather_rows: row bytes must be a multiple of 4 (got ", row_bytes, ")");
  detail::launch_pdl(gather_kernel, unsigned(m), 256, 0, cs(stream), static_cast<const uint32_t*>(in), row_bytes / 4,
                     rows, static_cast<uint32_t*>(out), false);
}

void scatter_rows(const void* in, int64_t row_bytes, const int32_t* rows, int64_t m, void* out, CudaStream stream) {
  if (m == 0) return;
  if (row_bytes % 4) fail("cuda scatter_rows: row bytes must be a multiple of 4 (got ", row_bytes, ")");
  detail::launch_pdl(gather_kernel, unsigned(m), 256, 0, cs(stream), static_cast<const uint32_t*>(in), row_bytes / 4,
                     rows, static_cast<uint32_t*>(out), true);
}

// f(T{}) with T the activation type of dt (fp32 or bf16); any other dtype fails, naming `what`.
template <class F>
void with_act_type(DType dt, const char* what, F&& f) {
  if (dt == DType::f32) f(float{});
  else if (dt == DType::bf16) f(__nv_bfloat16{});
  else fail(what, " must be f32 or bf16 (got ", dtype_name(dt), ")");
}

void blend_rows(void* y, DType dt, int64_t ldy, const void* ys, const int32_t* rows, int64_t m, int64_t cols,
                double mix, CudaStream stream) {
  if (m == 0) return;
  with_act_type(dt, "cuda blend_rows: the rows", [&](auto t) {
    using T = decltype(t);
    detail::launch_pdl(blend_kernel<T>, unsigned(m), 256, 0, cs(stream), static_cast<T*>(y), ldy,
                       static_cast<const T*>(ys), rows, cols, float(mix), mix == 1.0);
  });
}

void rope_table(const int32_t* positions, int64_t n, int64_t D, const float* inv_freq, float* table,
                CudaStream stream) {
  if (n == 0) return;
  const int64_t half = D / 2;
  detail::launch_pdl(rope_table_kernel, blocks_for(n * half, 256), 256, 0, cs(stream), positions, n, int(half),
                     inv_freq, reinterpret_cast<float2*>(table));
}

void qk_norm_rope(const void* qkv, DType dt, int64_t n, int64_t Hq, int64_t Hkv, int64_t D, const void* qn,
                  const void* kn, float eps, const float* rope, void* qc, void* kc, void* vc, CudaStream stream) {
  if (n == 0) return;
  const int64_t warps = n * (Hq + 2 * Hkv);
  const unsigned grid = blocks_for(warps * 32, 256);
  auto* Q = static_cast<__nv_bfloat16*>(qc);
  auto* K = static_cast<__nv_bfloat16*>(kc);
  auto* Vv = static_cast<__nv_bfloat16*>(vc);
  if (D != 128 && D != 64) fail("cuda qk_norm_rope: head_dim must be 64 or 128 (got ", D, ")");
  with_act_type(dt, "cuda qk_norm_rope: qkv", [&](auto t) {
    using T = decltype(t);
    detail::launch_pdl(D == 128 ? qk_norm_rope_kernel<128, T> : qk_norm_rope_kernel<64, T>, grid, 256, 0,
                       cs(stream), static_cast<const T*>(qkv), n, int(Hq), int(Hkv), qn, kn, eps,
                       reinterpret_cast<const float2*>(rope), Q, K, Vv);
  });
}

// The vector kernel (16 bytes of gate and of up per thread) where I and the addresses allow.
void silu_mul(const void* gu, DType dt, int64_t n, int64_t I, void* out, CudaStream stream) {
  if (n * I == 0) return;
  auto* o = static_cast<__nv_bfloat16*>(out);
  with_act_type(dt, "cuda silu_mul: gate|up", [&](auto t) {
    using T = decltype(t);
    constexpr int V = 16 / sizeof(T);
    const T* g = static_cast<const T*>(gu);
    if (I % V == 0 && aligned(g) && aligned(o, 2 * V))
      detail::launch_pdl(silu_mul_kernel<T, V>, blocks_for(n * I / V, 256), 256, 0, cs(stream), g, n, I, o);
    else detail::launch_pdl(silu_mul_kernel<T, 1>, blocks_for(n * I, 256), 256, 0, cs(stream), g, n, I, o);
  });
}

void sample_tokens(float* logits, int64_t V, const SampleArgs* args, int64_t n, const int32_t* pairs, int32_t* out,
                   CudaStream stream) {
  if (n == 0) return;
  if (V < 1 || V >= (int64_t(1) << 31)) fail("cuda sample_tokens: vocabulary of ", V, " logits");
  detail::launch_pdl(sample_kernel, unsigned(n), kSampleThreads, 0, cs(stream), logits, int(V), args, pairs, out);
}

}  // namespace ksa::cuda
