// The GPU twin of tests/cache/decode_test.cpp: KvCacheGpu + ksa::cuda::attention_decode against the oracle
// (ksa::cpu::attention_reference on the whole stream). Random shapes (k, S, W, GQA 1..8, D 64/128, bf16,
// block sizes 1..64, forced small splits so tokens merge many partials), batches of sequences of mixed
// lengths, a prefix prefilled on the device, then decode one token at a time and in random pieces that cross
// chunk boundaries and wrap the ring; outputs poisoned with NaN. Skipped (with a message) without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "cache/cache_cases.hpp"
#include "gpu_test_util.hpp"
#include "ksa/cuda.hpp"
#include "ksa/cuda_cache.hpp"

namespace ksa {
namespace {

using test::SeqData;

cuda::KvCacheGpuOptions split_options(int64_t split_rows) {
  cuda::KvCacheGpuOptions o;
  o.split_rows = split_rows;
  return o;
}

// Tolerance: the CPU decode test's bound (cache_cases.hpp: bf16 out = one rounding, 2^-8·|ref|, plus the
// fp32 term 1e-5·(1 + max|v|)) with the fp32 term doubled: the GPU sums the same fp32 products in another
// order (8-element lane sums, a shuffle tree, lane-group and split partials merged by OnlineSoftmax), whose
// rounding bound is at most about twice the sequential one. lse likewise 2x. A wrong key set errs ~0.1.
double out_tol(double ref, double vmax) { return std::ldexp(std::abs(ref), -8) + 2e-5 * (1.0 + vmax); }
double lse_tol(double ref) { return 4e-5 * (1.0 + std::abs(ref)); }

using test::DevMem;

struct GpuCase {
  int64_t k = 8, S = 1, W = 1, Hkv = 1, G = 1, D = 64, P = 16, split = 0, extra_context = 0;
  std::vector<int64_t> T{20};
  bool strided = false;
  uint64_t seed = 1;
  std::string str() const {
    std::ostringstream os;
    os << "k=" << k << " S=" << S << " W=" << W << " heads=" << Hkv * G << "/" << Hkv << " D=" << D << " P=" << P
       << " split=" << split << " strided=" << strided << " T={";
    for (size_t i = 0; i < T.size(); ++i) os << (i ? "," : "") << T[i];
    os << "} extra=" << extra_context << " seed=" << seed;
    return os.str();
  }
  Spec spec() const {
    Spec s;
    s.chunk_size = k, s.S = S, s.W = W;
    return s;
  }
  KvCacheConfig config() const {
    KvCacheConfig c;
    c.spec = spec();
    c.Hkv = Hkv;
    c.D = D;
    c.dtype = DType::bf16;
    c.max_text_tokens = *std::max_element(T.begin(), T.end()) + extra_context;
    c.block_rows = P;
    c.ring_slack_rows = 2 * (k + S) + 1;  // every piece the test makes is a valid two-phase step
    return c;
  }
  int64_t max_piece() const { return config().stores_summaries() ? 2 * (k + S) + 1 : k; }
};

struct GpuDriver : test::DecodeTracker {
  cuda::KvCacheGpu cache;
  std::vector<std::unique_ptr<DevMem>> dk, dv;  // whole streams' k, v on the device (prefill source)
  bool strided = false;

  GpuDriver(const KvCacheConfig& cfg, int64_t split) : cache(cfg, nullptr, split_options(split)) {}

  void add(const SeqData& d) {
    data.push_back(&d);
    ids.push_back(cache.add_sequence());
    pos.push_back(0);
    dk.push_back(std::make_unique<DevMem>(d.k.size()));
    dv.push_back(std::make_unique<DevMem>(d.v.size()));
    ASSERT_EQ(cudaMemcpy(dk.back()->p, d.k.data(), d.k.size(), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dv.back()->p, d.v.data(), d.v.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  void prefill(size_t i, int64_t n) {
    const SeqData& d = *data[i];
    const int64_t row = d.Hkv * d.D;
    auto rows = [&](void* base) {
      return KvRows::dense(static_cast<uint16_t*>(base) + pos[i] * row, n, d.Hkv, d.D, DType::bf16);
    };
    cache.prefill(ids[i], rows(dk[i]->p), rows(dv[i]->p));
    pos[i] += n;
  }

  void step(const std::vector<size_t>& batch, const std::vector<int64_t>& n) {
    const SeqData& d0 = *data[batch.at(0)];
    const int64_t Hq = d0.Hq, Hkv = d0.Hkv, D = d0.D;
    int64_t R = 0;
    for (int64_t x : n) R += x;
    const int64_t hp = strided ? 8 : 0, rp = strided ? 24 : 0;
    struct Buf {
      std::vector<uint16_t> h;
      TensorView v;
    };
    auto make = [&](int64_t H) {
      Buf b;
      const int64_t hs = D + hp, rs = H * hs + rp;
      b.h.assign(size_t(std::max<int64_t>(R, 1) * rs), 0xffff);
      b.v = TensorView{nullptr, 0, rs, hs};
      return b;
    };
    Buf q = make(Hq), k = make(Hkv), v = make(Hkv), o = make(Hq);
    auto put = [&](Buf& t, int64_t r, const std::vector<uint8_t>& src, int64_t srow, int64_t H) {
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(&t.h[size_t(r * t.v.row_stride + h * t.v.head_stride)], src.data() + (srow * H + h) * D * 2,
                    size_t(D * 2));
    };
    const std::vector<SeqId> bid = gather_step(batch, n, [&](int64_t r, const SeqData& d, int64_t p) {
      put(q, r, d.q, p, Hq);
      put(k, r, d.k, p, Hkv);
      put(v, r, d.v, p, Hkv);
    });
    DevMem dq(q.h.size() * 2), dk_(k.h.size() * 2), dv_(v.h.size() * 2), dout(o.h.size() * 2),
        dlse(size_t(R * Hq) * 4 + 4);
    CK(cudaMemcpy(dq.p, q.h.data(), q.h.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dk_.p, k.h.data(), k.h.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv_.p, v.h.data(), v.h.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(dout.p, 0xff, o.h.size() * 2));  // NaN poison: an unwritten element fails
    CK(cudaMemset(dlse.p, 0xff, size_t(R * Hq) * 4 + 4));
    DecodeIO io;
    io.Hq = Hq;
    io.dtype = DType::bf16;
    io.q = q.v, io.k = k.v, io.v = v.v, io.out = o.v;
    io.q.data = dq.p, io.k.data = dk_.p, io.v.data = dv_.p, io.out.data = dout.p;
    io.lse = static_cast<float*>(dlse.p);
    for (size_t j = 0; j < batch.size(); ++j) {
      std::string why;
      ASSERT_TRUE(cache.step_ok(bid[j], n[j], &why)) << why;
    }
    cuda::attention_decode(cache, bid, n, io);
    CK(cudaDeviceSynchronize());
    std::vector<float> lse(size_t(R * Hq));
    CK(cudaMemcpy(o.h.data(), dout.p, o.h.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(lse.data(), dlse.p, lse.size() * 4, cudaMemcpyDeviceToHost));
    if (!check_step(
            batch, n, DType::bf16, o.h.data(), o.v, lse.data(),
            [](const SeqData& d, double ref) { return out_tol(ref, d.vmax); }, [](double ref) { return lse_tol(ref); }))
      return;
    if (strided) {
      EXPECT_EQ(o.h[size_t(D)], 0xffff) << "head padding of out was written";
    }
  }
};

void run_decode(const GpuCase& c, const std::vector<SeqData>& seqs, bool pieces, std::mt19937_64& rng,
                std::vector<int64_t> splits = {}) {
  SCOPED_TRACE(pieces ? "random-size pieces" : "one token at a time");
  GpuDriver drv(c.config(), c.split);
  drv.strided = c.strided;
  for (const SeqData& d : seqs) drv.add(d);
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (i >= splits.size()) splits.push_back(std::uniform_int_distribution<int64_t>(0, seqs[i].L - 1)(rng));
    // Prefill in two device writes (the second continues a sequence), then decode the rest.
    const int64_t a = std::uniform_int_distribution<int64_t>(0, splits[i])(rng);
    drv.prefill(i, a);
    drv.prefill(i, splits[i] - a);
  }
  if (!decode_to_end(drv, seqs, splits, pieces, c.max_piece(), rng)) return;
  std::printf("  %s, %s: %lld rows, worst err/tol out %.3f lse %.3f\n", c.str().c_str(), pieces ? "pieces" : "single",
              (long long)drv.checked, drv.worst_out, drv.worst_lse);
  for (SeqId id : drv.ids) drv.cache.release(id);
  EXPECT_EQ(drv.cache.host().bytes_in_use(), 0);
}

void run_case(const GpuCase& c, int64_t last_rows = -1) {
  SCOPED_TRACE(c.str());
  std::mt19937_64 rng(c.seed);
  std::vector<SeqData> seqs;
  seqs.reserve(c.T.size());
  for (int64_t T : c.T) seqs.emplace_back(c.spec(), T, c.Hkv * c.G, c.Hkv, c.D, DType::bf16, rng, last_rows);
  std::vector<int64_t> splits;
  if (last_rows >= 0)
    for (const SeqData& d : seqs) splits.push_back(std::max<int64_t>(0, d.L - last_rows));
  run_decode(c, seqs, true, rng, splits);
  if (::testing::Test::HasFailure()) return;
  run_decode(c, seqs, false, rng, splits);
}

GpuCase random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&](std::initializer_list<int64_t> xs) {
    return *(xs.begin() + std::uniform_int_distribution<size_t>(0, xs.size() - 1)(rng));
  };
  GpuCase c;
  c.seed = seed;
  c.k = pick({1, 2, 3, 4, 5, 8});
  c.S = pick({1, 1, 2, 3});
  c.W = pick({0, 1, 2, 3, 6, 1000});
  c.Hkv = pick({1, 2});
  c.G = pick({1, 2, 3, 4, 5, 6, 7, 8});
  c.D = pick({64, 128});
  c.P = pick({1, 2, 3, 4, 7, 16, 64});
  c.split = pick({0, 0, 1, 5, 16, 33});
  c.strided = pick({0, 1});
  const int64_t B = pick({1, 2, 3, 4});
  const int64_t tmax = c.k == 1 ? 60 : (c.k <= 3 ? 100 : 160);
  c.T.clear();
  for (int64_t b = 0; b < B; ++b) c.T.push_back(std::uniform_int_distribution<int64_t>(1, tmax)(rng));
  c.extra_context = pick({0, 0, 1, 17});
  return c;
}

TEST(CudaDecode, RandomShapesMatchOracle) {
  REQUIRE_GPU();
  std::printf("device: %s\n", cuda::device_description().c_str());
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    run_case(random_case(seed));
    if (HasFailure()) return;
  }
}

// W >= #chunks with summaries stored (context > W·k) and not stored (context = W·k: pieces stay within a
// chunk's summaries).
TEST(CudaDecode, WindowCoversEverything) {
  REQUIRE_GPU();
  GpuCase c;
  c.k = 4, c.S = 2, c.W = 100, c.Hkv = 2, c.G = 4, c.D = 128, c.P = 4, c.T = {100, 45}, c.seed = 21;
  c.extra_context = 301;
  run_case(c);
  c.extra_context = 300;
  c.seed = 22;
  run_case(c);
}

// The released chunking (k=8, S=1, GQA 4, D=128) at the end of a long stream: 2,500 chunks through a
// ring of W=16 chunks, 2,500 summaries; auto split and a split of 64 rows (a token merges ~40 partials).
TEST(CudaDecode, LongStreamEnd) {
  REQUIRE_GPU();
  for (int64_t split : {0, 64}) {
    GpuCase c;
    c.k = 8, c.S = 1, c.W = 16, c.Hkv = 2, c.G = 4, c.D = 128, c.P = 64, c.split = split, c.T = {20000, 3000};
    c.seed = 31 + uint64_t(split);
    run_case(c, 60);
    if (HasFailure()) return;
  }
}

// One-row blocks: the attend kernel stages a unit's block addresses in smem (at most 256), so the plan cuts
// units of at most 255 rows here, whatever split is asked for; the plan has that many units, and decoding
// with them matches the oracle.
TEST(CudaDecode, TinyBlocksCapTheSplit) {
  REQUIRE_GPU();
  GpuCase c;
  c.k = 8, c.S = 1, c.W = 64, c.Hkv = 1, c.G = 4, c.D = 64, c.P = 1, c.split = int64_t(1) << 20, c.T = {3000};
  c.seed = 41;
  {
    cuda::KvCacheGpu cache(c.config(), nullptr, split_options(c.split));
    const SeqId id = cache.add_sequence();
    const int64_t L = Layout(c.k, c.S, 2999).length(), row = c.Hkv * c.D;  // the step adds text token 3000
    DevMem kv(size_t((L + 1) * row * 2)), q(size_t(c.G * c.D * 2)), out(size_t(c.G * c.D * 2));
    ASSERT_EQ(cudaMemset(kv.p, 0, size_t((L + 1) * row * 2)), cudaSuccess);
    const KvRows r = KvRows::dense(kv.p, L, c.Hkv, c.D, DType::bf16);
    cache.prefill(id, r, r);
    DecodeIO io;
    io.Hq = c.Hkv * c.G;
    io.dtype = DType::bf16;
    io.q = TensorView::dense(q.p, 1, io.Hq, c.D);
    io.out = TensorView::dense(out.p, 1, io.Hq, c.D);
    io.k = io.v = TensorView::dense(static_cast<uint16_t*>(kv.p) + L * row, 1, c.Hkv, c.D);
    const SeqId ids[1] = {id};
    const int64_t n[1] = {1};
    cache.plan_decode(ids, n, io);
    const auto st = cache.plan_stats();
    cache.cancel_decode();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_GT(st.key_rows, 3 * 255) << "the case must need several capped units";
    EXPECT_GE(st.units, (st.key_rows + 254) / 255) << st.key_rows << " key rows";
  }
  run_case(c, 40);
}

// A small bf16 cache: chunks of 4 text tokens and 1 summary, D = 64, blocks of 4 rows.
KvCacheConfig small_config(int64_t W, int64_t Hkv, int64_t max_text_tokens) {
  KvCacheConfig c;
  c.spec.chunk_size = 4, c.spec.S = 1, c.spec.W = W;
  c.Hkv = Hkv, c.D = 64, c.dtype = DType::bf16, c.max_text_tokens = max_text_tokens, c.block_rows = 4;
  return c;
}

// A step that would overwrite ring rows its earlier tokens read is rejected before anything changes, as is
// a step writing two chunks' summaries in a layer that keeps one; the sequence then decodes correctly.
TEST(CudaDecode, RejectsUnsafeStepsAndChangesNothing) {
  REQUIRE_GPU();
  const KvCacheConfig c = small_config(1, 1, 100);
  cuda::KvCacheGpu cache(c);
  const SeqId id = cache.add_sequence();
  std::string why;
  EXPECT_TRUE(cache.step_ok(id, 5, &why)) << why;   // 4 text + 1 summary: ring of 8 rows holds it
  EXPECT_TRUE(cache.step_ok(id, 10, &why)) << why;  // text rows 0..7: exactly the ring
  EXPECT_FALSE(cache.step_ok(id, 12, &why));        // text row 8 would overwrite row 0, which token 1 reads
  EXPECT_NE(why.find("ring_slack_rows"), std::string::npos) << why;
  DecodeIO io;
  io.Hq = 1;
  io.dtype = DType::bf16;
  DevMem buf(1 << 16);
  io.q = io.k = io.v = io.out = TensorView{buf.p, 0, 64, 64};
  const SeqId ids[1] = {id};
  const int64_t n[1] = {12};
  EXPECT_THROW(cache.plan_decode(ids, n, io), Error);
  EXPECT_EQ(cache.state(id).stream_length(), 0);
  EXPECT_EQ(cache.host().bytes_in_use(), 0);

  KvCacheConfig c2 = c;
  c2.spec.W = 30;  // W·k = 120 >= 100: summaries not stored
  cuda::KvCacheGpu cache2(c2);
  const SeqId id2 = cache2.add_sequence();
  EXPECT_TRUE(cache2.step_ok(id2, 9, &why)) << why;
  EXPECT_FALSE(cache2.step_ok(id2, 10, &why));  // summaries of chunks 0 and 1
  EXPECT_NE(why.find("two chunks"), std::string::npos) << why;
}

// A plan made on another stream (the engine's plan for the next step, made while this one runs) declines
// when it would grow a workspace (growing waits for the device), changing nothing; a cancelled plan leaves
// the workspace slot where the last committed plan put it, so caches cancelled together stay in step.
TEST(CudaDecode, PlanAheadDeclinesToGrowAndCancelKeepsTheSlot) {
  REQUIRE_GPU();
  cuda::KvCacheGpu cache(small_config(2, 2, 64));
  cudaStream_t side = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), cudaSuccess);
  const SeqId id = cache.add_sequence();
  const SeqId ids[1] = {id};
  const int64_t n[1] = {1};
  const int64_t Hq = 4;
  const int slot0 = cache.workspace_slot();
  try {
    cache.plan_decode_on(side, ids, n, Hq);
    ADD_FAILURE() << "a plan on another stream grew the empty workspaces";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("grow a workspace"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.workspace_slot(), slot0);
  EXPECT_EQ(cache.state(id).stream_length(), 0);
  // Planned on the cache's stream it grows them (both slots and both staging buffers); cancelled, the slot
  // moves back.
  cache.plan_decode(ids, n, Hq);
  EXPECT_EQ(cache.workspace_slot(), 1 - slot0);
  cache.cancel_decode();
  EXPECT_EQ(cache.workspace_slot(), slot0);
  // Now the same plan fits: made on the side stream it moves the slot, and a cancel moves it back.
  cache.plan_decode_on(side, ids, n, Hq);
  EXPECT_EQ(cache.workspace_slot(), 1 - slot0);
  cache.cancel_decode();
  EXPECT_EQ(cache.workspace_slot(), slot0);
  cache.plan_decode_on(side, ids, n, Hq);
  cache.commit_decode();
  EXPECT_EQ(cache.workspace_slot(), 1 - slot0);
  EXPECT_EQ(cache.state(id).stream_length(), 1);
  EXPECT_EQ(cudaStreamSynchronize(side), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(side), cudaSuccess);
}

TEST(CudaDecode, UnsupportedConfigsGiveReasons) {
  KvCacheConfig c;
  c.max_text_tokens = 100;
  test::expect_head_dim_and_dtype_refused(c);
  std::string why;
  c.dtype = DType::bf16;
  EXPECT_TRUE(cuda::supports(c, &why)) << why;
}

}  // namespace
}  // namespace ksa
