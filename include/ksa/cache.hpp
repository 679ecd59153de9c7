// The compressed KV cache of ONE layer for many sequences (docs/ksa.md: The compressed cache): per sequence the K/V
// (post-RoPE, as given) of the current incomplete chunk, the text of the last W complete chunks and every summary.
// Memory is O((W+1)·k + T/k·S) rows instead of O(T).
//
// Layout: a pool of fixed-size blocks ("pages") of `block_rows` rows; a block holds K [Hkv, rows, D] then
// V [Hkv, rows, D], so one KV head's rows in a block are one contiguous [rows, D] slice. Each sequence owns
//   - a text ring: a table of `text_slots` block ids; text row t (its index in the text) lives in block
//     text_blocks[(t / block_rows) % text_slots], row t % block_rows. The current chunk is written in place
//     into the ring and so "moves into the ring" by renaming, never by a copy. text_slots·block_rows >=
//     (W+1)·k, so row t overwrites row t - text_slots·block_rows only once no later query sees that row
//     (docs/ksa.md: Who sees whom); blocks whose rows are all out of the window go back to the pool;
//   - a summary table (append-only): summary row s = chunk·S + j lives in block summary_blocks[s / block_rows].
//     Growing it takes a block from the pool; nothing already stored is ever copied. A layer whose W·k covers
//     the context limit never shows a summary to a text query (docs/ksa.md: The compressed cache): then only the newest
//     chunk's S summaries are kept (summary queries of that chunk still read them), in row j.
// The plain-data views below (KvPoolView, SeqKvView) are what kernels read; a GPU twin keeps the same shapes
// (same KvCacheConfig, one pool, a per-sequence block table) with device pointers.
//
// Decode steps follow a plan / run / commit protocol (as flashinfer's plan/run): plan_decode validates a
// batch and makes sure blocks exist for every row the step writes; a kernel (ksa::cpu::attention_decode,
// decode.hpp) writes the new tokens' K/V and attends; commit_decode advances the sequences and returns the
// blocks that fell out of the window. A kernel must handle each sequence's new tokens in stream order
// (write a token's K/V, then attend for it, then the next token): a step may cross chunk boundaries and wrap
// the ring, and a ring row is only dead once the earlier tokens of the step are done with it. Errors
// (unknown or released ids, wrong shapes, context limit, a full pool) throw ksa::Error before anything is
// modified, so other sequences are never affected. A KvCache is driven by one thread at a time.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "ksa/config.hpp"
#include "ksa/dtype.hpp"
#include "ksa/spec.hpp"
#include "ksa/stream_geometry.hpp"

namespace ksa {

using SeqId = int64_t;

struct KvCacheConfig {
  Spec spec;                    // k, S and this layer's W (summarize_tail must be off: a decoder never
                                // summarises a chunk before its k-th token)
  int64_t Hkv = 1, D = 0;       // KV heads and head dimension
  DType dtype = DType::f32;     // storage, f32 or bf16 (math is fp32)
  int64_t max_text_tokens = 0;  // context limit: text tokens per sequence
  int64_t block_rows = 16;      // rows per block
  int64_t max_blocks = 0;       // pool capacity in blocks (0 = grow on demand)
  int64_t ring_slack_rows = 0;  // extra text rows in each ring beyond the minimal (W+1)·k: a kernel that
                                // writes all of a step's K/V before attending (the GPU decode) can then take
                                // steps of up to ring_slack_rows + 1 text tokens (see text_ring_rows)

  // Throws ksa::Error naming the bad field and value.
  void validate() const;
  // False when W·k >= max_text_tokens: no text query can ever see a summary (docs/ksa.md: The compressed cache).
  bool stores_summaries() const { return spec.W * spec.chunk_size < max_text_tokens; }
  StreamGeometry geometry() const { return StreamGeometry::of(spec); }
  // Bytes of one cached stream token: K and V for all KV heads.
  int64_t row_bytes() const { return 2 * Hkv * D * dtype_size(dtype); }
};

// Where the pool's slabs live. The default keeps them in host memory filled with all-ones bytes (NaN in f32
// and bf16). A slab is never moved or freed before the cache dies. With memory the host cannot touch
// (host_accessible() false, e.g. device memory), the host-copy operations (prefill, append_text,
// append_summaries) throw; the bookkeeping (plan/commit, tables, views) is unchanged.
struct SlabAllocator {
  virtual ~SlabAllocator() = default;
  virtual void* allocate(int64_t bytes) = 0;  // throws ksa::Error on failure
  virtual void deallocate(void* p, int64_t bytes) noexcept = 0;
  virtual bool host_accessible() const = 0;
};

// Rows of K or V handed to the cache: [n, H, D] in dtype, element strides, the D elements contiguous.
struct KvRows {
  const void* data = nullptr;
  int64_t n = 0, H = 0, D = 0;
  DType dtype = DType::f32;
  int64_t row_stride = 0, head_stride = 0;  // elements

  static KvRows dense(const void* p, int64_t n, int64_t H, int64_t D, DType t) {
    return KvRows{p, n, H, D, t, H * D, D};
  }
};

// The block pool as plain data. Block id b lives in slab b / slab_blocks.
struct KvPoolView {
  void* const* slabs = nullptr;
  int64_t slab_blocks = 1;
  int64_t block_rows = 16, Hkv = 1, D = 0;
  DType dtype = DType::f32;

  KSA_HD int64_t elem_bytes() const { return dtype == DType::f32 ? 4 : 2; }
  KSA_HD int64_t block_elems() const { return 2 * Hkv * block_rows * D; }
  // Element offset inside a block of row r of KV head h; kv = 0 for K, 1 for V.
  KSA_HD int64_t offset(int kv, int64_t h, int64_t r) const { return ((kv * Hkv + h) * block_rows + r) * D; }
  KSA_HD void* block(int32_t id) const {
    return static_cast<char*>(slabs[id / slab_blocks]) + (id % slab_blocks) * block_elems() * elem_bytes();
  }
  KSA_HD void* row(int32_t id, int kv, int64_t h, int64_t r) const {
    return static_cast<char*>(block(id)) + offset(kv, h, r) * elem_bytes();
  }
};

// Where a cached row is: block id and row inside the block.
struct KvRowRef {
  int32_t block = -1;
  int64_t row = 0;
};

// One sequence's tables and position as plain data (see the layout above).
struct SeqKvView {
  const int32_t* text_blocks = nullptr;  // [text_slots], ring
  int64_t text_slots = 1;
  const int32_t* summary_blocks = nullptr;  // append-only table
  bool summaries_stored = true;
  int64_t T = 0;     // text tokens in the stream so far
  int64_t sums = 0;  // summary tokens in the stream so far

  KSA_HD KvRowRef text_row(const KvPoolView& pool, int64_t t) const {
    const int64_t b = t / pool.block_rows;
    return KvRowRef{text_blocks[b % text_slots], t - b * pool.block_rows};
  }
  // Summary row s = chunk·S + j.
  KSA_HD KvRowRef summary_row(const KvPoolView& pool, int64_t S, int64_t s) const {
    const int64_t r = summaries_stored ? s : s % S;
    return KvRowRef{summary_blocks[r / pool.block_rows], r % pool.block_rows};
  }
};

// One sequence of a decode step: its tables and position before the step, and its new stream tokens.
struct DecodeSeq {
  SeqKvView kv;
  int64_t n = 0;     // new stream tokens (text and, after a chunk's k-th token, its summaries)
  int64_t row0 = 0;  // first row of this sequence in the step's packed q/k/v/out/lse rows
};

// What plan_decode returns: everything a decode kernel needs about the cache (plain data inside) and what
// commit_decode / cancel_decode need to finish the step.
struct DecodePlan {
  StreamGeometry geo;
  KvPoolView pool;
  std::vector<DecodeSeq> seqs;  // in batch order
  std::vector<SeqId> ids;
  int64_t rows = 0;  // new stream tokens in all
  // Blocks this plan took from the pool (returned by cancel_decode): sequence index, table (0 text ring,
  // 1 summaries) and slot.
  struct Taken {
    int64_t seq = 0;
    int table = 0;
    int64_t slot = 0;
  };
  std::vector<Taken> taken;
  uint64_t ticket = 0;
};

// A sequence's position and footprint.
struct SeqState {
  int64_t text_tokens = 0;        // T
  int64_t summary_tokens = 0;     // summaries in the stream so far
  int64_t pending_summaries = 0;  // summary tokens due before the next text token (0..S)
  int64_t blocks = 0;             // blocks held
  int64_t bytes = 0;              // blocks * block bytes
  int64_t stream_length() const { return text_tokens + summary_tokens; }
};

class KvCache {
 public:
  explicit KvCache(const KvCacheConfig& cfg);
  // Slabs from `slabs` (null = host memory, as above).
  KvCache(const KvCacheConfig& cfg, std::shared_ptr<SlabAllocator> slabs);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  KvCache(KvCache&&) noexcept;
  KvCache& operator=(KvCache&&) noexcept;

  const KvCacheConfig& config() const;

  // A new, empty sequence. Ids are never reused.
  SeqId add_sequence();
  // Returns the sequence's blocks to the pool; its id becomes invalid.
  void release(SeqId id);
  bool contains(SeqId id) const;
  int64_t num_sequences() const;
  SeqState state(SeqId id) const;

  // Continues the sequence's stream with already computed rows k, v [n, Hkv, D] in stream order (e.g. a
  // whole prefilled stream on a new sequence). Copies only the rows that stay visible to later tokens.
  void prefill(SeqId id, const KvRows& k, const KvRows& v);
  // One text token [1, Hkv, D]. Fails while the previous chunk's summaries are due.
  void append_text(SeqId id, const KvRows& k, const KvRows& v);
  // Summary tokens of the chunk just completed, [n, Hkv, D] with n <= the pending count.
  void append_summaries(SeqId id, const KvRows& k, const KvRows& v);

  // The decode-step protocol (see above). n_new[i] new stream tokens for sequence ids[i]; ids distinct.
  // One plan at a time; no other change to the cache until it is committed or cancelled.
  DecodePlan plan_decode(std::span<const SeqId> ids, std::span<const int64_t> n_new);
  void commit_decode(const DecodePlan& plan);
  // Returns the blocks the plan took (only valid if nothing was written through the plan).
  void cancel_decode(const DecodePlan& plan);

  int64_t block_bytes() const;
  // Text rows of each sequence's ring (text_slots · block_rows): text row t shares its place with t ± this.
  int64_t text_ring_rows() const;
  int64_t bytes_in_use() const;          // blocks held by all sequences
  int64_t bytes_in_use(SeqId id) const;  // blocks held by one sequence
  int64_t bytes_reserved() const;        // pool memory allocated (held and free blocks)
  KvPoolView pool_view() const;
  SeqKvView view(SeqId id) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ksa
