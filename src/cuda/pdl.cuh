// Programmatic dependent launch (PDL) for the kernels of an engine step (sm_90+; a plain launch before).
//
// A kernel launched with launch_pdl() may start while the kernel before it on the stream still runs, as soon
// as every CTA of that predecessor has called dev::launch_dependents(). The contract every such kernel keeps:
//  - before dev::grid_dependency_wait() it reads only what no kernel of the step writes (weights, the step's
//    uploaded plan) and writes nothing;
//  - every CTA calls dev::grid_dependency_wait() before it exits (so a kernel's completion implies that of
//    every kernel before it on the stream, and the next kernel's wait covers them all).
// The gain is the launch and prologue of each kernel under its predecessor's tail: a decode step is ~400
// kernels, most of them a few microseconds long, and a matrix product's first weight loads (constant for
// the step) go out before the wait, while the norm or merge before it still runs.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "cuda/check.cuh"
#include "cuda/launch_checks.hpp"

namespace ksa::cuda::dev {

// In a kernel launched programmatically: blocks until the predecessor grid has finished and its writes are
// visible (a no-op before sm_90, or when the kernel was launched plainly).
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next kernel on the stream start (once every CTA of this grid has called it, or exited).
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace ksa::cuda::dev

namespace ksa::cuda::detail {

// Whether the current device takes programmatic dependent launches (sm_90+).
inline bool pdl_supported() { return compute_capability() >= 90; }

// kernel<<<grid, block, smem, s>>>(args...), with the programmatic-serialization attribute when `pdl` and the
// device takes it. Launch errors become ksa::Error.
template <class... KArgs, class... Args>
void launch_kernel(bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                   Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl && pdl_supported() ? 1 : 0;
  KSA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

template <class... KArgs, class... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args&&... args) {
  launch_kernel(true, kernel, grid, block, smem, s, std::forward<Args>(args)...);
}

}  // namespace ksa::cuda::detail
