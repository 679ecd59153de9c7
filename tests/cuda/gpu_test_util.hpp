// Scaffolding shared by the GPU tests (tests/cuda): the skip when no device is visible, a checked CUDA call,
// an owning device buffer (freed on every exit path, including a failed ASSERT), and the refusals that need no
// device.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "ksa/cuda.hpp"
#include "ksa/cuda_cache.hpp"

namespace ksa::test {

#define REQUIRE_GPU()                                                               \
  do {                                                                              \
    if (::ksa::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

// cudaMalloc'ed bytes (at least 16, so that an empty buffer is still a valid address); null on failure.
struct DevMem {
  void* p = nullptr;
  explicit DevMem(size_t bytes) {
    if (cudaMalloc(&p, std::max<size_t>(bytes, 16)) != cudaSuccess) p = nullptr;
  }
  ~DevMem() { cudaFree(p); }
  DevMem(const DevMem&) = delete;
  DevMem& operator=(const DevMem&) = delete;
  template <class X>
  X* as() const {
    return static_cast<X*>(p);
  }
};

// A device copy of a host vector (null for an empty one); throws on a CUDA error.
template <class X>
X* upload(const std::vector<X>& h) {
  if (h.empty()) return nullptr;
  X* d = nullptr;
  if (cudaMalloc(&d, h.size() * sizeof(X)) != cudaSuccess) throw std::runtime_error("cudaMalloc");
  if (cudaMemcpy(d, h.data(), h.size() * sizeof(X), cudaMemcpyHostToDevice) != cudaSuccess)
    throw std::runtime_error("cudaMemcpy");
  return d;
}

// cuda::supports refuses p (attention params or a cache config) with D = 96, then with f32, naming the field;
// p is left at D = 128, f32.
template <class P>
void expect_head_dim_and_dtype_refused(P& p) {
  p.D = 96;
  p.dtype = DType::bf16;
  std::string why;
  EXPECT_FALSE(cuda::supports(p, &why));
  EXPECT_NE(why.find("D: must be 64 or 128 (got 96)"), std::string::npos) << why;
  p.D = 128;
  p.dtype = DType::f32;
  EXPECT_FALSE(cuda::supports(p, &why));
  EXPECT_NE(why.find("dtype"), std::string::npos) << why;
}

}  // namespace ksa::test
