// The CUDA forward's kernel arguments, shared by the portable mma.sync kernel (attention_fwd.cu) and the
// Hopper wgmma kernel (attention_fwd_sm90a.cu). Filled once by attention_forward; kernels take it by value.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "check.cuh"
#include "cuda/mma.cuh"
#include "ksa/spec.hpp"

namespace ksa::cuda::detail {

struct FwdArgs {
  Layout lay;
  Layout32 l32;  // the same geometry in 32-bit arithmetic for per-row index math
  int64_t W;
  int W32;  // W clamped to int range (any W >= #chunks behaves the same)
  int Hq, G, L, num_qtiles;
  // The query rows, gathered order: [qa0, qa1) then [qb0, qb1) (a whole stream: [0, L) and nothing).
  int qa0, qa1, qb0, qb1;
  float scale_log2;  // softmax scale * log2(e)
  const void *q, *k, *v;
  void* out;
  float* lse;
  int64_t qb, qr, qh, kb, kr, kh, vb, vr, vh, ob, orow, oh;
};

// Query tile qt of the launch: rows [g0, g1) of the gathered order (ranges a, then b, in tiles of BQ).
template <int BQ>
__device__ __forceinline__ void query_tile(const FwdArgs& a, int qt, int& g0, int& g1) {
  const int na = (a.qa1 - a.qa0 + BQ - 1) / BQ;
  if (qt < na) {
    g0 = a.qa0 + qt * BQ;
    g1 = min(a.qa1, g0 + BQ);
  } else {
    g0 = a.qb0 + (qt - na) * BQ;
    g1 = min(a.qb1, g0 + BQ);
  }
}

inline int query_tiles(const FwdArgs& a, int BQ) {
  return (a.qa1 - a.qa0 + BQ - 1) / BQ + (a.qb1 - a.qb0 + BQ - 1) / BQ;
}

// The epilogue of one query row g, shared by both kernels: its accumulators o (fragment layout: o[4j + 2hf + e]
// holds column 8j + 2tig + e of row half hf) divided by the row's softmax sum l, written to out in stream
// order, and lse (natural log) from m (running max in log2 units).
template <class T, int D>
__device__ __forceinline__ void store_row(const FwdArgs& a, int b, int h, int g, int tig, int hf, const float* o,
                                          float m, float l) {
  const float inv = 1.f / l;
  const int64_t srow = a.l32.stream_of_gathered(uint32_t(g));
  dev::store_acc_row<T, D>(static_cast<T*>(a.out) + b * a.ob + srow * a.orow + h * a.oh, o, hf, tig, inv);
  if (a.lse && tig == 0) a.lse[(int64_t(b) * a.L + srow) * a.Hq + h] = (m + log2f(l)) * 0.69314718055994531f;
}

// Launches kern<<<(query tiles of K::BQ rows, Hq, B), K::THREADS, K::SMEM>>>(a) (both kernels' grid).
template <class K, class Kernel>
void launch_fwd(Kernel kern, const FwdArgs& a, int B, cudaStream_t stream) {
  KSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, K::SMEM));
  FwdArgs args = a;
  args.num_qtiles = query_tiles(a, K::BQ);
  if (args.num_qtiles == 0) return;
  const dim3 grid(unsigned(args.num_qtiles), unsigned(a.Hq), unsigned(B));
  kern<<<grid, K::THREADS, K::SMEM, stream>>>(args);
  KSA_CUDA_CHECK_LAUNCH();
}

// Launches the wgmma forward for D = 64 or 128 (f16 selects half, else bf16). Requires sm90a_usable()
// (launch_checks.hpp).
void launch_fwd_sm90a(const FwdArgs& a, int B, int D, bool f16, cudaStream_t stream);

}  // namespace ksa::cuda::detail
