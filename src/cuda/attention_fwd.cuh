// The CUDA forward's kernel arguments, shared by the portable mma.sync kernel (attention_fwd.cu) and the
// Hopper wgmma kernel (attention_fwd_sm90a.cu). Filled once by attention_forward; kernels take it by value.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "ksa/spec.hpp"

namespace ksa::cuda::detail {

struct FwdArgs {
  Layout lay;
  Layout32 l32;  // the same geometry in 32-bit arithmetic for per-row index math
  int64_t W;
  int W32;  // W clamped to int range (any W >= #chunks behaves the same)
  int Hq, G, L, num_qtiles;
  float scale_log2;  // softmax scale * log2(e)
  const void *q, *k, *v;
  void* out;
  float* lse;
  int64_t qb, qr, qh, kb, kr, kh, vb, vr, vh, ob, orow, oh;
};

// Whether this build has the sm_90a forward (KSA_HAVE_SM90A) and the current device runs it (compute
// capability 9.0).
bool fwd_sm90a_usable();
// Launches the wgmma forward for D = 64 or 128 (f16 selects half, else bf16). Requires fwd_sm90a_usable().
void launch_fwd_sm90a(const FwdArgs& a, int B, int D, bool f16, cudaStream_t stream);

}  // namespace ksa::cuda::detail
