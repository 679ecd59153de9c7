// The warp-specialised pipeline of the sm_90a kernels (include only from *_sm90a.cu): a CTA of 384 threads,
// consumer warpgroups 0 and 1 and a producer warpgroup 2. The producer walks the CTA's key tiles
// (KeyTileCursor), copies each tile's rows (gathered order) with cp.async into the next free smem stage,
// 128B-swizzled for wgmma, and hands it to both consumers through named barriers; the consumers give the
// stage back when their products on it have completed. TmaProducer (the forward where the layout allows it):
// the same ring with each tile copied by the tensor memory accelerator and published on a per-stage mbarrier.
#pragma once
#include <cstdint>

#include "cuda/mma.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"
#include "ksa/spec.hpp"

namespace ksa::cuda::dev {

// What the producer tells the consumers about the tile in a stage.
struct TileInfo {
  int32_t begin, end;  // gathered rows [begin, end) of the streamed tile
  int32_t masked;      // the consumers must apply the visibility rule (some pair of the step is hidden)
  int32_t aux;         // kernel-specific (the dK/dV pass: the query head)
  int32_t last;        // the CTA's last tile
  int32_t pad[3];
};

__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Named barriers (id 0 is __syncthreads): full[stage][consumer wg] (producer arrives, that consumer waits),
// empty[stage] (consumers arrive, producer waits), sched[wg] (the consumers' turns on the tensor cores).
template <int STAGES>
struct Bars {
  static constexpr int kFull = 1, kEmpty = kFull + 2 * STAGES, kSched = kEmpty + STAGES;
  static constexpr int kFree = kSched + 2;  // the first id a kernel may use for its own barriers
  static_assert(kFree <= 16, "16 named barriers per CTA");
  static constexpr int full(int st, int wg) { return kFull + 2 * st + wg; }
  static constexpr int empty(int st) { return kEmpty + st; }
  static constexpr int sched(int wg) { return kSched + wg; }

  // Consumer side. wait_full: stage st holds this consumer's next tile; release: this consumer is done with
  // stage st (the producer may refill it once both have released it).
  static __device__ __forceinline__ void wait_full(int st, int wg) { bar_sync(full(st, wg), 256); }
  static __device__ __forceinline__ void release(int st) { bar_arrive(empty(st), 384); }
  // The consumers issue their products in turns, 0 first, then alternating, so one's products run on the
  // tensor cores while the other works on its registers. take_turn before issuing turn i (0, 1, ...) of this
  // consumer; pass_turn after, with `more` = this consumer takes a further turn (both take the same number).
  static __device__ __forceinline__ void take_turn(int wg, int i) {
    if (wg == 1 || i > 0) bar_sync(sched(wg), 256);
  }
  static __device__ __forceinline__ void pass_turn(int wg, bool more) {
    if (wg == 0) bar_arrive(sched(1), 256);
    else if (more) bar_arrive(sched(0), 256);
  }
  // Producer side, after its last tile (j tiles issued in all): completes the empty barriers' outstanding
  // phases, so that every consumer arrival is matched.
  static __device__ __forceinline__ void drain(int j) {
    for (int jj = j - STAGES > 0 ? j - STAGES : 0; jj < j; ++jj) bar_sync(empty(jj % STAGES), 384);
  }
  // The consumers' side of Producer's reuse barrier: this consumer is done with the item's one-time data.
  static __device__ __forceinline__ void reuse_done(int reuse_bar) { bar_arrive(reuse_bar, 384); }
  // Turn i of this consumer: issue() queues its wgmma products (one commit group), the turn passes as soon as
  // they are queued, then this consumer waits for them (and any group still in flight).
  template <class Issue>
  static __device__ __forceinline__ void products_in_turn(int wg, int i, bool more, Issue&& issue) {
    take_turn(wg, i);
    wgmma_fence();
    issue();
    wgmma_commit();
    pass_turn(wg, more);
    wgmma_wait<0>();
  }
};
// setmaxnreg moves registers only within what the CTA was launched with: __launch_bounds__(384, 1) gives
// 168 registers per thread (65536 / 384 rounded down to a multiple of 8), so the producer's and the two
// consumers' counts must fit in 384 * 168. Asking for more makes setmaxnreg.inc wait forever.
constexpr bool regs_fit(int producer, int consumer) {
  return producer % 8 == 0 && consumer % 8 == 0 && 128 * producer + 256 * consumer <= 384 * 168;
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Producer: the ROWS rows [g0, g0 + ROWS) of one head (gathered order; rows >= g_end zero-filled; base at the
// head's element 0) into a 128B-swizzled tile of ROWS rows. Warp w of the producer takes rows
// [w ROWS/4, (w+1) ROWS/4): each lane computes one row's stream position, then the warp copies whole rows
// per instruction (consecutive lanes, consecutive 16-byte chunks of a row): every request is a run of full
// 32-byte sectors.
template <class T, int D, int ROWS>
__device__ __forceinline__ void load_rows(const Layout32& l32, uint32_t s, const T* base, int64_t rstride, int g0,
                                          int g_end) {
  constexpr int CH = D / 8, RPW = ROWS / 4, RPI = 32 / CH;  // chunks per row, rows per warp, rows per instruction
  static_assert(RPW <= 32 && RPW % RPI == 0, "rows per producer warp");
  const int lane = int(threadIdx.x) % 32, w = (int(threadIdx.x) / 32) % 4;
  const int g = g0 + RPW * w + lane;
  const uint32_t srow = lane < RPW && g < g_end ? l32.stream_of_gathered(uint32_t(g)) : 0u;
  const int c = lane % CH, sub = lane / CH;
#pragma unroll
  for (int i = 0; i < RPW / RPI; ++i) {
    const int rw = RPI * i + sub;  // row within the warp's RPW
    const uint32_t sr = __shfl_sync(0xffffffffu, srow, rw);
    const bool valid = g0 + RPW * w + rw < g_end;
    cp_async16(s + sw128<ROWS>(RPW * w + rw, c), base + int64_t(sr) * rstride + c * 8, valid);
  }
}

// The producer warpgroup's side of the stage ring, over one or more work items of a CTA (a persistent CTA
// takes several; stage j % STAGES holds the CTA's j-th tile counted over all its items). Per item, item():
// `first()` issues the item's one-time loads (they land with its first tile); `next(TileInfo&)` yields the
// item's tiles in order (begin, end, masked, aux; false when done, true at least once); `load(stage_addr,
// info)` issues a tile's loads into a stage (stage st at s_stages + st * stage_bytes). Each tile is published
// to both consumers once it has landed, the item's last with TileInfo::last set. Before a later item's
// `first()` overwrites the previous item's one-time data, the producer waits on named barrier `reuse_bar`
// (384 threads: both consumers arrive there once they are done with that data, Bars::reuse_done); the
// item's first K/V tile is already in flight by then. finish() after the last item.
template <int STAGES>
struct Producer {
  using B = Bars<STAGES>;
  uint32_t s_stages, stage_bytes;
  TileInfo* info;
  int reuse_bar;
  int j = 0;  // tiles issued so far
  __device__ Producer(uint32_t s_stages_, uint32_t stage_bytes_, TileInfo* info_, int reuse_bar_)
      : s_stages(s_stages_), stage_bytes(stage_bytes_), info(info_), reuse_bar(reuse_bar_) {}

  __device__ __forceinline__ void publish(int jj, TileInfo t, int last) {  // tile jj landed (this thread's part)
    fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    if (threadIdx.x == 256) {
      t.last = last;
      info[jj % STAGES] = t;
    }
    bar_arrive(B::full(jj % STAGES, 0), 256);
    bar_arrive(B::full(jj % STAGES, 1), 256);
  }
  template <class First, class Next, class Load>
  __device__ __forceinline__ void item(First first, Next next, Load load) {
    TileInfo cur{}, prev{};
    next(cur);
    // The item's first tile, then its one-time loads.
    if (j >= STAGES) bar_sync(B::empty(j % STAGES), 384);  // both consumers are done with tile j - STAGES
    load(s_stages + uint32_t(j % STAGES) * stage_bytes, cur);
    cp_async_commit();
    if (j > 0) bar_sync(reuse_bar, 384);  // the consumers are done with the previous item's one-time data
    first();
    cp_async_commit();
    for (;;) {
      prev = cur;
      ++j;
      if (!next(cur)) break;
      const int st = j % STAGES;
      if (j >= STAGES) bar_sync(B::empty(st), 384);
      load(s_stages + uint32_t(st) * stage_bytes, cur);
      cp_async_commit();
      cp_async_wait<1>();  // tile j - 1 (and the one-time loads) landed; tile j stays in flight
      publish(j - 1, prev, 0);
    }
    cp_async_wait<0>();
    publish(j - 1, prev, 1);
  }
  __device__ __forceinline__ void finish() { B::drain(j); }
};

// The same stage ring with the tiles copied by the tensor memory accelerator (tma.cuh): one leader thread
// of the producer warpgroup writes a tile's TileInfo, announces the stage's bytes on the stage's mbarrier
// (full_bars + 8 st, initialised with one arrival) and issues the copies, which complete on that barrier; the
// consumers wait on it with parity (j / STAGES) & 1 instead of the named full barriers. The empty barriers and
// the reuse barrier are Producer's. `first()` runs on all 128 producer threads (the item's one-time loads,
// which signal completion on their own); `load(stage_addr, info, bar)` runs on the leader only.
template <int STAGES>
struct TmaProducer {
  using B = Bars<STAGES>;
  uint32_t s_stages, stage_bytes, full_bars, tile_bytes;
  TileInfo* info;
  int reuse_bar;
  int j = 0;  // tiles issued so far
  __device__ TmaProducer(uint32_t s_stages_, uint32_t stage_bytes_, uint32_t full_bars_, uint32_t tile_bytes_,
                         TileInfo* info_, int reuse_bar_)
      : s_stages(s_stages_),
        stage_bytes(stage_bytes_),
        full_bars(full_bars_),
        tile_bytes(tile_bytes_),
        info(info_),
        reuse_bar(reuse_bar_) {}

  template <class First, class Next, class Load>
  __device__ __forceinline__ void item(First first, Next next, Load load) {
    const bool leader = threadIdx.x % 128 == 0;
    TileInfo cur{}, nxt{};
    next(cur);
    bool more = next(nxt);
    for (bool first_tile = true;; first_tile = false) {
      const int st = j % STAGES;
      if (j >= STAGES) bar_sync(B::empty(st), 384);  // both consumers are done with tile j - STAGES
      if (leader) {
        cur.last = !more;
        info[st] = cur;  // published by the barrier's arrival (release) below
        const uint32_t bar = full_bars + 8u * uint32_t(st);
        mbar_arrive_expect_tx(bar, tile_bytes);
        load(s_stages + uint32_t(st) * stage_bytes, cur, bar);
      }
      if (first_tile) {
        if (j > 0) bar_sync(reuse_bar, 384);  // the consumers are done with the previous item's one-time data
        first();
      }
      ++j;
      if (!more) break;
      cur = nxt;
      more = next(nxt);
    }
  }
  __device__ __forceinline__ void finish() { B::drain(j); }
};

// One work item per CTA: Producer::item, then finish (no reuse barrier is waited on).
template <int STAGES, class First, class Next, class Load>
__device__ __forceinline__ void produce(uint32_t s_stages, uint32_t stage_bytes, TileInfo* info, First first, Next next,
                                        Load load) {
  Producer<STAGES> p(s_stages, stage_bytes, info, 0);
  p.item(first, next, load);
  p.finish();
}

// The key tiles of the queries [g0, g1) (KeyTileCursor, BK rows) as a producer's `next`.
template <int BK>
struct KeyTiles {
  KeyTileCursor cur;
  __device__ KeyTiles(const Layout& lay, int64_t W, int g0, int g1) : cur(lay, key_spans(lay, W, g0, g1), BK) {}
  __device__ bool operator()(TileInfo& t) {
    int64_t tb, te;
    bool masked;
    if (!cur.next(tb, te, masked)) return false;
    t = TileInfo{int32_t(tb), int32_t(te), int32_t(masked || (te - tb) < BK), 0, 0, {0, 0, 0}};
    return true;
  }
};

}  // namespace ksa::cuda::dev
