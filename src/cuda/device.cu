// Device discovery for callers that must decide between the CUDA and CPU paths.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <string>

#include "check.cuh"
#include "ksa/cuda.hpp"
#include "launch_checks.hpp"

namespace ksa::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string device_description() {
  int dev = 0;
  KSA_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  KSA_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  char buf[320];
  std::snprintf(buf, sizeof buf, "%s (sm_%d%d, %d SMs, %.0f GiB)", prop.name, prop.major, prop.minor,
                prop.multiProcessorCount, double(prop.totalGlobalMem) / (1024.0 * 1024 * 1024));
  return buf;
}

double copy_bandwidth(int64_t bytes) {
  void *a = nullptr, *b = nullptr;
  KSA_CUDA_CHECK(cudaMalloc(&a, size_t(bytes)));
  cudaError_t e = cudaMalloc(&b, size_t(bytes));
  if (e != cudaSuccess) {
    cudaFree(a);
    KSA_CUDA_CHECK(e);
  }
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  double best = 0;
  cudaMemset(a, 1, size_t(bytes));
  for (int i = 0; i < 6; ++i) {
    cudaEventRecord(t0);
    cudaMemcpy(b, a, size_t(bytes), cudaMemcpyDeviceToDevice);
    cudaEventRecord(t1);
    cudaEventSynchronize(t1);
    float ms = 0;
    cudaEventElapsedTime(&ms, t0, t1);
    if (i > 0 && ms > 0) best = std::max(best, 2.0 * double(bytes) / (double(ms) * 1e-3));
  }
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  cudaFree(a);
  cudaFree(b);
  KSA_CUDA_CHECK(cudaGetLastError());
  return best;
}

int detail::compute_capability() {
  constexpr int kCached = 64;
  static std::atomic<int> cached[kCached] = {};  // 0: not asked yet
  int dev = 0;
  KSA_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < kCached && cached[dev] != 0) return cached[dev];
  int major = 0, minor = 0;
  KSA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  KSA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  const int cc = 10 * major + minor;
  if (dev >= 0 && dev < kCached) cached[dev] = cc;
  return cc;
}

}  // namespace ksa::cuda
