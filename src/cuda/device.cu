// Device discovery for callers that must decide between the CUDA and CPU paths.
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
