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

// Whether attention_forward can run these params (dtype bf16/f16, D 64/128, ...); when false, `why`
// (if given) names the unsupported field and value. Packed sequences (cu_seqlens) run on every path, in one
// launch per kernel for all streams; the CUDA launchers copy a small per-call table to the device (from host
// memory: not inside a CUDA graph capture).
bool supports(const AttentionParams& p, std::string* why = nullptr);
// Device pointers in p; asynchronous on `stream`. Throws ksa::Error on bad params or a CUDA error.
void attention_forward(const AttentionParams& p, CudaStream stream = nullptr);

bool supports(const AttentionBackwardParams& p, std::string* why = nullptr);
// Device pointers in p; asynchronous on `stream`; workspace from cudaMallocAsync on the stream. With
// p.deterministic false on compute capability 9.0 and D = 128, dQ is computed in the dK/dV pass and added in
// fp32 (its last bits vary from run to run; workspace B * Hq * L * D * 4 bytes more, e.g. 2.4 GB at B=1,
// Hq=32, L=147K); p.deterministic or KSA_CUDA_BWD_FUSED_DQ=0 runs the separate dQ pass (same bits every run).
// Packed sequences: the row workspaces (lse, Delta, the fused dQ's) hold each stream's rows rounded up to 128.
void attention_backward(const AttentionBackwardParams& p, CudaStream stream = nullptr);

}  // namespace ksa::cuda
