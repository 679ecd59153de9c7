// What a decode plan uploads and the decode kernels read (src/cuda/decode_plan.cpp packs it from the cache's
// plan, src/cuda/kv_cache_gpu.cu uploads it, one host -> device copy per plan; src/cuda/attention_decode.cu
// runs it). Plain data, 32-bit fields: a KvCacheGpu's
// rows and block ids fit (ids are int32 in the pool; rows per sequence < 2^31).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "cuda/views.cuh"
#include "ksa/cache.hpp"
#include "ksa/spec.hpp"

namespace ksa::cuda::detail {

// A new token of the step: its packed row in q/out/lse and its attention work units [unit0, unit0 + units).
struct DecTok {
  int32_t row = 0, unit0 = 0, units = 0, pad = 0;
};

// An attention work unit: keys = rows [begin, end) of one table (text rows or summary rows) of a sequence,
// for one token (grid.y runs the KV heads).
struct DecUnit {
  int32_t tok = 0, seq = 0, summary = 0, begin = 0, end = 0;
  int32_t qrow = 0;    // the token's packed row (toks[tok].row), copied here (one dependent load fewer)
  int32_t stored = 1;  // summary rows stored (0: the layer keeps one chunk's, row s at s % S)
  // Rows >= new_begin of the unit's table are written by this step: the attend kernel reads them from the
  // step's k/v (packed row src_off + stream position of the row), not from the cache, so that the writes can
  // run in the same grid.
  int32_t new_begin = 0, src_off = 0;
  // The cache rows the unit reads lie in blocks blk0, blk0 + 1, ... of its table (block = storage row / P;
  // storage row = the row, or row % S for summaries that are not stored); their addresses are
  // DecodeRun::unit_blocks[unit · unit_blocks_stride + (block - blk0)].
  int32_t blk0 = 0, pad = 0;
};

// At most this many block addresses per unit (the attend kernel stages a unit's list in smem); the plan cuts
// units short enough: (kMaxUnitBlocks - 1) · P rows span at most kMaxUnitBlocks blocks.
constexpr int kMaxUnitBlocks = 256;

// A K/V row to write into the cache: packed source row `src` of io.k/io.v goes to row `r` of cache block
// `blk` (resolved on the host from the row's table: the kernels do no table or slab arithmetic).
struct DecWrite {
  int32_t src = 0, r = 0;
  const uint16_t* blk = nullptr;
};

// The plan's part of the kernels' arguments: uploaded with the plan (it heads the plan's device workspace) and
// read by the kernels through a pointer, so that a launch whose plan changes from step to step keeps the same
// kernel parameters (a CUDA graph of the step replays it; KvCacheGpu::launch).
struct DecodeRun {
  // pool
  int32_t P = 16, Hkv = 1;
  // The stream geometry (k, S) of the cache's longest stream, whose summarised chunks are all full: stream
  // positions of any sequence's text and summary rows (new rows of a step come from its k/v by position).
  Layout32 lay;
  // plan
  // Per unit, the addresses of the blocks it reads, in order (DecUnit::blk0), unit_blocks_stride apart; the
  // attend kernel loads them together with the unit, so no tile waits on a block-table load.
  const uint16_t* const* unit_blocks = nullptr;
  int32_t unit_blocks_stride = 0;
  const DecTok* toks = nullptr;
  const DecUnit* units = nullptr;
  const DecWrite* writes = nullptr;
  int32_t n_writes = 0, n_toks = 0, n_units = 0;
  int32_t Hq = 1, G = 1, D = 128;
  float scale = 1.f;
  // split partials: acc [units, Hkv, G, D], (m, l) [units, Hkv, G]
  float* part_acc = nullptr;
  float2* part_ml = nullptr;
};

// The step's tensors (bf16 bits; packed rows, so the batch stride is unused): kernel parameters by value.
struct DecodeTensors {
  View q, k, v, out;
  float* lse = nullptr;
};

// Device addresses of a pool's blocks by id, each computed once (pv.block(id): a slab is never moved, so an
// id's address is fixed for the pool's life). Lookups by the plan's packing instead of a division per block.
class BlockAddresses {
 public:
  const void* get(const KvPoolView& pv, int32_t id) {
    if (size_t(id) >= addr_.size()) addr_.resize(std::max<size_t>(size_t(id) + 1, 2 * addr_.size()), nullptr);
    const void*& a = addr_[size_t(id)];
    if (!a) a = pv.block(id);
    return a;
  }

 private:
  std::vector<const void*> addr_;
};

// A decode step's work, packed on the host from the cache's plan (decode_plan.cpp). Reused from step to step
// (pack_decode clears it and keeps the capacity: a long context's plan is ~10^4 entries, and fresh vectors
// of that size each step cost page faults, measured at hundreds of us per layer).
struct PackedDecode {
  std::vector<DecTok> toks;
  std::vector<DecUnit> units;
  std::vector<DecWrite> writes;
  std::vector<const void*> unit_blocks;  // per unit, the addresses of the blocks it reads, stride apart
  int32_t unit_blocks_stride = 1;
  int64_t total_keys = 0;  // keys attended over all tokens (per KV head)
  // scratch
  struct Range {
    int32_t tok, seq, summary, begin, end, new_begin, src_off;
  };
  std::vector<Range> ranges;
  std::vector<int32_t> unit_ids;  // per unit, its blocks' ids (unit_nblk[u] of them, in order)
  std::vector<int32_t> unit_nblk;
};
// Packs plan p of a cache with config cfg and pool pv into pk: a write per new row that `keep` accepts, and,
// unless write_only, the tokens and their attention units. Units are split_rows keys long, or (0) sized so
// that the units of all KV heads fill whole waves of per_wave resident attend CTAs per KV head.
void pack_decode(const DecodePlan& p, const KvCacheConfig& cfg, const KvPoolView& pv, BlockAddresses& addr,
                 bool write_only, const std::function<bool(const DecodeKeys&)>& keep, int64_t split_rows,
                 int64_t per_wave, PackedDecode& pk);
// The blob that carries a packed plan to the device: the DecodeRun `run` (its pointers set for a blob at
// `dev`), then the packed arrays, in 16-byte aligned sections. Returns its bytes; with dev null only counts
// them; with host set also writes the blob there.
size_t decode_blob(const PackedDecode& pk, DecodeRun& run, char* dev, char* host);

// CTAs of the attend kernel that fit on one SM (for the plan's split), and keys per attend tile (units are
// cut in multiples of it).
int attend_ctas_per_sm(int D, int G);
int attend_tile_keys();
// Whether `func` (a kernel's host address, as a CUDA graph's kernel node names it) is one of the decode
// kernels: their first parameter is the plan (const DecodeRun*).
bool is_decode_kernel(const void* func);

// Queues the split attention (which also writes the step's new K/V rows) and the merge; a plan without
// tokens (a prefill's writes) runs the write kernel alone. No host reads or syncs. `host` is the plan as
// uploaded to `dev` (its counts size the grids); `unit_capacity` > n_units launches that many attend CTAs
// per KV head, those past n_units returning at once (a graph captured with it replays later plans of up to
// unit_capacity units).
void launch_decode(const DecodeRun& host, const DecodeRun* dev, const DecodeTensors& t, cudaStream_t stream,
                   int64_t unit_capacity = 0);

}  // namespace ksa::cuda::detail
