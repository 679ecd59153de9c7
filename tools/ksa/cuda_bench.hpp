// CUDA helpers of the GPU benchmarks (`ksa bench attn --device cuda`, `ksa bench-decode`): a checked
// runtime call, an owning device buffer, and event timing. Include only where KSA_HAVE_CUDA is defined.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ksa/error.hpp"

namespace ksa::tools {

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA error in ", what, ": ", cudaGetErrorString(e));
}

// cudaMalloc'ed bytes (at least 16), freed on destruction.
struct DeviceBuf {
  void* p = nullptr;
  explicit DeviceBuf(size_t bytes) { cuda_check(cudaMalloc(&p, std::max<size_t>(bytes, 16)), "cudaMalloc"); }
  ~DeviceBuf() { cudaFree(p); }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
};

// Median milliseconds of f() (work queued on stream s) over `reps` runs timed with CUDA events on s, after
// one warm-up run. With `flush`, each run is preceded by a memset of that buffer (make it larger than L2):
// f() then starts with a cold L2, and the host queues f() while the memset runs, so the time is the GPU's
// alone (no host launch latency in it) -- the convention of triton.testing.do_bench. Without it, the GPU
// is idle when f() is called, so the time includes the host's launch of f().
template <class F>
double median_event_ms(cudaStream_t s, int64_t reps, F&& f, const DeviceBuf* flush = nullptr, size_t flush_bytes = 0) {
  cudaEvent_t a, b;
  cuda_check(cudaEventCreate(&a), "cudaEventCreate");
  cuda_check(cudaEventCreate(&b), "cudaEventCreate");
  f();  // warm-up
  cuda_check(cudaStreamSynchronize(s), "warm-up");
  std::vector<double> t;
  for (int64_t r = 0; r < std::max<int64_t>(reps, 1); ++r) {
    if (flush) cuda_check(cudaMemsetAsync(flush->p, r & 0xff, flush_bytes, s), "cudaMemsetAsync");
    cuda_check(cudaEventRecord(a, s), "cudaEventRecord");
    f();
    cuda_check(cudaEventRecord(b, s), "cudaEventRecord");
    cuda_check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace ksa::tools
