// CUDA error checking for the launchers: every runtime call and every launch is checked, and a failure
// becomes a ksa::Error naming the call, the file and line and CUDA's message.
#pragma once
#include <cuda_runtime.h>

#include "ksa/error.hpp"

#define KSA_CUDA_CHECK(expr)                                                                                     \
  do {                                                                                                           \
    const cudaError_t ksa_err_ = (expr);                                                                         \
    if (ksa_err_ != cudaSuccess)                                                                                 \
      ::ksa::fail("CUDA error in ", #expr, " at ", __FILE__, ":", __LINE__, ": ", cudaGetErrorString(ksa_err_)); \
  } while (0)

#define KSA_CUDA_CHECK_LAUNCH() KSA_CUDA_CHECK(cudaGetLastError())
