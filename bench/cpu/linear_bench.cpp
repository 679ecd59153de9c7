// ksa::cpu::linear at M = 1 on the 4B shape's decode products, from anonymous memory in 4 KiB or 2 MiB pages,
// against a STREAM-like read of the same memory (issue #27: how near the matrix-vector kernels come to the
// machine's read bandwidth, and what the page size does). Not part of the build:
//   g++ -O2 -std=c++20 -Iinclude -Isrc bench/cpu/linear_bench.cpp build-helper/src/cpu/libksa_cpu.a \
//     build-helper/src/core/libksa_core.a -lhwy -lopenblas -lpthread -o /tmp/linear_bench
//   /tmp/linear_bench bf16|q8_0 THREADS HUGE(0|1) [GiB of layer copies, default 2] [passes, default 5]
// Per product kind: the layer's products (q, k, v, o, gate, up, down: K=2560 N=4096/1024/1024, K=4096 N=2560,
// K=2560 N=9728 twice, K=9728 N=2560) over as many distinct copies of the layer as fill the GiB given (so the
// weights stream from memory as in a step), then the head (K=2560, N=151936) alone; best of the passes.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/bandwidth.hpp"
#include "ksa/dense.hpp"
#include "ksa/dtype.hpp"

using namespace ksa;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

static void* alloc(size_t bytes, bool huge) {
  const size_t h = size_t(2) << 20, len = (bytes + h - 1) / h * h;
  void* raw = mmap(nullptr, len + h, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) std::abort();
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + h - 1) / h * h);
  madvise(p, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return p;
}

int main(int argc, char** argv) {
  if (argc < 4) return std::fprintf(stderr, "usage: linear_bench bf16|q8_0 THREADS HUGE [GiB] [passes]\n"), 2;
  const bool q8 = std::string(argv[1]) == "q8_0";
  const int threads = std::atoi(argv[2]);
  const bool huge = std::atoi(argv[3]) != 0;
  const double gib = argc > 4 ? std::atof(argv[4]) : 2.0;
  const int passes = argc > 5 ? std::atoi(argv[5]) : 5;
  const DType dt = q8 ? DType::q8_0 : DType::bf16;
  struct Shape { const char* name; int64_t K, N; };
  const std::vector<Shape> layer = {{"q", 2560, 4096},   {"k", 2560, 1024},   {"v", 2560, 1024},  {"o", 4096, 2560},
                                    {"gate", 2560, 9728}, {"up", 2560, 9728}, {"down", 9728, 2560}};
  auto bytes_of = [&](int64_t K, int64_t N) { return size_t(dtype_bytes(dt, K)) * size_t(N); };
  size_t layer_bytes = 0;
  for (const Shape& s : layer) layer_bytes += bytes_of(s.K, s.N);
  const int copies = std::max(1, int(gib * double(1 << 30) / double(layer_bytes)));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 0.05f);
  // One layer's matrices made once, copied `copies` times.
  std::vector<std::vector<unsigned char>> proto;
  for (const Shape& s : layer) {
    std::vector<unsigned char> m(bytes_of(s.K, s.N));
    std::vector<float> row(size_t(s.K));
    for (int64_t n = 0; n < s.N; ++n) {
      for (auto& v : row) v = nd(rng);
      unsigned char* dst = m.data() + size_t(n) * size_t(dtype_bytes(dt, s.K));
      if (q8) {
        cpu::quantize_q8_0(row.data(), s.K, dst);
      } else {
        for (int64_t k = 0; k < s.K; ++k) {
          const uint16_t b = bf16::from_float(row[size_t(k)]);
          std::memcpy(dst + 2 * k, &b, 2);
        }
      }
    }
    proto.push_back(std::move(m));
  }
  std::vector<std::vector<void*>> W(layer.size());
  for (size_t i = 0; i < layer.size(); ++i)
    for (int c = 0; c < copies; ++c) {
      void* p = alloc(proto[i].size(), huge);
      std::memcpy(p, proto[i].data(), proto[i].size());
      W[i].push_back(p);
    }
  const Shape head{"head", 2560, 151936};
  void* Wh = alloc(bytes_of(head.K, head.N), huge);
  {
    std::vector<float> row(size_t(head.K));
    for (int64_t n = 0; n < head.N; ++n) {
      for (auto& v : row) v = nd(rng);
      unsigned char* dst = static_cast<unsigned char*>(Wh) + size_t(n) * size_t(dtype_bytes(dt, head.K));
      if (q8) cpu::quantize_q8_0(row.data(), head.K, dst);
      else for (int64_t k = 0; k < head.K; ++k) { const uint16_t b = bf16::from_float(row[size_t(k)]); std::memcpy(dst + 2 * k, &b, 2); }
    }
  }
  std::vector<float> x(9728), y(151936);
  for (auto& v : x) v = nd(rng) * 20.f;
  std::printf("%s, %d threads, %s pages, %d copies of a layer (%.2f GB), SIMD %s\n", argv[1], threads,
              huge ? "2 MiB" : "4 KiB", copies, double(layer_bytes) * copies * 1e-9, cpu::simd_target());
  // Per kind: all copies of it in a row (as a step runs that kind once per layer, every layer's own weights).
  double tot_t = 0, tot_b = 0;
  for (size_t i = 0; i < layer.size(); ++i) {
    double best = 1e30;
    for (int p = 0; p < passes; ++p) {
      const double t0 = now();
      for (int c = 0; c < copies; ++c) cpu::linear(x.data(), 1, layer[i].K, W[i][size_t(c)], dt, layer[i].N, y.data(), threads);
      best = std::min(best, now() - t0);
    }
    const double b = double(bytes_of(layer[i].K, layer[i].N)) * copies;
    std::printf("  %-5s K=%-5lld N=%-6lld %6.1f GB/s (%7.1f us each)\n", layer[i].name, (long long)layer[i].K,
                (long long)layer[i].N, b / best * 1e-9, best / copies * 1e6);
    tot_t += best, tot_b += b;
  }
  // The step's order: per layer q k v o gate up down.
  double best = 1e30;
  for (int p = 0; p < passes; ++p) {
    const double t0 = now();
    for (int c = 0; c < copies; ++c)
      for (size_t i = 0; i < layer.size(); ++i)
        cpu::linear(x.data(), 1, layer[i].K, W[i][size_t(c)], dt, layer[i].N, y.data(), threads);
    best = std::min(best, now() - t0);
  }
  std::printf("  layers in step order: %6.1f GB/s (%.2f GB, %.1f ms; kinds one at a time: %.1f GB/s)\n",
              tot_b / best * 1e-9, tot_b * 1e-9, best * 1e3, tot_b / tot_t * 1e-9);
  double hb = 1e30;
  for (int p = 0; p < passes; ++p) {
    const double t0 = now();
    cpu::linear(x.data(), 1, head.K, Wh, dt, head.N, y.data(), threads);
    hb = std::min(hb, now() - t0);
  }
  std::printf("  head  K=2560  N=151936 %6.1f GB/s (%.1f ms)\n", double(bytes_of(head.K, head.N)) / hb * 1e-9, hb * 1e3);
  // STREAM-like read (as `ksa bench model`) over the first copy set's memory, same threads.
  const int64_t n = int64_t(tot_b / 8) / 4 * 4;
  uint64_t* buf = static_cast<uint64_t*>(alloc(size_t(n) * 8, huge));
  const double bw = cpu::detail::read_bandwidth(buf, n, threads, passes);
  std::printf("  STREAM-like read of %.2f GB: %.1f GB/s\n", double(n * 8) * 1e-9, bw * 1e-9);
  return 0;
}
