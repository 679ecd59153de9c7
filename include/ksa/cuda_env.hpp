// For front ends only (the `ksa` command, the PyTorch binding): the environment variables that tune the CUDA
// kernels, mapped onto ksa::cuda::KernelOptions. The library never calls this; it takes the options it is
// given. Header-only and without CUDA includes.
//   KSA_CUDA_FWD_CONFIG=0..6    KernelOptions::forward_config (unset: automatic)
//   KSA_CUDA_BWD_SPLIT=N        KernelOptions::backward_split (unset or <= 0: automatic)
//   KSA_CUDA_BWD_SM90A=0        KernelOptions::backward_sm90a = false (the portable backward passes)
//   KSA_CUDA_BWD_FUSED_DQ=0     KernelOptions::backward_fused_dq = false (the separate dQ pass)
#pragma once
#include <algorithm>
#include <cstdlib>
#include <string>

#include "ksa/cuda.hpp"

namespace ksa::cuda {

inline KernelOptions kernel_options_from_env() {
  KernelOptions o;
  auto get = [](const char* name) -> const char* {
    const char* v = std::getenv(name);
    return v && *v ? v : nullptr;
  };
  if (const char* v = get("KSA_CUDA_FWD_CONFIG")) o.forward_config = std::atoi(v);
  if (const char* v = get("KSA_CUDA_BWD_SPLIT")) o.backward_split = std::max(0, std::atoi(v));
  if (const char* v = get("KSA_CUDA_BWD_SM90A")) o.backward_sm90a = std::string(v) != "0";
  if (const char* v = get("KSA_CUDA_BWD_FUSED_DQ")) o.backward_fused_dq = std::string(v) != "0";
  return o;
}

}  // namespace ksa::cuda
