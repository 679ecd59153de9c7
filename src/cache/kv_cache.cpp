// The compressed KV cache (include/ksa/cache.hpp): a block pool, per-sequence text rings and summary tables,
// and the plan / commit bookkeeping of decode steps. Every public operation validates all of its input
// before it changes anything, so an error never leaves a sequence half-updated.
#include "ksa/cache.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <utility>

#include "ksa/error.hpp"

namespace ksa {
namespace {

constexpr int kTextTable = 0, kSummaryTable = 1;
constexpr int64_t kMaxContext = (int64_t(1) << 31) - 1;

// Slabs in host memory, all-ones bytes: a kernel that read a row never written would show NaN.
struct HostSlabs final : SlabAllocator {
  void* allocate(int64_t bytes) override {
    const size_t words = size_t((bytes + 7) / 8);
    uint64_t* p = new uint64_t[words];
    std::memset(p, 0xff, words * 8);
    return p;
  }
  void deallocate(void* p, int64_t) noexcept override { delete[] static_cast<uint64_t*>(p); }
  bool host_accessible() const override { return true; }
};

// Fixed-size blocks carved from slabs that are never moved or freed before the pool dies, so block
// addresses are stable and growing the pool copies nothing.
class BlockPool {
 public:
  BlockPool(int64_t block_bytes, int64_t max_blocks, std::shared_ptr<SlabAllocator> alloc)
      : block_bytes_(block_bytes), max_blocks_(max_blocks), alloc_(std::move(alloc)) {
    // About 1 MiB per slab, at least one block.
    slab_blocks_ = std::clamp<int64_t>((int64_t(1) << 20) / block_bytes, 1, 4096);
  }
  ~BlockPool() {
    for (void* p : slab_ptrs_) alloc_->deallocate(p, slab_blocks_ * block_bytes_);
  }
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;
  bool host_accessible() const { return alloc_->host_accessible(); }
  int64_t slab_blocks() const { return slab_blocks_; }
  int64_t created() const { return created_; }
  int64_t in_use() const { return created_ - int64_t(free_.size()); }
  // Blocks that take() can still hand out.
  int64_t available() const {
    if (max_blocks_ == 0) return std::numeric_limits<int64_t>::max();
    return max_blocks_ - in_use();
  }
  int32_t take() {
    if (free_.empty()) grow();
    const int32_t b = free_.back();
    free_.pop_back();
    return b;
  }
  void give(int32_t b) { free_.push_back(b); }
  void* const* slabs() const { return slab_ptrs_.data(); }

 private:
  void grow() {
    int64_t n = slab_blocks_;
    if (max_blocks_ > 0) n = std::min(n, max_blocks_ - created_);
    if (n <= 0 || created_ + n > std::numeric_limits<int32_t>::max())
      fail("KvCache: the block pool is full (", created_, " blocks of ", block_bytes_, " bytes)");
    // Whole slabs keep block id -> address arithmetic simple; a partial last slab just has fewer ids.
    slab_ptrs_.reserve(slab_ptrs_.size() + 1);  // push_back below cannot throw after allocate
    slab_ptrs_.push_back(alloc_->allocate(slab_blocks_ * block_bytes_));
    const int64_t first = int64_t(slab_ptrs_.size() - 1) * slab_blocks_;
    for (int64_t i = n - 1; i >= 0; --i) free_.push_back(int32_t(first + i));  // low ids first
    created_ += n;
  }

  int64_t block_bytes_, max_blocks_, slab_blocks_ = 1, created_ = 0;
  std::shared_ptr<SlabAllocator> alloc_;
  std::vector<void*> slab_ptrs_;
  std::vector<int32_t> free_;
};

struct Sequence {
  int64_t T = 0, sums = 0;  // text and summary tokens so far
  StreamCounts counts() const { return StreamCounts{T, sums}; }
  int64_t text_lo = 0;                  // text rows below this were released (or never stored)
  std::vector<int32_t> text_blocks;     // ring [text_slots], -1 = no block
  std::vector<int32_t> summary_blocks;  // append-only
  int64_t blocks = 0;
};

void check_rows(const KvCacheConfig& c, const KvRows& r, const char* name) {
  if (r.H != c.Hkv) fail("KvCache: ", name, " has ", r.H, " KV heads, the cache has Hkv=", c.Hkv);
  if (r.D != c.D) fail("KvCache: ", name, " has head dim ", r.D, ", the cache has D=", c.D);
  if (r.dtype != c.dtype)
    fail("KvCache: ", name, " is ", dtype_name(r.dtype), ", the cache stores ", dtype_name(c.dtype));
  if (r.n < 0) fail("KvCache: ", name, ".n must be >= 0 (got ", r.n, ")");
  if (r.n == 0) return;
  if (!r.data) fail("KvCache: ", name, ": data pointer is null");
  if (r.H > 1 && r.head_stride < r.D)
    fail("KvCache: ", name, ".head_stride must be >= D=", r.D, " (got ", r.head_stride, ")");
  if (r.n > 1 && r.row_stride < (r.H - 1) * r.head_stride + r.D)
    fail("KvCache: ", name, ".row_stride must be >= (H-1)*head_stride + D = ", (r.H - 1) * r.head_stride + r.D,
         " (got ", r.row_stride, ")");
}

}  // namespace

void KvCacheConfig::validate() const {
  spec.validate();
  if (spec.summarize_tail)
    fail("KvCache: spec.summarize_tail must be off: a decoder summarises a chunk when its k-th token arrives");
  require(Hkv >= 1 && Hkv <= 4096, "KvCache: Hkv", "in [1, 4096]", Hkv);
  require(D >= 1 && D <= 1024, "KvCache: D", "in [1, 1024]", D);
  if (dtype != DType::f32 && dtype != DType::bf16)
    fail("KvCache: dtype must be f32 or bf16 (got ", dtype_name(dtype), ")");
  require(max_text_tokens >= 1 && max_text_tokens <= kMaxContext, "KvCache: max_text_tokens", "in [1, 2^31-1]",
          max_text_tokens);
  require(block_rows >= 1 && block_rows <= 65536, "KvCache: block_rows", "in [1, 65536]", block_rows);
  require(ring_slack_rows >= 0 && ring_slack_rows <= kMaxContext, "KvCache: ring_slack_rows", "in [0, 2^31-1]",
          ring_slack_rows);
  require(max_blocks >= 0 && max_blocks <= std::numeric_limits<int32_t>::max(), "KvCache: max_blocks",
          "in [0, 2^31-1] (0 = unlimited)", max_blocks);
}

struct KvCache::Impl {
  KvCacheConfig cfg;
  StreamGeometry geo;
  int64_t S, P;   // geo.S, block_rows
  bool store;     // summaries kept for all chunks
  int64_t slots;  // text ring size in blocks
  int64_t block_bytes;
  BlockPool pool;
  std::unordered_map<SeqId, Sequence> seqs;
  SeqId next_id = 0;
  uint64_t open_plan = 0, next_ticket = 1;

  Impl(const KvCacheConfig& c, std::shared_ptr<SlabAllocator> alloc)
      : cfg(c),
        geo(c.geometry()),
        S(c.spec.S),
        P(c.block_rows),
        store(c.stores_summaries()),
        block_bytes(c.block_rows * c.row_bytes()),
        pool(block_bytes, c.max_blocks, std::move(alloc)) {
    // Text row t and row t - slots·P share a place. Text rows are written in order, and when row t is
    // written every later query sees only rows >= (t/k - W)·k > t - (W+1)·k, so slots·P >= (W+1)·k makes the
    // overwritten row dead (and no smaller ring does). Two logical blocks may then share a slot's block for
    // a while, each using the rows the other no longer needs. A sequence never has more than
    // ceil(max_text_tokens / P) blocks of text at all. ring_slack_rows (0 by default) only adds rows.
    const int64_t all = (c.max_text_tokens + P - 1) / P, ring = (geo.W + 1) * geo.chunk_size + c.ring_slack_rows;
    slots = ring >= c.max_text_tokens ? all : std::min(all, (ring + P - 1) / P);
  }

  const Sequence& find(SeqId id, const char* op) const {
    const auto it = seqs.find(id);
    if (it == seqs.end()) {
      if (id >= 0 && id < next_id) fail("KvCache::", op, ": sequence ", id, " was released");
      fail("KvCache::", op, ": unknown sequence id ", id, " (ids come from add_sequence)");
    }
    return it->second;
  }
  Sequence& find(SeqId id, const char* op) { return const_cast<Sequence&>(std::as_const(*this).find(id, op)); }

  void check_idle(const char* op) const {
    if (open_plan) fail("KvCache::", op, ": a decode step is planned but not committed or cancelled");
  }

  int64_t pending(const Sequence& s) const { return geo.pending_summaries(s.counts()); }

  // Storage rows of the summary table needed after writing summary rows [s0, s1).
  int64_t summary_rows_needed(int64_t s0, int64_t s1) const {
    if (s1 <= s0) return 0;
    return store ? s1 : S;
  }

  // Calls f(slot) once for every ring slot holding text rows [a, b).
  template <class F>
  void for_text_slots(int64_t a, int64_t b, F&& f) const {
    if (a >= b) return;
    int64_t b0 = a / P;
    const int64_t b1 = (b - 1) / P;
    if (b1 - b0 + 1 > slots) b0 = b1 - slots + 1;
    for (int64_t x = b0; x <= b1; ++x) f(x % slots);
  }

  int64_t blocks_needed(const Sequence& s, int64_t ta, int64_t tb, int64_t sum_rows) const {
    int64_t n = 0;
    for_text_slots(ta, tb, [&](int64_t slot) { n += s.text_blocks[size_t(slot)] < 0 ? 1 : 0; });
    n += std::max<int64_t>(0, (sum_rows + P - 1) / P - int64_t(s.summary_blocks.size()));
    return n;
  }

  // Takes the blocks for text rows [ta, tb) and summary storage rows [0, sum_rows); records them in `taken`.
  void take_blocks(Sequence& s, int64_t seq_index, int64_t ta, int64_t tb, int64_t sum_rows,
                   std::vector<DecodePlan::Taken>* taken) {
    for_text_slots(ta, tb, [&](int64_t slot) {
      int32_t& b = s.text_blocks[size_t(slot)];
      if (b >= 0) return;
      b = pool.take();
      ++s.blocks;
      if (taken) taken->push_back({seq_index, kTextTable, slot});
    });
    while (int64_t(s.summary_blocks.size()) * P < sum_rows) {
      s.summary_blocks.push_back(pool.take());
      ++s.blocks;
      if (taken) taken->push_back({seq_index, kSummaryTable, int64_t(s.summary_blocks.size()) - 1});
    }
  }

  // Moves the sequence to (T, sums) and returns the text blocks no later token can see.
  void advance(Sequence& s, int64_t T, int64_t sums) {
    s.T = T;
    s.sums = sums;
    const int64_t lo = geo.live_text_begin(StreamCounts{T, sums});
    // Live text blocks [new_b, end_b); none when no text row is live (W = 0 at a chunk boundary).
    const int64_t end_b = (T + P - 1) / P, old_b = s.text_lo / P, new_b = lo < T ? lo / P : end_b;
    for (int64_t x = std::max(old_b, new_b - slots); x < new_b; ++x) {
      const int64_t slot = x % slots;
      int32_t& b = s.text_blocks[size_t(slot)];
      if (b < 0) continue;
      const int64_t owner = x + ((new_b - x + slots - 1) / slots) * slots;  // first block >= new_b in this slot
      if (owner < end_b) continue;
      pool.give(b);
      b = -1;
      --s.blocks;
    }
    s.text_lo = std::max(s.text_lo, lo);
  }

  SeqKvView view(const Sequence& s) const {
    SeqKvView v;
    v.text_blocks = s.text_blocks.data();
    v.text_slots = slots;
    v.summary_blocks = s.summary_blocks.data();
    v.summaries_stored = store;
    v.T = s.T;
    v.sums = s.sums;
    return v;
  }

  KvPoolView pool_view() const {
    KvPoolView p;
    p.slabs = pool.slabs();
    p.slab_blocks = pool.slab_blocks();
    p.block_rows = P;
    p.Hkv = cfg.Hkv;
    p.D = cfg.D;
    p.dtype = cfg.dtype;
    return p;
  }

  void check_context(SeqId id, int64_t T1) const {
    if (T1 > cfg.max_text_tokens)
      fail("KvCache: sequence ", id, " would hold ", T1,
           " text tokens, over the context limit max_text_tokens=", cfg.max_text_tokens);
  }

  // Appends stream rows to one sequence, copying only the rows a later token can still see.
  void write_stream(SeqId id, const KvRows& kr, const KvRows& vr, const char* op) {
    check_idle(op);
    Sequence& s = find(id, op);
    if (!pool.host_accessible())
      fail("KvCache::", op, ": the pool's slabs are not host memory (write through the device's decode path)");
    check_rows(cfg, kr, "k");
    check_rows(cfg, vr, "v");
    if (kr.n != vr.n) fail("KvCache::", op, ": k has ", kr.n, " rows but v has ", vr.n);
    const int64_t n = kr.n, p0 = s.T + s.sums;
    const StreamCounts end = geo.counts(p0 + n);
    check_context(id, end.T);
    if (n == 0) return;
    const int64_t lo = geo.live_text_begin(end);
    const int64_t ta = std::max(s.T, lo);
    // Without stored summaries only the newest chunk's summaries matter (and only while it owes some).
    const int64_t last_chunk = end.sums > 0 ? (end.sums - 1) / S : -1;
    const int64_t s_keep = store ? s.sums : std::max(s.sums, last_chunk * S);
    const int64_t need = blocks_needed(s, ta, end.T, summary_rows_needed(s_keep, end.sums));
    if (need > pool.available())
      fail("KvCache::", op, ": sequence ", id, " needs ", need, " more blocks, the pool has ", pool.available(),
           " left");
    take_blocks(s, -1, ta, end.T, summary_rows_needed(s_keep, end.sums), nullptr);

    const KvPoolView pv = pool_view();
    const SeqKvView sv = view(s);
    const int64_t es = dtype_size(cfg.dtype), bytes = cfg.D * es;
    auto copy = [&](int64_t i, KvRowRef ref) {
      for (int64_t h = 0; h < cfg.Hkv; ++h) {
        std::memcpy(pv.row(ref.block, 0, h, ref.row),
                    static_cast<const char*>(kr.data) + (i * kr.row_stride + h * kr.head_stride) * es, size_t(bytes));
        std::memcpy(pv.row(ref.block, 1, h, ref.row),
                    static_cast<const char*>(vr.data) + (i * vr.row_stride + h * vr.head_stride) * es, size_t(bytes));
      }
    };
    for (int64_t i = 0; i < n; ++i) {
      const StreamToken tok = geo.token(p0 + i);
      const int64_t r = geo.row_of(tok);
      if (!tok.is_summary) {
        if (r >= lo) copy(i, sv.text_row(pv, r));
      } else if (r >= s_keep) {
        copy(i, sv.summary_row(pv, S, r));
      }
    }
    advance(s, end.T, end.sums);
  }
};

KvCache::KvCache(const KvCacheConfig& cfg) : KvCache(cfg, nullptr) {}
KvCache::KvCache(const KvCacheConfig& cfg, std::shared_ptr<SlabAllocator> slabs) {
  cfg.validate();
  impl_ = std::make_unique<Impl>(cfg, slabs ? std::move(slabs) : std::make_shared<HostSlabs>());
}
KvCache::~KvCache() = default;
KvCache::KvCache(KvCache&&) noexcept = default;
KvCache& KvCache::operator=(KvCache&&) noexcept = default;

const KvCacheConfig& KvCache::config() const { return impl_->cfg; }

SeqId KvCache::add_sequence() {
  Impl& m = *impl_;
  m.check_idle("add_sequence");
  const SeqId id = m.next_id++;
  Sequence& s = m.seqs[id];
  s.text_blocks.assign(size_t(m.slots), -1);
  // The whole table up front (int32 per block), so that its address never changes while it grows.
  const int64_t max_rows = m.store ? (m.cfg.max_text_tokens / m.geo.chunk_size) * m.S : m.S;
  s.summary_blocks.reserve(size_t((max_rows + m.P - 1) / m.P));
  return id;
}

void KvCache::release(SeqId id) {
  Impl& m = *impl_;
  m.check_idle("release");
  Sequence& s = m.find(id, "release");
  for (int32_t b : s.text_blocks)
    if (b >= 0) m.pool.give(b);
  for (int32_t b : s.summary_blocks) m.pool.give(b);
  m.seqs.erase(id);
}

bool KvCache::contains(SeqId id) const { return impl_->seqs.count(id) > 0; }
int64_t KvCache::num_sequences() const { return int64_t(impl_->seqs.size()); }

SeqState KvCache::state(SeqId id) const {
  const Sequence& s = impl_->find(id, "state");
  SeqState st;
  st.text_tokens = s.T;
  st.summary_tokens = s.sums;
  st.pending_summaries = impl_->pending(s);
  st.blocks = s.blocks;
  st.bytes = s.blocks * impl_->block_bytes;
  return st;
}

void KvCache::prefill(SeqId id, const KvRows& k, const KvRows& v) { impl_->write_stream(id, k, v, "prefill"); }

void KvCache::append_text(SeqId id, const KvRows& k, const KvRows& v) {
  Impl& m = *impl_;
  m.check_idle("append_text");
  const Sequence& s = m.find(id, "append_text");
  if (k.n != 1) fail("KvCache::append_text: takes one text token (got k with ", k.n, " rows)");
  if (const int64_t due = m.pending(s); due > 0)
    fail("KvCache::append_text: sequence ", id, " owes ", due, " summary token(s) of chunk ",
         s.T / m.geo.chunk_size - 1, " first (append_summaries)");
  m.write_stream(id, k, v, "append_text");
}

void KvCache::append_summaries(SeqId id, const KvRows& k, const KvRows& v) {
  Impl& m = *impl_;
  m.check_idle("append_summaries");
  const Sequence& s = m.find(id, "append_summaries");
  const int64_t due = m.pending(s);
  if (k.n < 1 || k.n > due)
    fail("KvCache::append_summaries: sequence ", id, " owes ", due, " summary token(s) (got k with ", k.n, " rows)");
  m.write_stream(id, k, v, "append_summaries");
}

DecodePlan KvCache::plan_decode(std::span<const SeqId> ids, std::span<const int64_t> n_new) {
  Impl& m = *impl_;
  m.check_idle("plan_decode");
  if (ids.size() != n_new.size())
    fail("KvCache::plan_decode: ", ids.size(), " sequence ids but ", n_new.size(), " token counts");
  // Validate everything and count blocks before taking any.
  std::vector<Sequence*> ss(ids.size());
  int64_t need = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    ss[i] = &m.find(ids[i], "plan_decode");
    for (size_t j = 0; j < i; ++j)
      if (ids[j] == ids[i]) fail("KvCache::plan_decode: sequence ", ids[i], " appears twice in the batch");
    if (n_new[i] < 0)
      fail("KvCache::plan_decode: token count for sequence ", ids[i], " must be >= 0 (got ", n_new[i], ")");
    const Sequence& s = *ss[i];
    const StreamCounts end = m.geo.counts(s.T + s.sums + n_new[i]);
    m.check_context(ids[i], end.T);
    need += m.blocks_needed(s, s.T, end.T, m.summary_rows_needed(s.sums, end.sums));
  }
  if (need > m.pool.available())
    fail("KvCache::plan_decode: the batch needs ", need, " more blocks, the pool has ", m.pool.available(), " left");

  DecodePlan plan;
  plan.geo = m.geo;
  plan.ids.assign(ids.begin(), ids.end());
  plan.seqs.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    Sequence& s = *ss[i];
    const StreamCounts end = m.geo.counts(s.T + s.sums + n_new[i]);
    m.take_blocks(s, int64_t(i), s.T, end.T, m.summary_rows_needed(s.sums, end.sums), &plan.taken);
    plan.seqs[i].n = n_new[i];
    plan.seqs[i].row0 = plan.rows;
    plan.rows += n_new[i];
  }
  // Views after all blocks are taken (the pool's slab table may have grown).
  plan.pool = m.pool_view();
  for (size_t i = 0; i < ids.size(); ++i) plan.seqs[i].kv = m.view(*ss[i]);
  plan.ticket = m.next_ticket++;
  m.open_plan = plan.ticket;
  return plan;
}

void KvCache::commit_decode(const DecodePlan& plan) {
  Impl& m = *impl_;
  if (!m.open_plan || plan.ticket != m.open_plan) fail("KvCache::commit_decode: not the open plan of this cache");
  for (size_t i = 0; i < plan.ids.size(); ++i) {
    Sequence& s = m.find(plan.ids[i], "commit_decode");
    const StreamCounts end = m.geo.counts(s.T + s.sums + plan.seqs[i].n);
    m.advance(s, end.T, end.sums);
  }
  m.open_plan = 0;
}

void KvCache::cancel_decode(const DecodePlan& plan) {
  Impl& m = *impl_;
  if (!m.open_plan || plan.ticket != m.open_plan) fail("KvCache::cancel_decode: not the open plan of this cache");
  for (auto it = plan.taken.rbegin(); it != plan.taken.rend(); ++it) {
    Sequence& s = m.find(plan.ids[size_t(it->seq)], "cancel_decode");
    if (it->table == kTextTable) {
      m.pool.give(s.text_blocks[size_t(it->slot)]);
      s.text_blocks[size_t(it->slot)] = -1;
    } else {
      m.pool.give(s.summary_blocks.back());
      s.summary_blocks.pop_back();
    }
    --s.blocks;
  }
  m.open_plan = 0;
}

int64_t KvCache::block_bytes() const { return impl_->block_bytes; }
int64_t KvCache::text_ring_rows() const { return impl_->slots * impl_->P; }
int64_t KvCache::bytes_in_use() const { return impl_->pool.in_use() * impl_->block_bytes; }
int64_t KvCache::bytes_in_use(SeqId id) const { return impl_->find(id, "bytes_in_use").blocks * impl_->block_bytes; }
int64_t KvCache::bytes_reserved() const { return impl_->pool.created() * impl_->block_bytes; }
KvPoolView KvCache::pool_view() const { return impl_->pool_view(); }
SeqKvView KvCache::view(SeqId id) const { return impl_->view(impl_->find(id, "view")); }

}  // namespace ksa
