// The machine's read bandwidth as the engine's threads see it: the STREAM-like probe behind `ksa bench
// model`'s bound and bench/cpu/linear_bench.cpp's ceiling.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#include "cpu/thread_pool.hpp"

namespace ksa::cpu::detail {

// Read bandwidth in bytes/s over buf[0, n): the words first written by the threads that later read them (so
// the pages sit on their NUMA nodes), then summed with four independent accumulators per thread, one
// contiguous slice per thread of the engine's pool; best of `passes` reads of the first n / 4 * 4 words.
inline double read_bandwidth(uint64_t* buf, int64_t n, int threads, int passes) {
  const int64_t slice = (n / 4 + threads - 1) / threads * 4;
  parallel_chunks(threads, n, slice, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) buf[i] = uint64_t(i) * 0x9e3779b97f4a7c15ull;
  });
  const int64_t m = n / 4 * 4;
  double best = 0;
  volatile uint64_t sink = 0;
  for (int r = 0; r < passes; ++r) {
    std::atomic<uint64_t> total{0};
    const auto t0 = std::chrono::steady_clock::now();
    parallel_chunks(threads, m, slice, [&](int64_t b, int64_t e, int) {
      uint64_t s = 0;
      for (int64_t i = b; i < e; i += 4) s += (buf[i] + buf[i + 1]) + (buf[i + 2] + buf[i + 3]);
      total += s;
    });
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + total.load();
    best = std::max(best, double(m * 8) / t);
  }
  (void)sink;
  return best;
}

}  // namespace ksa::cpu::detail
