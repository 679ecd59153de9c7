// The plan of the CUDA backward's dK/dV pass (attention_bwd.cu): which query tiles see each key tile. It is
// the inverse of the core's tile walk (key_spans + KeyTileCursor) and is built on the device from these
// functions; plain C++ (KSA_HD, no CUDA headers) so that a CPU test checks them against the cursor itself.
//
// Query tiles: BQ rows of the gathered order on a plain BQ grid over [0, L) (as the kernels' query tiles).
// Key tiles: BK rows on the BK grid of KeyTileCursor (within the text rows, then within the summary rows),
// index kt: text tiles first, then summary tiles.
#pragma once
#include <cstdint>
#include <vector>

#include "ksa/attention.hpp"
#include "ksa/spec.hpp"

namespace ksa::cuda::bwd {

// Key tiles are the core's KeyTileGrid(lay, BK); the query tiles that see key tile i are those whose
// key_spans meet it (KeySpans::meets), masked unless KeySpans::full_over holds.

// The query tiles that see one key tile form at most kMaxRuns runs of consecutive tiles (the text queries
// and the summary queries that see it; tests/cuda/attention_bwd_test.cpp checks the bound over random
// layouts, and the plan kernel traps if a layout ever exceeds it).
inline constexpr int kMaxRuns = 4;

// Plan records, shared by host and device.
struct alignas(8) PlanRun {
  int32_t begin = 0, end = 0;  // query tiles [begin, end)
};
// One CTA of the dK/dV pass: entries [e0, e1) of key tile kt's list (the query tiles of its runs, in order),
// for every query head of the group. slot < 0: the item owns the whole list and writes dk/dv; otherwise it
// writes fp32 partials to `slot` and the reduce kernel sums the key tile's slots in order.
struct alignas(16) PlanItem {
  int32_t kt = 0, e0 = 0, e1 = 0, slot = -1;
};
// A key tile whose list was split: partial slots [slot0, slot0 + nseg).
struct alignas(16) PlanSplit {
  int32_t kt = 0, slot0 = 0, nseg = 0, pad = 0;
};

// Tests: the plan the backward would build for this geometry (runs per key tile, items, splits), copied
// back from the device. split: entries per item as KernelOptions::backward_split sets it (0: the automatic choice for
// B*Hkv = bh). Defined in attention_bwd_plan.cu; needs a GPU.
struct PlanDump {
  int64_t BQ = 0, BK = 0, nq = 0, nk = 0;
  std::vector<int32_t> nruns;   // [nk]
  std::vector<PlanRun> runs;    // [nk * kMaxRuns]
  std::vector<PlanItem> items;  // [n_items]
  std::vector<PlanSplit> splits;
  int32_t n_slots = 0;
  // Packed params: key tile kt is key tile tile_in_stream[kt] of stream tile_stream[kt] (varlen::key_tiles);
  // its runs number that stream's query tiles from 0.
  std::vector<int32_t> tile_stream, tile_in_stream;
};
PlanDump backward_plan_for_testing(const Layout& lay, int64_t W, int64_t D, int64_t bh, int split);
// The same for packed params (cu_seqlens; p.W the window; the tensors are not read).
PlanDump backward_plan_for_testing(const AttentionParams& p, int64_t D, int64_t bh, int split);

}  // namespace ksa::cuda::bwd
