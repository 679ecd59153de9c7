// BumpArena (src/model/arena.hpp), the step activations of both backends: alignment, chunks kept from step
// to step, the merge into one chunk after a step outgrew the first, stable addresses and generation.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "model/arena.hpp"

namespace ksa::engine {
namespace {

// Host chunks like the CPU backend's, counting allocations and marking taken bytes.
struct CountingMem {
  using Ptr = HostPtr;
  static constexpr size_t kAlign = 256, kMinChunk = 4096;
  static inline int allocs = 0;
  static inline std::vector<size_t> sizes;
  static Ptr alloc(size_t bytes) {
    ++allocs;
    sizes.push_back(bytes);
    return Ptr(std::aligned_alloc(kAlign, bytes));
  }
  static void fresh(void* p, size_t bytes) { std::memset(p, 0xAB, bytes); }
};

using Arena = BumpArena<CountingMem>;

TEST(BumpArena, TakesAreAlignedFreshAndDisjoint) {
  CountingMem::allocs = 0;
  Arena a;
  a.reset();
  auto* p = static_cast<unsigned char*>(a.take(10));
  auto* q = static_cast<unsigned char*>(a.take(300));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(q) % 256, 0u);
  EXPECT_EQ(q - p, 256);  // 10 bytes rounded up to the alignment
  for (int i = 0; i < 300; ++i) EXPECT_EQ(q[i], 0xAB);
  EXPECT_EQ(CountingMem::allocs, 1);  // both fit the first (minimum-size) chunk
  EXPECT_EQ(CountingMem::sizes.back(), 4096u);
}

TEST(BumpArena, AStepThatOutgrewTheChunkGetsOneChunkOfItsTotal) {
  CountingMem::allocs = 0;
  CountingMem::sizes.clear();
  Arena a;
  a.reset();
  a.take(3000);
  a.take(3000);  // does not fit the 4096-byte chunk: a second one
  a.take(8192);  // a third, of its own size
  EXPECT_EQ(CountingMem::allocs, 3);
  const uint64_t g = a.generation();
  a.reset();  // merged: one chunk of the step's total
  EXPECT_EQ(CountingMem::allocs, 4);
  EXPECT_EQ(CountingMem::sizes.back(), size_t(3072 + 3072 + 8192));
  EXPECT_NE(a.generation(), g);
  // The same step again: no allocation, the same addresses, the same generation, from step to step.
  const uint64_t g2 = a.generation();
  std::vector<void*> first;
  for (int step = 0; step < 3; ++step) {
    a.reset();
    std::vector<void*> ps{a.take(3000), a.take(3000), a.take(8192)};
    if (step == 0) first = ps;
    EXPECT_EQ(ps, first);
  }
  EXPECT_EQ(CountingMem::allocs, 4);
  EXPECT_EQ(a.generation(), g2);
}

TEST(BumpArena, BeforeMergeRunsOnlyWhenChunksAreMerged) {
  Arena a;
  int calls = 0;
  a.reset([&] { ++calls; });
  a.take(100);
  a.reset([&] { ++calls; });
  EXPECT_EQ(calls, 0);  // one chunk: nothing to merge
  a.take(4000);
  a.take(4000);
  a.reset([&] { ++calls; });
  EXPECT_EQ(calls, 1);
}

}  // namespace
}  // namespace ksa::engine
