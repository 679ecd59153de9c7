// Host side of a CUDA decode step (decode_plan.cuh): the cache's plan packed into the work of the decode
// kernels (attention_decode.cu), and the blob that carries it to the device. KvCacheGpu (kv_cache_gpu.cu)
// keeps the bookkeeping, the buffers and the upload.
#include <algorithm>
#include <cstring>

#include "cuda/decode_plan.cuh"
#include "ksa/error.hpp"

namespace ksa::cuda::detail {
namespace {
size_t align16(size_t x) { return (x + 15) & ~size_t(15); }
}  // namespace

void pack_decode(const DecodePlan& p, const KvCacheConfig& cfg, const KvPoolView& pv, BlockAddresses& addr,
                 bool write_only, const std::function<bool(const DecodeKeys&)>& keep, int64_t split_rows,
                 int64_t per_wave, PackedDecode& pk) {
  const StreamGeometry geo = p.geo;
  const int64_t S = geo.S, P = cfg.block_rows;
  const bool stored = cfg.stores_summaries();
  pk.toks.clear(), pk.units.clear(), pk.writes.clear(), pk.unit_blocks.clear();
  pk.ranges.clear(), pk.unit_ids.clear(), pk.unit_nblk.clear();
  pk.total_keys = 0;
  std::vector<DecTok>& toks = pk.toks;
  std::vector<DecUnit>& units = pk.units;
  std::vector<PackedDecode::Range>& ranges = pk.ranges;
  // The block (id) and row in it of text row x or summary row x of sequence b.
  auto cache_row = [&](size_t b, bool summary, int64_t x, int64_t& r) {
    const SeqKvView& kv = p.seqs[b].kv;
    const int64_t y = summary && !stored ? x % S : x, blk = y / P;
    r = y - blk * P;
    const int32_t id = summary ? kv.summary_blocks[blk] : kv.text_blocks[blk % kv.text_slots];
    if (id < 0) fail("cuda decode: internal error: ", summary ? "summary" : "text", " row ", x, " has no block");
    return id;
  };
  for (size_t b = 0; b < p.seqs.size(); ++b) {
    const DecodeSeq& sq = p.seqs[b];
    const int64_t pos0 = sq.kv.T + sq.kv.sums;
    for (int64_t i = 0; i < sq.n; ++i) {
      const DecodeKeys keys = geo.decode_keys(pos0 + i);
      const int32_t src = int32_t(sq.row0 + i);
      if (keep(keys)) {
        int64_t r = 0;
        const int32_t id = cache_row(b, keys.is_summary, keys.row, r);
        pk.writes.push_back(DecWrite{src, int32_t(r), static_cast<const uint16_t*>(addr.get(pv, id))});
      }
      if (write_only) continue;
      const int32_t t = int32_t(toks.size());
      toks.push_back(DecTok{src, 0, 0, 0});
      for (int r = 0; r < keys.n; ++r) {
        // Rows of this step (text rows from T, summary rows from sums at the step's start) come from the
        // step's k/v: packed row row0 + (stream position - pos0).
        const bool sum = keys.range[r].summary;
        ranges.push_back(PackedDecode::Range{t, int32_t(b), sum ? 1 : 0, int32_t(keys.range[r].begin),
                                             int32_t(keys.range[r].end), int32_t(sum ? sq.kv.sums : sq.kv.T),
                                             int32_t(sq.row0 - pos0)});
        pk.total_keys += keys.range[r].end - keys.range[r].begin;
      }
    }
  }
  const int64_t total_keys = pk.total_keys;
  // Split: units of whole attend tiles, sized so that the units of all KV heads fill whole waves of the
  // device (CTAs resident at once = SMs x attend CTAs per SM), at most ~2048 keys per unit and at least two
  // tiles: a unit's fixed costs (its descriptor and block-table loads, the warps' join, a partial per head
  // that the merge reads) outweigh the CTA slot a one-tile unit fills (H200, B=1, T=16K: 24 units of 128
  // keys 16.74 us against 47 of 64 keys 17.57 us, one run each).
  int64_t split = split_rows;
  if (split <= 0 && !write_only) {
    const int64_t tile = attend_tile_keys();
    const int64_t waves = std::max<int64_t>(1, (total_keys + per_wave * 2048 - 1) / (per_wave * 2048));
    split = (total_keys + per_wave * waves - 1) / (per_wave * waves);
    split = std::max<int64_t>(2 * tile, (split + tile - 1) / tile * tile);
  }
  if (split <= 0) split = 2048;
  // A unit's block list must fit the attend kernel's (kMaxUnitBlocks, decode_plan.cuh; only tiny blocks bind).
  split = std::min<int64_t>(split, std::max<int64_t>(attend_tile_keys(), (kMaxUnitBlocks - 1) * P));
  std::vector<int32_t>& unit_ids = pk.unit_ids;
  std::vector<int32_t>& unit_nblk = pk.unit_nblk;
  for (const PackedDecode::Range& r : ranges) {
    DecTok& t = toks[size_t(r.tok)];
    if (t.units == 0) t.unit0 = int32_t(units.size());
    for (int64_t b = r.begin; b < r.end; b += split) {
      DecUnit u;
      u.tok = r.tok, u.seq = r.seq, u.summary = r.summary, u.begin = int32_t(b);
      u.end = int32_t(std::min<int64_t>(r.end, b + split));
      u.qrow = t.row;
      u.stored = stored ? 1 : 0;
      u.new_begin = r.new_begin;
      u.src_off = r.src_off;
      // The blocks of the cache rows it reads, [begin, min(end, new_begin)), by storage row.
      const int64_t rend = std::min<int64_t>(u.end, u.new_begin);
      const SeqKvView& kv = p.seqs[size_t(r.seq)].kv;
      auto storage_row = [&](int64_t x) { return r.summary && !stored ? x % S : x; };
      int32_t nb = 0;
      if (rend > u.begin) {
        const int64_t y0 = storage_row(u.begin), y1 = storage_row(rend - 1);
        if (y1 - y0 != rend - 1 - u.begin)  // one chunk's summaries when they are not stored (KvCache)
          fail("cuda decode: internal error: a unit's cache rows are not contiguous (rows ", u.begin, "..", rend, ")");
        u.blk0 = int32_t(y0 / P);
        nb = int32_t(y1 / P - y0 / P + 1);
        for (int64_t b = y0 / P; b <= y1 / P; ++b)
          unit_ids.push_back(r.summary ? kv.summary_blocks[b] : kv.text_blocks[b % kv.text_slots]);
      }
      unit_nblk.push_back(nb);
      units.push_back(u);
      ++t.units;
    }
  }
  // Each unit's block ids resolved to device addresses.
  const int32_t ub_stride = pk.unit_blocks_stride =
      unit_nblk.empty() ? 1 : std::max(1, *std::max_element(unit_nblk.begin(), unit_nblk.end()));
  if (ub_stride > kMaxUnitBlocks) fail("cuda decode: internal error: a unit reads ", ub_stride, " blocks");
  std::vector<const void*>& uaddr = pk.unit_blocks;
  uaddr.assign(units.size() * size_t(ub_stride), nullptr);
  for (size_t u = 0, j = 0; u < units.size(); ++u)
    for (int32_t i = 0; i < unit_nblk[u]; ++i, ++j)
      uaddr[u * size_t(ub_stride) + size_t(i)] = unit_ids[j] < 0 ? nullptr : addr.get(pv, unit_ids[j]);
}

size_t decode_blob(const PackedDecode& pk, DecodeRun& run, char* dev, char* host) {
  size_t off = 0;
  auto section = [&](size_t bytes) {
    const size_t o = off;
    off = align16(off + bytes);
    return o;
  };
  const size_t o_run = section(sizeof(DecodeRun)), o_toks = section(pk.toks.size() * sizeof(DecTok)),
               o_units = section(pk.units.size() * sizeof(DecUnit)),
               o_writes = section(pk.writes.size() * sizeof(DecWrite)),
               o_ublocks = section(pk.unit_blocks.size() * sizeof(void*));
  if (!dev) return off;
  run.unit_blocks = reinterpret_cast<const uint16_t* const*>(dev + o_ublocks);
  run.unit_blocks_stride = pk.unit_blocks_stride;
  run.toks = reinterpret_cast<const DecTok*>(dev + o_toks);
  run.units = reinterpret_cast<const DecUnit*>(dev + o_units);
  run.writes = reinterpret_cast<const DecWrite*>(dev + o_writes);
  run.n_writes = int32_t(pk.writes.size());
  run.n_toks = int32_t(pk.toks.size());
  run.n_units = int32_t(pk.units.size());
  if (host) {
    std::memcpy(host + o_run, &run, sizeof(DecodeRun));
    std::memcpy(host + o_toks, pk.toks.data(), pk.toks.size() * sizeof(DecTok));
    std::memcpy(host + o_units, pk.units.data(), pk.units.size() * sizeof(DecUnit));
    std::memcpy(host + o_writes, pk.writes.data(), pk.writes.size() * sizeof(DecWrite));
    std::memcpy(host + o_ublocks, pk.unit_blocks.data(), pk.unit_blocks.size() * sizeof(void*));
  }
  return off;
}

}  // namespace ksa::cuda::detail
