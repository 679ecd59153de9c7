// The CUDA backward's plan on the host side (defined in attention_bwd_plan.cu, used by attention_bwd.cu): its
// sizes, its place in the workspace and the launch of the kernels that build it on the device.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_bwd.cuh"
#include "cuda/varlen_plan.hpp"
#include "cuda/workspace.cuh"
#include "ksa/spec.hpp"

namespace ksa::cuda::detail {

// Sizes of the plan for a layout; the bounds follow from the schedule (attention_bwd.cu's file comment): with
// U >= total / target, sum_i ceil(n_i / U) <= nk + target items, and split tiles (n_i > U) number <= target and
// take < 2 * total / U <= 2 * target slots.
struct PlanSizes {
  int BQ = 0, BK = 0, nq = 0, nk = 0, ntext = 0;
  int forced = 0, target = 0, umin = 8;
  int64_t max_items = 0, max_splits = 0, max_slots = 0;
};

// nq query tiles, nk key tiles of which ntext text tiles (first); a key tile's list has at most max_list
// entries (the query tiles of its stream). forced: entries per item (> 0; KernelOptions::backward_split), or
// <= 0: automatic (by the device's SMs: minb resident CTAs per SM over bh = B * Hkv).
PlanSizes plan_sizes(int64_t nq, int64_t ntext, int64_t nk, int64_t max_list, int BQ, int BK, int64_t bh, int minb,
                     int forced);
// The plan of one layout (a plain call): query tiles on the BQ grid over [0, L), its key tiles.
PlanSizes plan_sizes(const Layout& lay, int BQ, int BK, int64_t bh, int minb, int forced);
// The plan's arrays (and part_floats fp32 per partial slot) from the workspace carver.
void carve_plan(Carver& c, PlanArgs& pl, const PlanSizes& ps, int64_t part_floats);
void fill_plan_args(PlanArgs& pl, const PlanSizes& ps);
// The three plan kernels (spans, runs, schedule) on stream s.
void launch_plan(const Layout& lay, int64_t W, const PlanSizes& ps, const PlanArgs& pl, const varlen::Tables& v,
                 cudaStream_t s);

// The portable dK/dV pass's tiles for head dimension D (64 or 128; defined in attention_bwd.cu beside the
// pass): the plan test hook sizes its plans with them.
struct DkvTiles {
  int BQ = 0, BK = 0, MINB = 0;
};
DkvTiles portable_dkv_tiles(int64_t D);

}  // namespace ksa::cuda::detail
