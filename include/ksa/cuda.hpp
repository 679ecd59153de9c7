// CUDA attention kernels (sm80+, with an sm_90a fast path). Only built when nvcc is found; this header has
// no CUDA includes so that host code can use it.
#pragma once
#include <string>

#include "ksa/attention.hpp"

namespace ksa::cuda {

using CudaStream = void*;  // a cudaStream_t

// Number of visible CUDA devices (0 when the driver or a device is missing; never throws).
int device_count();
// Name and compute capability of the current device, e.g. "NVIDIA H200 (sm_90)".
std::string device_description();
// Device memory bandwidth in bytes per second: a device-to-device copy of `bytes` (bytes read + written per
// second), best of several copies after a warm-up. Throws ksa::Error on a CUDA error.
double copy_bandwidth(int64_t bytes);

// Kernel choices, for tuning, benchmarks and tests: the defaults are what runs. The library reads no
// environment variable; front ends (`ksa bench attn`, the PyTorch binding) map KSA_CUDA_FWD_CONFIG,
// KSA_CUDA_BWD_SPLIT, KSA_CUDA_BWD_SM90A and KSA_CUDA_BWD_FUSED_DQ onto these fields with
// kernel_options_from_env() (ksa/cuda_env.hpp).
struct KernelOptions {
  // The forward kernel: -1 automatic (pick_forward); 0..4 a tile configuration of the portable (sm80+)
  // kernel; 5 the sm_90a wgmma kernel (compute capability 9.0 and a build with architecture 90 only), its K/V
  // tiles copied by the tensor memory accelerator where the call allows it (one stream layout, k and S
  // dividing 128), else by cp.async; 6 the same kernel with every tile copied by cp.async (for comparisons).
  int forward_config = -1;
  // The backward's dK/dV work items: each key tile's list of query tiles cut into items of this many entries
  // (> 0), or 0: automatic (enough items for the device's SMs).
  int backward_split = 0;
  // The backward's sm_90a wgmma passes where they run (false: the portable passes everywhere).
  bool backward_sm90a = true;
  // dQ inside the sm_90a dK/dV pass (fp32 reduce-adds) where that pass runs with D = 128 and p.deterministic
  // is false; false: the separate dQ pass (the same bits every run).
  bool backward_fused_dq = true;
};

// The forward kernel attention_forward runs for D (64 or 128) with these options: 5 (the sm_90a kernel) on a
// compute capability 9.0 device of an sm_90a build, else 1 at D = 128 and 3 at D = 64 (the H200 sweep of
// 2026-11-29), or o.forward_config when set. Throws ksa::Error for a configuration outside 0..6 or 5/6 where the
// sm_90a kernel cannot run (supports() reports the same as `why`).
int pick_forward(int64_t D, const KernelOptions& o = {});

// Whether attention_forward can run these params (dtype bf16/f16, D 64/128, ...) with these options; when
// false, `why` (if given) names the unsupported field and value. Packed sequences (cu_seqlens) run on every
// path, in one launch per kernel for all streams; the CUDA launchers copy a small per-call table to the device
// (from host memory: not inside a CUDA graph capture).
bool supports(const AttentionParams& p, std::string* why = nullptr, const KernelOptions& o = {});
// Device pointers in p; asynchronous on `stream`. Throws ksa::Error on bad params or a CUDA error.
void attention_forward(const AttentionParams& p, CudaStream stream = nullptr, const KernelOptions& o = {});

bool supports(const AttentionBackwardParams& p, std::string* why = nullptr, const KernelOptions& o = {});
// Device pointers in p; asynchronous on `stream`; workspace from cudaMallocAsync on the stream. With
// p.deterministic false on compute capability 9.0 and D = 128, dQ is computed in the dK/dV pass and added in
// fp32 (its last bits vary from run to run; workspace B * Hq * L * D * 4 bytes more, e.g. 2.4 GB at B=1,
// Hq=32, L=147K); p.deterministic or o.backward_fused_dq = false runs the separate dQ pass (same bits every
// run). Packed sequences: the row workspaces (lse, Delta, the fused dQ's) hold each stream's rows rounded up
// to 128.
void attention_backward(const AttentionBackwardParams& p, CudaStream stream = nullptr, const KernelOptions& o = {});

}  // namespace ksa::cuda
