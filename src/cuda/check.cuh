// CUDA error checking for the launchers: every runtime call and every launch is checked, and a failure
// becomes a ksa::Error naming the call, the file and line and CUDA's message. The failure is also taken off
// the runtime's last-error slot, so that a caller that catches the error (the server, after a step ran out of
// memory) does not find it again at its next launch check. Running out of device memory says so first.
#pragma once
#include <cuda_runtime.h>

#include "ksa/error.hpp"

namespace ksa::cuda::detail {
// A failed runtime call as a ksa::Error; `where` names it ("in <call> at <file>:<line>", or the engine's
// "while <what>"). The failure is consumed: not sticky unless the context is broken, which the next call then
// reports.
template <class... Where>
[[noreturn]] void cuda_failed(cudaError_t e, const Where&... where) {
  cudaGetLastError();
  if (e == cudaErrorMemoryAllocation)
    fail("out of GPU memory ", where..., " (", cudaGetErrorString(e), "); a smaller --ctx, batch or prompt needs less");
  fail("CUDA error ", where..., ": ", cudaGetErrorString(e));
}
}  // namespace ksa::cuda::detail

#define KSA_CUDA_CHECK(expr)                                                                        \
  do {                                                                                              \
    const cudaError_t ksa_err_ = (expr);                                                            \
    if (ksa_err_ != cudaSuccess)                                                                    \
      ::ksa::cuda::detail::cuda_failed(ksa_err_, "in ", #expr, " at ", __FILE__, ":", __LINE__);  \
  } while (0)

#define KSA_CUDA_CHECK_LAUNCH() KSA_CUDA_CHECK(cudaGetLastError())
