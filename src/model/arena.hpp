// A step's activations, for both backends: a bump allocator over chunks kept from step to step. A step that
// outgrew the first chunk gets one chunk of its total at the next reset, so allocations settle after the
// first steps (and, on the GPU, a step of the same shape gets the same addresses, which its CUDA graph needs).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace ksa::engine {

// A host block from std::aligned_alloc (a host Mem's Ptr).
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using HostPtr = std::unique_ptr<void, FreeDeleter>;

// Mem supplies the chunks: `using Ptr` (owns a chunk, .get()), `static Ptr alloc(size_t bytes)` (throws when
// out of memory), `kAlign` (every take is rounded up to it), `kMinChunk` (the least a new chunk holds) and
// `static void fresh(void* p, size_t bytes)` (what a take does to its bytes: the CPU zero-fills them).
template <class Mem>
class BumpArena {
 public:
  // Starts a step. before_merge() runs first when the chunks are about to be merged (the GPU: wait until
  // the stream no longer uses them).
  template <class BeforeMerge>
  void reset(BeforeMerge&& before_merge) {
    if (chunks_.size() > 1) {
      before_merge();
      const size_t total = high_;
      chunks_.clear();
      add_chunk(total);
    }
    cur_ = 0;
    off_ = 0;
    used_ = 0;
  }
  void reset() {
    reset([] {});
  }
  void* take(size_t bytes) {
    bytes = round(bytes);
    if (chunks_.empty() || off_ + bytes > chunks_[cur_].size) {
      if (cur_ + 1 < chunks_.size() && bytes <= chunks_[cur_ + 1].size) ++cur_;
      else add_chunk(std::max(bytes, Mem::kMinChunk));
      off_ = 0;
    }
    void* p = static_cast<std::byte*>(chunks_[cur_].p.get()) + off_;
    off_ += bytes;
    used_ += bytes;
    high_ = std::max(high_, used_);
    Mem::fresh(p, bytes);
    return p;
  }
  // Bytes held in chunks.
  size_t reserved() const {
    size_t n = 0;
    for (const Chunk& c : chunks_) n += c.size;
    return n;
  }
  // Changes whenever the chunks change: the addresses of a step's takes stay the same while it does not.
  uint64_t generation() const { return generation_; }

 private:
  struct Chunk {
    typename Mem::Ptr p;
    size_t size = 0;
  };
  static size_t round(size_t bytes) { return (bytes + Mem::kAlign - 1) / Mem::kAlign * Mem::kAlign; }
  void add_chunk(size_t bytes) {
    bytes = round(bytes);
    chunks_.push_back(Chunk{Mem::alloc(bytes), bytes});
    cur_ = chunks_.size() - 1;
    ++generation_;
  }
  std::vector<Chunk> chunks_;
  size_t cur_ = 0, off_ = 0, used_ = 0, high_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace ksa::engine
