// Device discovery for callers that must decide between the CUDA and CPU paths.
#include <cstdio>
#include <string>

#include "check.cuh"
#include "ksa/cuda.hpp"

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

}  // namespace ksa::cuda
