// KvCache bookkeeping: the bytes a sequence holds follow docs/ksa.md: The compressed cache (compared with the core's
// cache_rows), and bad input (unknown or released ids, wrong shapes or dtypes, context limit, a full pool) is refused
// with a clear error that changes nothing: the other sequences decode on and still match the oracle.
#include <gtest/gtest.h>

#include "cache_cases.hpp"

namespace ksa {
namespace {

using test::Driver;
using test::SeqData;

KvCacheConfig make_config(int64_t k, int64_t S, int64_t W, int64_t Hkv, int64_t D, DType dt, int64_t max_text,
                          int64_t P) {
  KvCacheConfig c;
  c.spec.chunk_size = k;
  c.spec.S = S;
  c.spec.W = W;
  c.Hkv = Hkv;
  c.D = D;
  c.dtype = dt;
  c.max_text_tokens = max_text;
  c.block_rows = P;
  return c;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks the blocks a sequence holds. Without summaries due, exactly: the blocks over its live text rows
// [T - cache_rows.text, T) (shared ring slots counted once) plus the blocks over its stored summary rows.
// Always: bytes between the rows of cache_rows and those plus a constant of page rounding (two partial
// text blocks, one partial summary block, S rows when summaries are not stored) and, while a chunk's
// summaries are due, that chunk's k text rows (its summary tokens still read them).
void check_memory(const KvCache& cache, SeqId id, const std::string& where) {
  SCOPED_TRACE(where);
  const KvCacheConfig& cfg = cache.config();
  const SeqState st = cache.state(id);
  const int64_t P = cfg.block_rows, T = st.text_tokens, row = cfg.row_bytes();
  const bool store = cfg.stores_summaries();
  const CacheRows rows = cache_rows(cfg.spec, T, store);
  ASSERT_EQ(st.bytes, st.blocks * cache.block_bytes());
  ASSERT_EQ(cache.block_bytes(), P * row);
  ASSERT_EQ(cache.bytes_in_use(id), st.bytes);
  if (st.pending_summaries == 0) {
    const int64_t lo = T - rows.text;
    const int64_t text_blocks =
        T > lo ? std::min(cache.view(id).text_slots, ceil_div(T, P) - lo / P) : 0;  // ring slots shared
    const int64_t sum_blocks =
        store ? ceil_div(st.summary_tokens, P) : (st.summary_tokens > 0 ? ceil_div(cfg.spec.S, P) : 0);
    ASSERT_EQ(st.blocks, text_blocks + sum_blocks) << "T=" << T << " summaries=" << st.summary_tokens << " text blocks "
                                                   << text_blocks << " summary blocks " << sum_blocks;
    ASSERT_GE(st.bytes, rows.total() * row);
  }
  const int64_t slack = 3 * P + (store ? 0 : cfg.spec.S) + (st.pending_summaries > 0 ? cfg.spec.chunk_size : 0);
  ASSERT_LE(st.bytes, (rows.total() + slack) * row) << "T=" << T;
}

// Two sequences grow token by token (append_text, append_summaries) at different paces; after every call
// both hold what the formula says. Covers W = 0, W >= #chunks with and without stored summaries, blocks of
// 1, 5 and 16 rows, S = 1, 2, 3.
TEST(KvCacheMemory, HeldBytesFollowTheFormula) {
  struct Cfg {
    int64_t k, S, W, P, max_text;
  };
  for (const Cfg& g : {Cfg{8, 1, 4, 16, 700}, Cfg{3, 2, 0, 5, 400}, Cfg{4, 3, 2, 1, 300}, Cfg{5, 1, 200, 16, 600},
                       Cfg{5, 2, 200, 7, 1001}, Cfg{2, 1, 1, 3, 500}}) {
    const KvCacheConfig cfg = make_config(g.k, g.S, g.W, 2, 8, DType::bf16, g.max_text, g.P);
    const std::string name = "k=" + std::to_string(g.k) + " S=" + std::to_string(g.S) + " W=" + std::to_string(g.W) +
                             " P=" + std::to_string(g.P) + " max_text=" + std::to_string(g.max_text);
    SCOPED_TRACE(name);
    KvCache cache(cfg);
    std::mt19937_64 rng(uint64_t(g.k * 1000 + g.W));
    std::normal_distribution<float> nd;
    std::vector<uint16_t> kb(size_t(g.S * 2 * 8)), vb(kb.size());
    for (auto* b : {&kb, &vb})
      for (auto& x : *b) x = bf16::from_float(nd(rng));
    const SeqId a = cache.add_sequence(), b = cache.add_sequence();
    auto step = [&](SeqId id) {
      const SeqState st = cache.state(id);
      if (st.pending_summaries > 0) {
        const int64_t m = std::uniform_int_distribution<int64_t>(1, st.pending_summaries)(rng);
        cache.append_summaries(id, KvRows::dense(kb.data(), m, 2, 8, DType::bf16),
                               KvRows::dense(vb.data(), m, 2, 8, DType::bf16));
      } else if (st.text_tokens < g.max_text) {
        cache.append_text(id, KvRows::dense(kb.data(), 1, 2, 8, DType::bf16),
                          KvRows::dense(vb.data(), 1, 2, 8, DType::bf16));
      }
    };
    for (int64_t i = 0; i < g.max_text * 2; ++i) {
      step(a);
      if (i % 3 == 0) step(b);
      check_memory(cache, a, "sequence a");
      check_memory(cache, b, "sequence b");
      ASSERT_EQ(cache.bytes_in_use(), cache.bytes_in_use(a) + cache.bytes_in_use(b));
      if (HasFatalFailure()) return;
    }
    EXPECT_EQ(cache.state(a).text_tokens, g.max_text);
    cache.release(a);
    check_memory(cache, b, "after releasing a");
    EXPECT_EQ(cache.bytes_in_use(), cache.bytes_in_use(b));
    EXPECT_GE(cache.bytes_reserved(), cache.bytes_in_use());
  }
}

// The shapes of KSA-4B (8 KV heads, D = 128, bf16, k = 8, S = 1): a W = 128 layer at 32K and 128K tokens
// holds (W·k + T/k·S) rows, a constant factor below full attention, and prefill copies only those rows.
// The W = 16768 layer (W·k > 128K) keeps only text. The stream is fed in pieces (the cache never needs it
// whole), from one reused random buffer.
TEST(KvCacheMemory, Ksa4bShapes) {
  std::mt19937_64 rng(4);
  std::normal_distribution<float> nd;
  const int64_t piece = 4096;
  for (const auto& [W, Hkv, T] :
       {std::tuple<int64_t, int64_t, int64_t>{128, 8, 32768}, {128, 8, 131072}, {16768, 1, 32768}}) {
    const KvCacheConfig cfg = make_config(8, 1, W, Hkv, 128, DType::bf16, 131072, 16);
    SCOPED_TRACE("W=" + std::to_string(W) + " T=" + std::to_string(T));
    std::vector<uint16_t> kb(size_t(piece * Hkv * 128)), vb(kb.size());
    for (auto* b : {&kb, &vb})
      for (auto& x : *b) x = bf16::from_float(nd(rng));
    KvCache cache(cfg);
    const SeqId id = cache.add_sequence();
    const int64_t L = Layout::of(cfg.spec, T).length();
    for (int64_t p = 0; p < L; p += piece) {
      const int64_t n = std::min(piece, L - p);
      cache.prefill(id, KvRows::dense(kb.data(), n, Hkv, 128, DType::bf16),
                    KvRows::dense(vb.data(), n, Hkv, 128, DType::bf16));
    }
    check_memory(cache, id, "after prefill");
    const CacheRows rows = cache_rows(cfg.spec, T, cfg.stores_summaries());
    const int64_t full = T * cfg.row_bytes();
    if (W == 128) {
      EXPECT_EQ(rows.text, 1024);
      EXPECT_EQ(rows.summaries, T / 8);
      EXPECT_EQ(cache.bytes_in_use(), (1024 + T / 8) * cfg.row_bytes());  // both multiples of 16 rows
      EXPECT_LT(cache.bytes_in_use() * 5, full);
    } else {
      EXPECT_FALSE(cfg.stores_summaries());
      EXPECT_EQ(cache.bytes_in_use(), full + 16 * cfg.row_bytes());  // all text + one block for a chunk's summary
    }
    ::testing::Test::RecordProperty("bytes_W" + std::to_string(W) + "_T" + std::to_string(T),
                                    std::to_string(cache.bytes_in_use()));
  }
}

// --- Bad input ---------------------------------------------------------------------------------------------

// Every sequence's position and footprint, to show that a refused call changed nothing.
std::vector<SeqState> snapshot(const Driver& d) {
  std::vector<SeqState> s;
  for (SeqId id : d.ids)
    if (d.cache.contains(id)) s.push_back(d.cache.state(id));
  s.push_back(SeqState{d.cache.bytes_in_use(), 0, 0, 0, 0});
  return s;
}
bool same(const std::vector<SeqState>& a, const std::vector<SeqState>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].text_tokens != b[i].text_tokens || a[i].summary_tokens != b[i].summary_tokens ||
        a[i].blocks != b[i].blocks)
      return false;
  return true;
}

// Expects `f` to throw ksa::Error whose message contains `what`, and the cache to be unchanged.
template <class F>
void expect_refused(Driver& d, const std::string& what, F&& f) {
  const auto before = snapshot(d);
  try {
    f();
    ADD_FAILURE() << "expected an error containing '" << what << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << "expected '" << what << "' in: " << e.what();
  }
  EXPECT_TRUE(same(before, snapshot(d))) << "a refused call changed the cache (" << what << ")";
}

TEST(KvCacheErrors, ConfigIsValidated) {
  const KvCacheConfig good = make_config(8, 1, 4, 2, 16, DType::f32, 100, 16);
  auto refused = [](KvCacheConfig c, const std::string& what) {
    try {
      KvCache cache(c);
      ADD_FAILURE() << "expected an error containing '" << what << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << "message: " << e.what();
    }
  };
  KvCacheConfig c = good;
  c.spec.summarize_tail = true;
  refused(c, "summarize_tail");
  c = good;
  c.dtype = DType::f16;
  refused(c, "dtype must be f32 or bf16 (got f16)");
  c = good;
  c.D = 0;
  refused(c, "D: must be in [1, 1024] (got 0)");
  c = good;
  c.Hkv = 0;
  refused(c, "Hkv");
  c = good;
  c.max_text_tokens = 0;
  refused(c, "max_text_tokens");
  c = good;
  c.block_rows = 0;
  refused(c, "block_rows");
  c = good;
  c.spec.chunk_size = 0;
  refused(c, "chunk_size (summary_chunk_size)");
  c = good;
  c.max_blocks = -1;
  refused(c, "max_blocks");
  EXPECT_NO_THROW(KvCache{good});
}

// Three sequences decode; in between, every kind of bad call is refused without touching them; one of them
// is released half way. The survivors then decode to the end and match the oracle.
TEST(KvCacheErrors, BadCallsChangeNothing) {
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    const KvCacheConfig cfg = make_config(4, 2, 2, 2, 8, dt, 60, 4);
    std::mt19937_64 rng(77);
    std::vector<SeqData> seqs;
    for (int64_t T : {60, 41, 50}) seqs.emplace_back(cfg.spec, T, 4, 2, 8, dt, rng);
    Driver d(cfg);
    for (const SeqData& s : seqs) d.add(s);
    d.prefill(0, 20);
    d.prefill(1, 13);  // 2 chunks with their summaries and 1 text token of chunk 2
    d.prefill(2, 4);   // chunk 0's 4 text tokens: its 2 summaries are due
    d.step({0, 1, 2}, {3, 1, 1});
    ASSERT_FALSE(HasFailure());

    const SeqData& s0 = seqs[0];
    const KvRows k1 = s0.rows(s0.k, 0, 1), v1 = s0.rows(s0.v, 0, 1);
    const SeqId a = d.ids[0], b = d.ids[1], c = d.ids[2];  // a owes a summary token, b none, c one
    ASSERT_EQ(d.cache.state(a).pending_summaries, 1);
    ASSERT_EQ(d.cache.state(b).pending_summaries, 0);

    expect_refused(d, "unknown sequence id 42", [&] { d.cache.append_text(42, k1, v1); });
    expect_refused(d, "unknown sequence id -1", [&] { d.cache.prefill(-1, k1, v1); });
    expect_refused(d, "unknown sequence id 9", [&] { (void)d.cache.state(9); });
    {
      KvRows bad = k1;
      bad.H = 1;
      expect_refused(d, "k has 1 KV heads, the cache has Hkv=2", [&] { d.cache.append_text(b, bad, v1); });
      bad = v1;
      bad.D = 16;
      expect_refused(d, "v has head dim 16, the cache has D=8", [&] { d.cache.append_text(b, k1, bad); });
      bad = k1;
      bad.dtype = dt == DType::f32 ? DType::bf16 : DType::f32;
      expect_refused(d, std::string("the cache stores ") + dtype_name(dt), [&] { d.cache.prefill(a, bad, v1); });
      bad = k1;
      bad.data = nullptr;
      expect_refused(d, "data pointer is null", [&] { d.cache.prefill(a, bad, v1); });
      expect_refused(d, "k has 2 rows but v has 1", [&] { d.cache.prefill(a, s0.rows(s0.k, 0, 2), v1); });
      expect_refused(d, "takes one text token",
                     [&] { d.cache.append_text(b, s0.rows(s0.k, 0, 2), s0.rows(s0.v, 0, 2)); });
    }
    ASSERT_EQ(d.cache.state(c).pending_summaries, 1);
    expect_refused(d, "owes 1 summary token(s) of chunk 0 first", [&] { d.cache.append_text(c, k1, v1); });
    expect_refused(d, "owes 0 summary token(s)", [&] { d.cache.append_summaries(b, k1, v1); });
    expect_refused(d, "owes 1 summary token(s)",
                   [&] { d.cache.append_summaries(c, s0.rows(s0.k, 0, 2), s0.rows(s0.v, 0, 2)); });
    // Context limit (60 text tokens): a prefill or a decode step past it.
    expect_refused(d, "over the context limit max_text_tokens=60",
                   [&] { d.cache.prefill(a, s0.rows(s0.k, 0, 100), s0.rows(s0.v, 0, 100)); });
    {
      const SeqId ids[] = {b, a};
      const int64_t n[] = {1, 100};
      expect_refused(d, "sequence 0 would hold", [&] { (void)d.cache.plan_decode(ids, n); });
    }
    // Decode: batch errors, then tensor errors found after planning (the plan is cancelled).
    DecodeIO io;
    io.Hq = 4;
    io.dtype = dt;
    std::vector<uint8_t> buf(size_t(64 * 4 * 8 * 4), 0x3f);
    io.q = io.out = TensorView::dense(buf.data(), 1, 4, 8);
    io.k = io.v = TensorView::dense(buf.data(), 1, 2, 8);
    {
      const SeqId ids[] = {b, b};
      const int64_t n[] = {1, 1};
      expect_refused(d, "sequence 1 appears twice", [&] { cpu::attention_decode(d.cache, ids, n, io); });
      const SeqId one[] = {b};
      expect_refused(d, "1 sequence ids but 2 token counts", [&] { cpu::attention_decode(d.cache, one, n, io); });
      const int64_t n1[] = {1};
      const int64_t neg[] = {-1};
      expect_refused(d, "must be >= 0 (got -1)", [&] { cpu::attention_decode(d.cache, one, neg, io); });
      const SeqId with_unknown[] = {a, 1234, b};
      const int64_t n3[] = {1, 1, 1};
      expect_refused(d, "unknown sequence id 1234", [&] { cpu::attention_decode(d.cache, with_unknown, n3, io); });
      DecodeIO bad = io;
      bad.Hq = 3;
      expect_refused(d, "Hq must be a positive multiple of the cache's Hkv=2 (got 3)",
                     [&] { cpu::attention_decode(d.cache, one, n1, bad); });
      bad = io;
      bad.dtype = dt == DType::f32 ? DType::bf16 : DType::f32;
      expect_refused(d, "does not match the cache's storage dtype",
                     [&] { cpu::attention_decode(d.cache, one, n1, bad); });
      bad = io;
      bad.v.data = nullptr;
      expect_refused(d, "v: data pointer is null", [&] { cpu::attention_decode(d.cache, one, n1, bad); });
      bad = io;
      bad.k.row_stride = 3;
      const int64_t two[] = {2};
      expect_refused(d, "k.row_stride must be >=", [&] { cpu::attention_decode(d.cache, one, two, bad); });
    }
    // A plan in flight blocks every other change until it is committed or cancelled.
    {
      const SeqId ids[] = {b};
      const int64_t n[] = {1};
      DecodePlan plan = d.cache.plan_decode(ids, n);
      expect_refused(d, "a decode step is planned", [&] { d.cache.append_text(a, k1, v1); });
      expect_refused(d, "a decode step is planned", [&] { d.cache.release(a); });
      expect_refused(d, "a decode step is planned", [&] { (void)d.cache.add_sequence(); });
      DecodePlan other = plan;
      other.ticket += 100;
      expect_refused(d, "not the open plan", [&] { d.cache.commit_decode(other); });
      d.cache.cancel_decode(plan);
      expect_refused(d, "not the open plan", [&] { d.cache.commit_decode(plan); });
    }
    // Release one sequence half way: its id is refused from then on.
    d.cache.release(b);
    expect_refused(d, "sequence 1 was released", [&] { d.cache.append_text(b, k1, v1); });
    expect_refused(d, "sequence 1 was released", [&] { d.cache.release(b); });
    expect_refused(d, "sequence 1 was released", [&] { (void)d.cache.bytes_in_use(b); });
    {
      const SeqId ids[] = {a, b};
      const int64_t n[] = {1, 1};
      expect_refused(d, "sequence 1 was released", [&] { cpu::attention_decode(d.cache, ids, n, io); });
    }
    // The survivors decode to the end in mixed steps and match the oracle.
    while (!d.done(0) || !d.done(2)) {
      std::vector<size_t> batch;
      std::vector<int64_t> n;
      for (size_t i : {size_t(2), size_t(0)})
        if (!d.done(i)) {
          batch.push_back(i);
          n.push_back(std::min<int64_t>(seqs[i].L - d.pos[i], i == 0 ? 1 : 4));
        }
      d.step(batch, n);
      ASSERT_FALSE(HasFailure());
      check_memory(d.cache, a, "sequence a");
      check_memory(d.cache, c, "sequence c");
    }
    EXPECT_EQ(d.checked, 3 + 1 + 1 + (seqs[0].L - 23) + (seqs[2].L - 5));
  }
}

// A pool of bounded capacity: a step that needs more blocks than are left is refused as a whole.
TEST(KvCacheErrors, FullPoolRefusesWholeStep) {
  KvCacheConfig cfg = make_config(2, 1, 1, 1, 4, DType::f32, 100, 2);  // ring of 2 blocks of 2 rows
  cfg.max_blocks = 7;
  std::mt19937_64 rng(5);
  std::vector<SeqData> seqs;
  for (int64_t T : {16, 16}) seqs.emplace_back(cfg.spec, T, 1, 1, 4, DType::f32, rng);
  Driver d(cfg);
  for (const SeqData& s : seqs) d.add(s);
  d.prefill(0, 12);  // T=8: text rows 6-7 (1 block), 4 summaries (2 blocks)
  d.prefill(1, 10);  // T=7: text rows 4-6 (2 blocks), 3 summaries (2 blocks)
  ASSERT_EQ(d.cache.bytes_in_use(), 7 * d.cache.block_bytes());
  {
    const SeqId ids[] = {d.ids[0], d.ids[1]};
    // Sequence 0's text row 8 needs the free ring slot; sequence 1 reaches 5 summaries: a third block.
    const int64_t n[] = {1, 5};
    DecodeIO io;
    expect_refused(d, "the batch needs 2 more blocks, the pool has 0 left",
                   [&] { cpu::attention_decode(d.cache, ids, n, io); });
    const SeqData& s = seqs[1];
    expect_refused(d, "needs 1 more blocks, the pool has 0 left",
                   [&] { d.cache.prefill(d.ids[1], s.rows(s.k, 10, 6), s.rows(s.v, 10, 6)); });
  }
  // Releasing one sequence makes room; the other decodes to the end within the 7 blocks.
  d.cache.release(d.ids[1]);
  while (!d.done(0)) {
    d.step({0}, {1});
    ASSERT_FALSE(HasFailure());
  }
  EXPECT_EQ(d.checked, seqs[0].L - 12);
  EXPECT_LE(d.cache.bytes_reserved(), 7 * d.cache.block_bytes());
}

}  // namespace
}  // namespace ksa
