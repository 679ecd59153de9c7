// CUDA attention kernels (sm80+, with an sm_90a fast path). Only built when nvcc is found; this header has
// no CUDA includes so that host code can use it.
#pragma once
#include <string>

#include "ksa/attention.hpp"

namespace ksa::cuda {

using Stream = void*;  // a cudaStream_t

// Number of visible CUDA devices (0 when the driver or a device is missing; never throws).
int device_count();
// Name and compute capability of the current device, e.g. "NVIDIA H200 (sm_90)".
std::string device_description();

// Whether attention_forward can run these params (dtype bf16/f16, D 64/128, ...); when false, `why`
// (if given) names the unsupported field and value.
bool supports(const AttentionParams& p, std::string* why = nullptr);
// Device pointers in p; asynchronous on `stream`. Throws ksa::Error on bad params or a CUDA error.
void attention_forward(const AttentionParams& p, Stream stream = nullptr);

bool supports(const AttentionBackwardParams& p, std::string* why = nullptr);
void attention_backward(const AttentionBackwardParams& p, Stream stream = nullptr);

}  // namespace ksa::cuda
