// Stream-ordered device workspace for the launchers (the backward's plan and row values, the tables of a
// packed launch): one cudaMallocAsync per call, carved into aligned arrays, freed with cudaFreeAsync.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.cuh"

namespace ksa::cuda::detail {

// Carves one allocation into 256-byte aligned arrays; a first pass with a null base measures it.
struct Carver {
  char* base = nullptr;
  size_t off = 0;
  template <class X>
  X* take(int64_t n) {
    off = (off + 255) / 256 * 256;
    X* p = base ? reinterpret_cast<X*>(base + off) : nullptr;
    off += size_t(n > 0 ? n : 1) * sizeof(X);
    return p;
  }
};

// Stream-ordered workspace; freed on the stream also when a launch throws.
struct Workspace {
  void* p = nullptr;
  cudaStream_t s = nullptr;
  Workspace(size_t bytes, cudaStream_t st) : s(st) { KSA_CUDA_CHECK(cudaMallocAsync(&p, bytes, s)); }
  ~Workspace() {
    if (p) cudaFreeAsync(p, s);  // error path only: the error being thrown is the one to report
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void release() {
    void* q = p;
    p = nullptr;
    KSA_CUDA_CHECK(cudaFreeAsync(q, s));
  }
};

// Host arrays bound for the device in one copy: add() appends an array (256-byte aligned) and returns its
// byte offset in the image; upload() copies the whole image to a device buffer of at least size() bytes, where
// each array then starts at base + its offset (at()). The copy is from pageable memory: cudaMemcpyAsync stages
// it before returning, so the image may go away right after.
struct HostImage {
  std::vector<char> bytes;
  template <class X>
  size_t add(const std::vector<X>& v) {
    const size_t begin = (bytes.size() + 255) / 256 * 256;
    bytes.resize(begin + std::max<size_t>(v.size(), 1) * sizeof(X));
    if (!v.empty()) std::memcpy(bytes.data() + begin, v.data(), v.size() * sizeof(X));
    return begin;
  }
  size_t size() const { return bytes.size(); }
  void upload(void* dst, cudaStream_t s) const {
    if (!bytes.empty()) KSA_CUDA_CHECK(cudaMemcpyAsync(dst, bytes.data(), bytes.size(), cudaMemcpyHostToDevice, s));
  }
  template <class X>
  static const X* at(const void* base, size_t offset) {
    return reinterpret_cast<const X*>(static_cast<const char*>(base) + offset);
  }
};

}  // namespace ksa::cuda::detail
