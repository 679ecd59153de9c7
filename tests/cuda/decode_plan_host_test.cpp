// The host side of the CUDA decode (src/cuda/decode_plan.cpp): a cache's plan packed into writes (block
// address and row of each new K/V row) and attention units (the addresses of the blocks each reads). Plain
// C++ over a host-slab KvCache, so these run without a GPU (the kernels are tested in decode_test.cpp).
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda/decode_plan.cuh"
#include "ksa/cache.hpp"

namespace ksa {
namespace {

using cuda::detail::BlockAddresses;
using cuda::detail::DecUnit;
using cuda::detail::PackedDecode;

// The address of the block holding text row x / summary row x of a sequence, and the row in it, by the
// cache's own lookups (SeqKvView, KvPoolView).
const void* cache_block(const DecodeSeq& sq, const KvPoolView& pv, int64_t S, bool summary, int64_t x, int64_t& r) {
  const KvRowRef ref = summary ? sq.kv.summary_row(pv, S, x) : sq.kv.text_row(pv, x);
  r = ref.row;
  return pv.block(ref.block);
}

// pk against plan: one write per new row (all kept), at the cache's block and row; every unit's cache rows
// (below new_begin) in the blocks its list names, in order from blk0; units cover the token's key ranges.
void check_packed(const DecodePlan& plan, const KvCacheConfig& cfg, const PackedDecode& pk) {
  const KvPoolView& pv = plan.pool;
  const int64_t S = plan.geo.S, P = cfg.block_rows;
  size_t w = 0;
  int64_t keys = 0;
  for (size_t b = 0; b < plan.seqs.size(); ++b) {
    const DecodeSeq& sq = plan.seqs[b];
    for (int64_t i = 0; i < sq.n; ++i) {
      const DecodeKeys k = plan.geo.decode_keys(sq.kv.T + sq.kv.sums + i);
      ASSERT_LT(w, pk.writes.size());
      int64_t r = 0;
      const void* blk = cache_block(sq, pv, S, k.is_summary, k.row, r);
      EXPECT_EQ(pk.writes[w].blk, blk) << "write " << w;
      EXPECT_EQ(pk.writes[w].r, r) << "write " << w;
      EXPECT_EQ(pk.writes[w].src, sq.row0 + i);
      ++w;
      for (int j = 0; j < k.n; ++j) keys += k.range[j].end - k.range[j].begin;
    }
  }
  EXPECT_EQ(w, pk.writes.size());
  EXPECT_EQ(pk.total_keys, keys);
  int64_t unit_keys = 0;
  for (size_t u = 0; u < pk.units.size(); ++u) {
    const DecUnit& un = pk.units[u];
    const DecodeSeq& sq = plan.seqs[size_t(un.seq)];
    unit_keys += un.end - un.begin;
    for (int64_t x = un.begin; x < std::min(un.end, un.new_begin); ++x) {
      int64_t r = 0;
      const void* blk = cache_block(sq, pv, S, un.summary != 0, x, r);
      const int64_t y = un.summary && !un.stored ? x % S : x;  // storage row
      const int64_t i = y / P - un.blk0;
      ASSERT_GE(i, 0);
      ASSERT_LT(i, pk.unit_blocks_stride);
      EXPECT_EQ(pk.unit_blocks[u * size_t(pk.unit_blocks_stride) + size_t(i)], blk)
          << "unit " << u << " row " << x << (un.summary ? " (summary)" : " (text)");
      EXPECT_EQ(y % P, r);
    }
  }
  EXPECT_EQ(unit_keys, keys);
}

void expect_same(const PackedDecode& a, const PackedDecode& b) {
  ASSERT_EQ(a.units.size(), b.units.size());
  ASSERT_EQ(a.writes.size(), b.writes.size());
  ASSERT_EQ(a.toks.size(), b.toks.size());
  EXPECT_EQ(a.unit_blocks, b.unit_blocks);
  EXPECT_EQ(a.unit_blocks_stride, b.unit_blocks_stride);
  EXPECT_EQ(a.total_keys, b.total_keys);
  for (size_t i = 0; i < a.units.size(); ++i) {
    EXPECT_EQ(a.units[i].begin, b.units[i].begin);
    EXPECT_EQ(a.units[i].end, b.units[i].end);
    EXPECT_EQ(a.units[i].blk0, b.units[i].blk0);
  }
  for (size_t i = 0; i < a.writes.size(); ++i) {
    EXPECT_EQ(a.writes[i].blk, b.writes[i].blk);
    EXPECT_EQ(a.writes[i].r, b.writes[i].r);
  }
}

// Random batches over layers that store their summaries (small W), keep one chunk's (W·k covers the
// context) and blocks of 4 and 16 rows: every step's plan packed into one reused PackedDecode equals the
// cache's lookups and a freshly packed one; steps are committed so that rings wrap.
TEST(DecodePlanHost, PackedWritesAndUnitBlocksAreTheCacheRows) {
  std::mt19937_64 rng(5);
  struct Case {
    int64_t k, S, W, P, max_text;
  };
  for (const Case c : {Case{4, 2, 3, 4, 600}, Case{8, 1, 128, 16, 4000}, Case{4, 1, 200, 16, 700},
                       Case{8, 3, 2, 16, 900}}) {
    SCOPED_TRACE("k " + std::to_string(c.k) + " S " + std::to_string(c.S) + " W " + std::to_string(c.W) + " P " +
                 std::to_string(c.P));
    KvCacheConfig cfg;
    cfg.spec.chunk_size = c.k, cfg.spec.S = c.S, cfg.spec.W = c.W;
    cfg.Hkv = 2, cfg.D = 8, cfg.dtype = DType::bf16, cfg.max_text_tokens = c.max_text, cfg.block_rows = c.P;
    cfg.ring_slack_rows = 16;
    KvCache cache(cfg);
    std::vector<SeqId> ids;
    std::vector<uint16_t> src(size_t(Layout(c.k, c.S, c.max_text).length() * cfg.Hkv * cfg.D), 0);
    for (int s = 0; s < 5; ++s) {
      const SeqId id = cache.add_sequence();
      const int64_t T = std::uniform_int_distribution<int64_t>(0, c.max_text / 2)(rng);
      const int64_t L = Layout(c.k, c.S, T).length();
      const KvRows rows = KvRows::dense(src.data(), L, cfg.Hkv, cfg.D, DType::bf16);
      if (L > 0) cache.prefill(id, rows, rows);
      ids.push_back(id);
    }
    PackedDecode reused;
    BlockAddresses addr;
    const auto all = [](const DecodeKeys&) { return true; };
    for (int step = 0; step < 40; ++step) {
      std::vector<int64_t> n;
      for (size_t s = 0; s < ids.size(); ++s) n.push_back(std::uniform_int_distribution<int64_t>(1, 3)(rng));
      const DecodePlan plan = cache.plan_decode(ids, n);
      const int64_t split = std::uniform_int_distribution<int64_t>(0, 3)(rng) * 32;  // 0: the plan's choice
      cuda::detail::pack_decode(plan, cfg, plan.pool, addr, false, all, split, 7, reused);
      check_packed(plan, cfg, reused);
      PackedDecode fresh;
      BlockAddresses fresh_addr;
      cuda::detail::pack_decode(plan, cfg, plan.pool, fresh_addr, false, all, split, 7, fresh);
      expect_same(reused, fresh);
      cache.commit_decode(plan);
      if (HasFatalFailure()) return;
    }
  }
}

}  // namespace
}  // namespace ksa
