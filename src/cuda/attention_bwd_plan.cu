// The CUDA backward's plan (attention_bwd.cu, whose file comment describes it): the device kernels that build
// it (the query tiles' key spans, each key tile's runs of query tiles, the schedule of dK/dV work items), its
// sizes and workspace, and the test hook that copies a plan back (backward_plan_for_testing).
//
// File shape (docs/design.md: kernel files): device code -> launcher -> test hooks.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "attention_bwd_plan.hpp"
#include "attention_bwd_plan_launch.cuh"
#include "check.cuh"
#include "cuda/attention_bwd.cuh"
#include "cuda/varlen_plan.hpp"
#include "cuda/workspace.cuh"
#include "ksa/cuda.hpp"
#include "ksa/error.hpp"
#include "launch_checks.hpp"

namespace ksa::cuda {
namespace detail {
namespace {

using bwd::kMaxRuns;
using bwd::PlanItem;
using bwd::PlanRun;
using bwd::PlanSplit;

// ---- pass 2: the plan
__global__ void __launch_bounds__(128) spans_kernel(const Layout lay, int64_t W, PlanArgs pl, const varlen::Tables v) {
  const int qt = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (qt >= pl.nq) return;
  if (v.seqs) {  // packed: the tile's stream; a tile past the stream's rows (its padding) sees nothing
    const int64_t p = int64_t(qt) * pl.BQ;
    const varlen::Seq s = v.seqs[v.row_blocks[p / kRowPad]];
    const int64_t g0 = p - s.p0, L = s.L;
    const Layout sl(lay.chunk_size, lay.S, s.l32.T, lay.summarize_tail);
    pl.spans[qt] = g0 < L ? key_spans(sl, W, g0, g0 + pl.BQ < L ? g0 + pl.BQ : L) : KeySpans{};
    return;
  }
  const int64_t L = lay.length(), g0 = int64_t(qt) * pl.BQ;
  pl.spans[qt] = key_spans(lay, W, g0, g0 + pl.BQ < L ? g0 + pl.BQ : L);
}

// One warp per key tile: scans the query tiles 32 at a time and records the runs of those that see it.
__global__ void __launch_bounds__(256) runs_kernel(const Layout lay0, PlanArgs pl, const varlen::Tables v) {
  const int kt = int((blockIdx.x * blockDim.x + threadIdx.x) / 32), lane = int(threadIdx.x % 32);
  if (kt >= pl.nk) return;  // warp-uniform
  // The query tiles scanned: all of the call's; packed, those of the key tile's stream (numbered from 0 in
  // the runs, as a call on the stream alone numbers them), the key tile taken in its stream.
  Layout lay = lay0;
  int lkt = kt, nq = pl.nq;
  const KeySpans* spans = pl.spans;
  if (v.ktiles) {
    const varlen::KeyTile r = v.ktiles[kt];
    const varlen::Seq s = v.seqs[r.seq];
    lay = Layout(lay0.chunk_size, lay0.S, s.l32.T, lay0.summarize_tail);
    lkt = r.kt;
    nq = (s.L + pl.BQ - 1) / pl.BQ;
    spans += s.p0 / pl.BQ;
  }
  int64_t tb, te;
  KeyTileGrid(lay, pl.BK).rows(lkt, tb, te);
  PlanRun* runs = pl.runs + int64_t(kt) * kMaxRuns;
  int n = 0, count = 0, open = -1;  // open: first query tile of the run being scanned, -1 none
  auto close = [&](int end) {
    if (n >= kMaxRuns) {
      if (lane == 0)
        printf("ksa::cuda::attention_backward: key tile %d is seen by more than %d runs of query tiles\n", kt,
               kMaxRuns);
      __trap();
    }
    if (lane == 0) runs[n] = PlanRun{open, end};
    ++n;
    count += end - open;
    open = -1;
  };
  for (int base = 0; base < nq; base += 32) {
    const int qt = base + lane;
    const bool seen = qt < nq && spans[qt].meets(tb, te);
    const unsigned bits = __ballot_sync(0xffffffffu, seen);
    unsigned edges = bits ^ ((bits << 1) | (open >= 0 ? 1u : 0u));  // bit i: seen(i) != seen(i - 1)
    while (edges) {
      const int i = __ffs(int(edges)) - 1;
      edges &= edges - 1;
      if ((bits >> i) & 1u) open = base + i;
      else close(base + i);
    }
  }
  if (open >= 0) close(nq);
  if (lane == 0) {
    pl.nruns[kt] = n;
    pl.count[kt] = count;
  }
}

// Exclusive scan of one int per thread over a 1024-thread block; `total` gets the sum. sh: 32 ints.
__device__ int block_exclusive_scan(int v, int& total, int* sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = sh[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    sh[lane] = w;
  }
  __syncthreads();
  const int prefix = (warp > 0 ? sh[warp - 1] : 0) + x - v;
  total = sh[31];
  __syncthreads();  // sh is reused by the next scan
  return prefix;
}

// One block of 1024 threads: cuts the lists into items (see the file comment) and writes them in schedule
// order. forced > 0: U = forced (tests, tuning); target < 2: no splitting.
__global__ void __launch_bounds__(1024) schedule_kernel(PlanArgs pl, int forced, int target, int umin) {
  __shared__ long long red[32];
  __shared__ int sh[32];
  long long tot = 0;
  for (int kt = threadIdx.x; kt < pl.nk; kt += blockDim.x) tot += pl.count[kt];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = tot;
  __syncthreads();
  long long total = 0;
  for (int w = 0; w < 32; ++w) total += red[w];
  long long u = forced > 0 ? forced : target < 2 ? INT_MAX : (total + target - 1) / target;
  if (forced <= 0 && u < umin) u = umin;
  const int U = int(u < INT_MAX ? u : INT_MAX);
  auto nseg_of = [&](int c) { return c <= U ? 1 : int((int64_t(c) + U - 1) / U); };
  // Schedule order p: summary tiles first (the oldest, most-seen ones lead), then the text tiles.
  const int nsum = pl.nk - pl.ntext;
  auto tile_at = [&](int p) { return p < nsum ? pl.ntext + p : p - nsum; };
  const int per = (pl.nk + int(blockDim.x) - 1) / int(blockDim.x);
  const int p0 = min(pl.nk, int(threadIdx.x) * per), p1 = min(pl.nk, p0 + per);
  int n_items = 0, n_split = 0, n_slots = 0;
  for (int p = p0; p < p1; ++p) {
    const int s = nseg_of(pl.count[tile_at(p)]);
    n_items += s;
    if (s > 1) {
      ++n_split;
      n_slots += s;
    }
  }
  int tot_items, tot_split, tot_slots;
  int item = block_exclusive_scan(n_items, tot_items, sh);
  int split = block_exclusive_scan(n_split, tot_split, sh);
  int slot = block_exclusive_scan(n_slots, tot_slots, sh);
  if (tot_items > pl.max_items || tot_split > pl.max_splits || tot_slots > pl.max_slots) {
    if (threadIdx.x == 0)
      printf("ksa::cuda::attention_backward: plan exceeds its bounds (items %d/%d, splits %d/%d, slots %d/%d)\n",
             tot_items, pl.max_items, tot_split, pl.max_splits, tot_slots, pl.max_slots);
    __trap();
  }
  for (int p = p0; p < p1; ++p) {
    const int kt = tile_at(p), c = pl.count[kt], s = nseg_of(c);
    for (int j = 0; j < s; ++j)
      pl.items[item++] = PlanItem{kt, int(int64_t(c) * j / s), int(int64_t(c) * (j + 1) / s), s > 1 ? slot + j : -1};
    if (s > 1) {
      pl.splits[split++] = PlanSplit{kt, slot, s, 0};
      slot += s;
    }
  }
  if (threadIdx.x == 0) {
    pl.counters[0] = tot_items;
    pl.counters[1] = tot_split;
    pl.counters[2] = tot_slots;
  }
}

}  // namespace

// --------------------------------------------------------------------------------------------- launcher
// Sizes of the plan for a layout; the bounds follow from the schedule (file comment): with U >= total /
// target, sum_i ceil(n_i / U) <= nk + target items, and split tiles (n_i > U) number <= target and take
// < 2 * total / U <= 2 * target slots.

// nq query tiles, nk key tiles of which ntext text tiles (first); a key tile's list has at most max_list
// entries (the query tiles of its stream). forced: entries per item (> 0; KernelOptions::backward_split), or
// <= 0: automatic.
PlanSizes plan_sizes(int64_t nq, int64_t ntext, int64_t nk, int64_t max_list, int BQ, int BK, int64_t bh, int minb,
                     int forced) {
  PlanSizes ps;
  ps.BQ = BQ;
  ps.BK = BK;
  if (nq > INT_MAX / 2 || nk > INT_MAX / 2)
    fail("ksa::cuda::attention_backward: plan too large (", nq, " query tiles, ", nk, " key tiles)");
  ps.nq = int(nq);
  ps.ntext = int(ntext);
  ps.nk = int(nk);
  ps.forced = std::max(forced, 0);
  int dev = 0, sms = 0;
  KSA_CUDA_CHECK(cudaGetDevice(&dev));
  KSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t resident = int64_t(sms) * minb;
  ps.target = int(std::min<int64_t>(2 * resident / std::max<int64_t>(bh, 1), 1 << 20));
  if (ps.forced > 0) {
    const int64_t per = (max_list + ps.forced - 1) / ps.forced;  // segments of the longest possible list
    ps.max_items = ps.nk * per;
    ps.max_splits = per > 1 ? ps.nk : 0;
    ps.max_slots = per > 1 ? ps.nk * per : 0;
  } else if (ps.target < 2) {
    ps.max_items = ps.nk;
  } else {
    ps.max_items = ps.nk + ps.target;
    ps.max_splits = ps.target;
    ps.max_slots = 2 * int64_t(ps.target);
  }
  if (ps.max_items > INT_MAX / 2 || ps.max_slots > INT_MAX / 2)
    fail("ksa::cuda::attention_backward: plan too large (", ps.max_items, " items; backward_split ", ps.forced, ")");
  return ps;
}
// The plan of one layout (a plain call): query tiles on the BQ grid over [0, L), its key tiles.
PlanSizes plan_sizes(const Layout& lay, int BQ, int BK, int64_t bh, int minb, int forced) {
  const int64_t nq = (lay.length() + BQ - 1) / BQ;
  return plan_sizes(nq, KeyTileGrid(lay, BK).ntext, KeyTileGrid(lay, BK).count, nq, BQ, BK, bh, minb, forced);
}

void carve_plan(Carver& c, PlanArgs& pl, const PlanSizes& ps, int64_t part_floats) {
  pl.spans = c.take<KeySpans>(ps.nq);
  pl.runs = c.take<PlanRun>(int64_t(ps.nk) * kMaxRuns);
  pl.nruns = c.take<int>(ps.nk);
  pl.count = c.take<int>(ps.nk);
  pl.items = c.take<PlanItem>(ps.max_items);
  pl.splits = c.take<PlanSplit>(ps.max_splits);
  pl.counters = c.take<int>(4);
  pl.part_k = c.take<float>(ps.max_slots * part_floats);
  pl.part_v = c.take<float>(ps.max_slots * part_floats);
}

void fill_plan_args(PlanArgs& pl, const PlanSizes& ps) {
  pl.nq = ps.nq;
  pl.nk = ps.nk;
  pl.ntext = ps.ntext;
  pl.BQ = ps.BQ;
  pl.BK = ps.BK;
  pl.max_items = int(ps.max_items);
  pl.max_splits = int(ps.max_splits);
  pl.max_slots = int(ps.max_slots);
}

void launch_plan(const Layout& lay, int64_t W, const PlanSizes& ps, const PlanArgs& pl, const varlen::Tables& v,
                 cudaStream_t s) {
  spans_kernel<<<unsigned((ps.nq + 127) / 128), 128, 0, s>>>(lay, W, pl, v);
  KSA_CUDA_CHECK_LAUNCH();
  runs_kernel<<<unsigned((ps.nk + 7) / 8), 256, 0, s>>>(lay, pl, v);
  KSA_CUDA_CHECK_LAUNCH();
  schedule_kernel<<<1, 1024, 0, s>>>(pl, ps.forced, ps.target, ps.umin);
  KSA_CUDA_CHECK_LAUNCH();
}

}  // namespace detail

namespace bwd {

using detail::carve_plan;
using detail::Carver;
using detail::DkvTiles;
using detail::fill_plan_args;
using detail::launch_plan;
using detail::plan_sizes;
using detail::PlanArgs;
using detail::PlanSizes;
using detail::portable_dkv_tiles;
using detail::Workspace;

namespace {

// The device plan for these sizes (packed: with the streams' tables), copied back.
PlanDump dump_plan(const Layout& lay, int64_t W, const PlanSizes& ps, const varlen::Streams* packed,
                   const varlen::KeyTiles* kts) {
  PlanDump out;
  out.BQ = ps.BQ;
  out.BK = ps.BK;
  out.nq = ps.nq;
  out.nk = ps.nk;
  if (ps.nk == 0) return out;
  Carver measure;
  PlanArgs pl{};
  carve_plan(measure, pl, ps, 0);
  detail::HostImage img;
  size_t o_seqs = 0, o_blocks = 0, o_ktiles = 0;
  if (packed) {
    o_seqs = img.add(packed->seqs);
    o_blocks = img.add(varlen::row_blocks(*packed));
    o_ktiles = img.add(kts->tiles);
    measure.take<char>(int64_t(img.size()));
  }
  const cudaStream_t s = nullptr;
  Workspace ws(measure.off, s);
  Carver c{static_cast<char*>(ws.p), 0};
  carve_plan(c, pl, ps, 0);
  fill_plan_args(pl, ps);
  varlen::Tables v;
  if (packed) {
    char* tables = c.take<char>(int64_t(img.size()));
    img.upload(tables, s);
    v.seqs = detail::HostImage::at<varlen::Seq>(tables, o_seqs);
    v.row_blocks = detail::HostImage::at<int32_t>(tables, o_blocks);
    v.ktiles = detail::HostImage::at<varlen::KeyTile>(tables, o_ktiles);
    for (const varlen::KeyTile& t : kts->tiles) {
      out.tile_stream.push_back(t.seq);
      out.tile_in_stream.push_back(t.kt);
    }
  }
  launch_plan(lay, W, ps, pl, v, s);
  int counters[4] = {};
  KSA_CUDA_CHECK(cudaMemcpyAsync(counters, pl.counters, sizeof counters, cudaMemcpyDeviceToHost, s));
  KSA_CUDA_CHECK(cudaStreamSynchronize(s));
  out.nruns.resize(size_t(ps.nk));
  out.runs.resize(size_t(ps.nk) * kMaxRuns);
  out.items.resize(size_t(counters[0]));
  out.splits.resize(size_t(counters[1]));
  out.n_slots = counters[2];
  KSA_CUDA_CHECK(cudaMemcpy(out.nruns.data(), pl.nruns, out.nruns.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
  KSA_CUDA_CHECK(cudaMemcpy(out.runs.data(), pl.runs, out.runs.size() * sizeof(PlanRun), cudaMemcpyDeviceToHost));
  KSA_CUDA_CHECK(cudaMemcpy(out.items.data(), pl.items, out.items.size() * sizeof(PlanItem), cudaMemcpyDeviceToHost));
  KSA_CUDA_CHECK(
      cudaMemcpy(out.splits.data(), pl.splits, out.splits.size() * sizeof(PlanSplit), cudaMemcpyDeviceToHost));
  ws.release();
  KSA_CUDA_CHECK(cudaStreamSynchronize(s));
  return out;
}

}  // namespace

PlanDump backward_plan_for_testing(const Layout& lay, int64_t W, int64_t D, int64_t bh, int split) {
  const DkvTiles t = portable_dkv_tiles(D);
  const PlanSizes ps = plan_sizes(lay, t.BQ, t.BK, bh, t.MINB, split > 0 ? split : 0);
  return dump_plan(lay, W, ps, nullptr, nullptr);
}

PlanDump backward_plan_for_testing(const AttentionParams& p, int64_t D, int64_t bh, int split) {
  validate(p);
  if (!p.packed()) fail("backward_plan_for_testing: params without cu_seqlens (use the Layout overload)");
  const varlen::Streams st = varlen::streams_of(p);
  const DkvTiles t = portable_dkv_tiles(D);
  const varlen::KeyTiles kts = varlen::key_tiles(st, t.BK);
  int64_t longest = 0;
  for (const varlen::Seq& q : st.seqs) longest = std::max<int64_t>(longest, q.L);
  const PlanSizes ps = plan_sizes(st.padded_rows / t.BQ, kts.ntext, int64_t(kts.tiles.size()),
                                  (longest + t.BQ - 1) / t.BQ, t.BQ, t.BK, bh, t.MINB, split > 0 ? split : 0);
  return dump_plan(Layout(p.layout.chunk_size, p.layout.S, 0, p.layout.summarize_tail), p.W, ps, &st, &kts);
}

}  // namespace bwd
}  // namespace ksa::cuda
