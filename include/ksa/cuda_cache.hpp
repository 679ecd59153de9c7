// The compressed KV cache on a CUDA device and decoding through it (docs/ksa.md: The compressed cache; the GPU twin of
// ksa::KvCache + ksa::cpu::attention_decode). No CUDA includes, so host code can use it.
//
// Design: the SAME host bookkeeping as ksa::KvCache (it is one, constructed with a device SlabAllocator):
// block ids, rings, summary tables, plan/commit/cancel, errors before any change. Only the slabs live in
// device memory (cudaMalloc'ed, never moved; growth adds slabs; history is never copied). Each plan packs
// what the kernels need (slab pointers, the batch's block tables, per-token key ranges, the split work
// list) into a pinned host buffer and uploads it with ONE cudaMemcpyAsync on the stream into a device
// workspace whose address stays fixed (it only grows, rarely, with a stream sync). run() only launches
// kernels (write K/V, split attention, merge): no host reads, no syncs, capturable in a CUDA graph.
//
// Multi-token steps: the kernels write all new K/V first and then attend, so a step must never overwrite a
// ring row that an earlier token of the same step still reads. plan_decode checks this exactly and throws
// otherwise; KvCacheConfig::ring_slack_rows = R makes every step of up to R + 1 text tokens valid (the
// default config of KvCacheGpu adds 64 rows). A layer that does not store summaries (W·k >= context) keeps
// one chunk's summaries: a step there may not write summaries of two different chunks.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "ksa/cache.hpp"
#include "ksa/cuda.hpp"
#include "ksa/decode.hpp"

namespace ksa::cuda {

// Device memory that read_stream's row tables pass through (KvCacheGpu::make_read_scratch).
struct KvReadScratch;

struct KvCacheGpuOptions {
  // Keys per attention work unit (0 = chosen per plan to fill the device). Capped at 255 · block_rows (a
  // unit's block addresses are staged in the attend kernel's shared memory).
  int64_t split_rows = 0;
  // read_stream's device row table, shared by caches whose work is queued on one stream (a model's layers):
  // one buffer of the largest table instead of one per cache (the 4B shape at 128K: ~4 MB instead of ~50).
  // Null: the cache's own.
  std::shared_ptr<KvReadScratch> read_scratch;
};

class KvCacheGpu {
 public:
  // cfg.dtype must be bf16; D 64 or 128. All work is queued on `stream`.
  explicit KvCacheGpu(const KvCacheConfig& cfg, CudaStream stream = nullptr, KvCacheGpuOptions opt = {});
  // A read_stream scratch for KvCacheGpuOptions::read_scratch (no device memory until a read needs it).
  static std::shared_ptr<KvReadScratch> make_read_scratch();
  ~KvCacheGpu();
  KvCacheGpu(const KvCacheGpu&) = delete;
  KvCacheGpu& operator=(const KvCacheGpu&) = delete;

  const KvCacheConfig& config() const;
  KvCache& host();  // the bookkeeping (state, bytes, views); its host-copy operations throw
  SeqId add_sequence();
  void release(SeqId id);
  SeqState state(SeqId id) const;

  // Continues a sequence's stream with n rows k, v [n, Hkv, D] in DEVICE memory (stream order), copying
  // on the device only the rows a later token can still see. Asynchronous; k/v must stay valid until the
  // stream reaches it.
  void prefill(SeqId id, const KvRows& k, const KvRows& v);

  // Copies the sequence's cached text rows [text_begin, T) and summary rows [sum_begin, sums) (stored
  // summaries only) into k and v [L, Hkv, D] (device memory, bf16) at their stream positions (the dense
  // stream layout attention_forward reads; other rows untouched). Asynchronous on the cache's stream. For a
  // prompt continued in pieces: the keys its rows see that the cache holds.
  void read_stream(SeqId id, int64_t text_begin, int64_t sum_begin, const TensorView& k, const TensorView& v);

  // Plan / run / commit. io holds device pointers (q, k, v, out [R, H, D] bf16; lse [R, Hq] or null).
  // plan validates everything (throws, changing nothing) and queues the upload; run queues the kernels;
  // commit advances the bookkeeping (call it right after run: freed blocks are reused only by work queued
  // later on the same stream). One plan at a time.
  void plan_decode(std::span<const SeqId> ids, std::span<const int64_t> n_new, const DecodeIO& io);
  void run();
  void commit_decode();
  void cancel_decode();

  // The engine's order, for a step planned before its tensors exist and launched inside a CUDA graph:
  // plan_decode without tensors (Hq; scale 0 = 1/sqrt(D)), commit_decode, then launch(io) queues the kernels
  // of that plan (io's rows as planned) — until the next plan or prefill, any number of times. The plan sits
  // in a device workspace the kernels read through a pointer. Decode plans alternate between two workspaces
  // (workspace_slot() 0 and 1): a graph captured around launch() replays any later plan of the same rows in
  // the same slot while workspace_generation() (which names the slot and its allocation) is unchanged and
  // the plan has at most `unit_capacity` work units (plan_stats().units; 0 = exactly the plan's).
  void plan_decode(std::span<const SeqId> ids, std::span<const int64_t> n_new, int64_t Hq, float scale = 0.f);
  void launch(const DecodeIO& io, int64_t unit_capacity = 0);
  uint64_t workspace_generation() const;
  int workspace_slot() const;
  // Plan workspace `slot` (0 or 1): its device address (null while never allocated) and generation. A graph
  // captured for one slot serves the other once retarget_decode_graph moves its plan arguments.
  const void* workspace_address(int slot) const;
  uint64_t workspace_generation(int slot) const;
  // plan_decode(ids, n_new, Hq, scale) with the plan's upload queued on `upload` instead of the cache's
  // stream: for a step planned while the cache's stream still runs the launches of the plan before (the
  // engine plans step t+1 during step t). The upload fills the other slot than that plan's, so it may run
  // at once; the caller orders it after the launches of the plan before THAT one (in the engine: the step
  // before, already finished) and the cache's stream after the upload (an event). A plan that would grow a
  // workspace throws instead, changing nothing (growing waits for the device): plan that step on the cache's
  // stream.
  void plan_decode_on(CudaStream upload, std::span<const SeqId> ids, std::span<const int64_t> n_new, int64_t Hq,
                      float scale = 0.f);

  // Exact check of the two-phase rule above for one sequence's next step of n stream tokens.
  bool step_ok(SeqId id, int64_t n, std::string* why = nullptr) const;
  // Work of the last plan: attention work units, tokens, K/V rows read per KV head (for GB/s).
  struct PlanStats {
    int64_t units = 0, tokens = 0, key_rows = 0;
  };
  PlanStats plan_stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// In `graph` (a cudaGraph_t, not instantiated) captured around KvCacheGpu::launch: every decode kernel node
// whose plan argument is from[i] gets to[i] instead (a graph captured for one plan workspace slot made to
// serve the other: KvCacheGpu::workspace_address). Returns the nodes changed; a decode node whose plan is in
// neither list is left as it is.
int retarget_decode_graph(void* graph, std::span<const void* const> from, std::span<const void* const> to);

// Whether the device decode supports this cache config; `why` names the field and value when not.
bool supports(const KvCacheConfig& cfg, std::string* why = nullptr);

// Plan, run, commit.
inline void attention_decode(KvCacheGpu& cache, std::span<const SeqId> ids, std::span<const int64_t> n_new,
                             const DecodeIO& io) {
  cache.plan_decode(ids, n_new, io);
  cache.run();
  cache.commit_decode();
}

}  // namespace ksa::cuda
