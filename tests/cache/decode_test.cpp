// Decoding through the compressed cache equals prefill: for random shapes and random q/k/v of whole streams,
// prefill a random prefix of each sequence into a KvCache, decode the rest (one stream token at a time, and
// separately in random-size pieces that cross chunk boundaries anywhere, several sequences of different
// lengths per batch) and compare every decoded row with the oracle on the whole stream.
#include <gtest/gtest.h>

#include <numeric>

#include "../cpu/simd_targets.hpp"
#include "cache_cases.hpp"

namespace ksa {
namespace {

using test::Driver;
using test::SeqData;

struct DecodeCase {
  int64_t k = 8, S = 1, W = 1, Hkv = 1, G = 1, D = 16, block_rows = 16, extra_context = 0;
  std::vector<int64_t> T{20};
  DType dtype = DType::f32;
  bool strided = false;
  int threads = 0;
  uint64_t seed = 1;

  std::string str() const {
    std::ostringstream os;
    os << "k=" << k << " S=" << S << " W=" << W << " heads=" << Hkv * G << "/" << Hkv << " D=" << D
       << " block_rows=" << block_rows << " T={";
    for (size_t i = 0; i < T.size(); ++i) os << (i ? "," : "") << T[i];
    os << "} max_text=" << max_text() << " " << dtype_name(dtype) << " strided=" << strided << " threads=" << threads
       << " seed=" << seed;
    return os.str();
  }
  int64_t max_text() const { return *std::max_element(T.begin(), T.end()) + extra_context; }
  Spec spec() const {
    Spec s;
    s.chunk_size = k;
    s.S = S;
    s.W = W;
    return s;
  }
  KvCacheConfig config() const {
    KvCacheConfig c;
    c.spec = spec();
    c.Hkv = Hkv;
    c.D = D;
    c.dtype = dtype;
    c.max_text_tokens = max_text();
    c.block_rows = block_rows;
    return c;
  }
};

// Fills a random prefix of every sequence (prefill, appends of single tokens, prefill), then decodes the rest with
// `pieces` = false: one token per sequence and step; true: random counts in [0, 2(k+S)+1] per sequence.
void run_decode(const DecodeCase& c, const std::vector<SeqData>& seqs, bool pieces, std::mt19937_64& rng,
                std::vector<int64_t> splits = {}) {
  SCOPED_TRACE(pieces ? "random-size pieces" : "one token at a time");
  Driver drv(c.config());
  drv.strided = c.strided;
  drv.threads = c.threads;
  for (const SeqData& d : seqs) drv.add(d);
  for (size_t i = 0; i < seqs.size(); ++i) {
    // Random splits leave at least one token to decode.
    if (i >= splits.size()) splits.push_back(std::uniform_int_distribution<int64_t>(0, seqs[i].L - 1)(rng));
    const int64_t split = splits[i];
    int64_t a = std::uniform_int_distribution<int64_t>(0, split)(rng),
            b = std::uniform_int_distribution<int64_t>(a, split)(rng);
    drv.prefill(i, a);
    drv.append_tokens(i, b - a, rng);
    drv.prefill(i, split - b);
  }
  if (!decode_to_end(drv, seqs, splits, pieces, 2 * (c.k + c.S) + 1, rng)) return;
  // Everything that is left in the pool belongs to a live sequence; releasing all returns every block.
  for (SeqId id : drv.ids) drv.cache.release(id);
  EXPECT_EQ(drv.cache.bytes_in_use(), 0);
}

void run_case(const DecodeCase& c) {
  SCOPED_TRACE(c.str());
  std::mt19937_64 rng(c.seed);
  std::vector<SeqData> seqs;
  seqs.reserve(c.T.size());
  for (int64_t T : c.T) seqs.emplace_back(c.spec(), T, c.Hkv * c.G, c.Hkv, c.D, c.dtype, rng);
  run_decode(c, seqs, false, rng);
  if (::testing::Test::HasFailure()) return;
  run_decode(c, seqs, true, rng);
}

DecodeCase random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&](std::initializer_list<int64_t> xs) {
    return *(xs.begin() + std::uniform_int_distribution<size_t>(0, xs.size() - 1)(rng));
  };
  DecodeCase c;
  c.seed = seed;
  c.k = pick({1, 2, 3, 4, 5, 8});
  c.S = pick({1, 1, 2, 2, 3});
  c.W = pick({0, 1, 2, 3, 6, 1000});
  c.Hkv = pick({1, 2});
  c.G = pick({1, 2, 4, 8});
  c.D = pick({4, 8, 16, 32, 64});
  if (c.Hkv * c.G * c.D > 256) c.D = 256 / (c.Hkv * c.G);  // keeps the oracle cheap; D=128 has its own test
  c.block_rows = pick({1, 2, 3, 4, 7, 16});
  c.dtype = pick({0, 1}) ? DType::bf16 : DType::f32;
  c.strided = pick({0, 1});
  c.threads = int(pick({1, 2}));
  const int64_t B = pick({1, 2, 3});
  // Many chunks beyond the window so the ring wraps several times; shorter for small k (S per chunk).
  const int64_t tmax = c.k == 1 ? 60 : (c.k <= 3 ? 120 : 200);
  c.T.clear();
  for (int64_t b = 0; b < B; ++b) c.T.push_back(std::uniform_int_distribution<int64_t>(1, tmax)(rng));
  c.extra_context = pick({0, 0, 1, 17});
  return c;
}

TEST(Decode, RandomShapesMatchOracle) {
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    run_case(random_case(seed));
    if (HasFailure()) return;
  }
}

DecodeCase fixed(int64_t k, int64_t S, int64_t W, int64_t Hkv, int64_t G, int64_t D, int64_t P, std::vector<int64_t> T,
                 DType dt, uint64_t seed) {
  DecodeCase c;
  c.k = k, c.S = S, c.W = W, c.Hkv = Hkv, c.G = G, c.D = D, c.block_rows = P, c.T = std::move(T), c.dtype = dt;
  c.seed = seed;
  c.strided = seed % 2 == 1;
  c.threads = 2;
  return c;
}

// The decode's scores and value accumulation on every SIMD target this CPU runs (Highway's dispatch: the other
// tests take the best one), over head dims below, at and past the vector widths, and groups of 1 to 8 heads
// (the scores take heads 4 at a time).
TEST(Decode, EverySimdTargetMatchesOracle) {
  test::on_every_simd_target([] {
    for (uint64_t seed = 400; seed < 440; ++seed) run_case(random_case(seed));
    run_case(fixed(8, 1, 2, 2, 4, 128, 16, {70}, DType::bf16, 133));
    run_case(fixed(4, 1, 3, 1, 4, 20, 5, {90}, DType::f32, 134));
    for (int64_t G : {3, 5, 6, 7}) run_case(fixed(8, 1, 2, 1, G, 24, 16, {60}, DType::bf16, uint64_t(135 + G)));
  });
}

// The ring of W chunks wraps around many times (150 chunks through 2 chunks of ring, blocks of 1 and 4 rows).
TEST(Decode, RingWrapsManyTimes) {
  run_case(fixed(2, 1, 1, 1, 2, 8, 1, {300, 211}, DType::f32, 101));
  run_case(fixed(3, 2, 2, 2, 1, 8, 4, {250}, DType::bf16, 102));
  run_case(fixed(4, 1, 3, 1, 4, 16, 5, {230, 7}, DType::f32, 103));
}

// W = 0: text sees its own chunk and the summaries of every earlier chunk.
TEST(Decode, WindowZero) {
  run_case(fixed(4, 1, 0, 1, 2, 16, 3, {90, 33}, DType::f32, 111));
  run_case(fixed(3, 2, 0, 2, 2, 8, 16, {61}, DType::bf16, 112));
  run_case(fixed(1, 2, 0, 1, 1, 8, 2, {30}, DType::f32, 113));
}

// W >= #chunks: plain causal text attention for text queries; summaries stored (context > W·k) or not.
TEST(Decode, WindowCoversEverything) {
  DecodeCase c = fixed(4, 2, 100, 1, 2, 16, 4, {100, 45}, DType::f32, 121);
  c.extra_context = 301;  // max_text 401 > W·k = 400: summaries stored
  run_case(c);
  c.extra_context = 300;  // max_text 400 = W·k: never visible, not stored
  c.seed = 122;
  run_case(c);
}

// Head dim 128 with GQA 4 and 8, bf16 and fp32.
TEST(Decode, HeadDim128Gqa) {
  run_case(fixed(8, 1, 2, 2, 4, 128, 16, {70}, DType::bf16, 131));
  run_case(fixed(8, 2, 1, 1, 8, 128, 16, {41, 25}, DType::f32, 132));
}

// Every split point of a short stream, including inside a chunk's run of summaries and right after a chunk's
// k-th token (S = 3), then decoding one token at a time.
TEST(Decode, EverySplitPoint) {
  for (DType dt : {DType::f32, DType::bf16}) {
    DecodeCase c = fixed(3, 3, 1, 1, 2, 8, 2, {11}, dt, 141);
    SCOPED_TRACE(c.str());
    std::mt19937_64 rng(c.seed);
    std::vector<SeqData> seqs;
    seqs.emplace_back(c.spec(), c.T[0], c.Hkv * c.G, c.Hkv, c.D, c.dtype, rng);
    for (int64_t split = 0; split <= seqs[0].L; ++split) {
      SCOPED_TRACE("split at stream position " + std::to_string(split));
      run_decode(c, seqs, false, rng, {split});
      if (HasFailure()) return;
    }
  }
}

}  // namespace
}  // namespace ksa

namespace ksa {
namespace {

// A long stream: 2,500 chunks through a ring of 16 (it wraps ~150 times) and 2,500 summaries over 157
// summary blocks. Prefill all but the last 200 stream tokens, decode those (pieces, then one at a time) and
// compare with the oracle on those rows.
TEST(Decode, LongStreamEnd) {
  const DecodeCase c = fixed(8, 1, 16, 2, 2, 32, 16, {20000}, DType::bf16, 151);
  SCOPED_TRACE(c.str());
  std::mt19937_64 rng(c.seed);
  std::vector<SeqData> seqs;
  seqs.emplace_back(c.spec(), c.T[0], c.Hkv * c.G, c.Hkv, c.D, c.dtype, rng, 200);
  run_decode(c, seqs, true, rng, {seqs[0].L - 200});
  if (HasFailure()) return;
  run_decode(c, seqs, false, rng, {seqs[0].L - 200});
}

}  // namespace
}  // namespace ksa
