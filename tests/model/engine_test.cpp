// ksa::Model (the CPU Qwen3-KSA engine) against the naive reference forward (reference_forward.hpp) on
// random tiny checkpoints, and against itself: prefill vs token-by-token decoding vs multi-turn pieces,
// determinism, thread counts, and the errors the API promises.
//
// Tolerances (docs/design.md: tolerances). Both sides read the same bf16 weights exactly (bf16 -> float is exact), so
// the only difference with an f32 KV cache is arithmetic: the engine in fp32 (blocked sums, FMA, online softmax), the
// reference in double. The yardstick is the reference's own loops run in float (logits_f32): a naive fp32 computation
// of the same model. The engine must be within kNaiveMultiple times that error, plus a floor of kFloorRel * max|logit|
// (a few hundred fp32 ulps of the largest logit, so that a lucky small naive error does not make the bound
// meaningless). Errors are measured as max |engine - ref| over all logits of a case; the worst index and values are
// printed on failure; NaN/inf never pass.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine_util.hpp"
#include "ksa/dense.hpp"
#include "ksa/error.hpp"
#include "ksa/model.hpp"
#include "ksa/model_writer.hpp"
#include "ksa/pattern.hpp"
#include "logits_diff.hpp"
#include "reference_forward.hpp"
#include "test_util.hpp"

namespace ksa {
namespace {

namespace fs = std::filesystem;
using test::ReferenceModel;

using test::kFloorRel;  // engine vs the reference: logits_diff.hpp
using test::kNaiveMultiple;
// Engine vs engine with an f32 cache (prefill kernel vs decode kernel, different row counts through the
// matrix products): two fp32 computations, each within ~4x the naive fp32 error (~1e-6 relative) of the
// exact value, so 2 x 4 x 1e-6. Measured <= 1.8e-6 (12 seed offsets).
constexpr double kSelfRelF32 = 8e-6;
// bf16 cache: q, k, v and the attention output are rounded to bf16 (8 significant bits, relative step
// 2^-8 = 3.9e-3) in both paths; a last-bit fp32 difference upstream can flip one rounding, which moves
// that element by one bf16 step and propagates through the later layers (a few such flips per run).
// Bound: 4 bf16 steps of the largest logit; measured <= 1.3 steps (5.1e-3, 12 seed offsets). Cache bugs
// (a wrong ring slot, a lost summary) show up far above this, and tightly in the f32-cache comparison.
constexpr double kSelfRelBf16 = 4.0 * 0x1p-8;
// bf16 cache vs the exact reference: every q/k/v/attention value carries up to half a bf16 step of
// relative error, through 4 layers (errors add per layer and pass through the norms); a coarse sanity
// bound of 8 steps (the f32-cache comparison is the precise one). Measured <= 3.7 steps (1.45e-2, 12 seed
// offsets).
constexpr double kRefRelBf16 = 8.0 * 0x1p-8;

// The engine tests check the CPU engine's fp32 arithmetic against the double reference (a few times a naive
// fp32 forward's error) and its paths against each other bit for bit or nearly. Products with the CPU's bf16
// dot-product instructions (ksa::cpu::bf16_products: x rounded to bf16 in products of >= 12 rows, on by
// default where the CPU has AVX512_BF16) are about 1% of max |logit| from the reference and differ between
// a prefill and token-by-token decode, so this executable runs with them off (the same arithmetic on every
// machine); EngineReference.Bf16ProductsNearReference turns them on. (Runs before main: a static initialiser.)
[[maybe_unused]] const bool kFp32Products = [] {
  cpu::set_bf16_products(false);
  return true;
}();

// KSA_ENGINE_TEST_SEED=n adds n to every case's seed (to re-run the suite on other random models/texts).
uint64_t seed_offset() {
  const char* s = std::getenv("KSA_ENGINE_TEST_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 0;
}

constexpr int64_t kTextVocab = 256;  // text token ids [0, 256); summary ids follow

bool verbose() { return std::getenv("KSA_TEST_VERBOSE") != nullptr; }

// One test configuration: the "tiny" shape (4 layers, hidden 64, intermediate 192, 4 query heads, head_dim 16)
// with the KSA knobs changed and a small vocabulary.
struct Case : test::TinyModel {  // Hkv, k, S, mix, tied, windows, summary_layers, positions, ... (engine_util.hpp)
  std::string name;
  uint64_t seed = 1;
};

std::string describe(const Case& c) {
  std::ostringstream os;
  os << "case " << c.name << " (seed " << c.seed << "): Hq=4 Hkv=" << c.Hkv << " D=16 layers=4";
  if (!c.summary_attention) {
    os << ", plain Qwen3 (use_summary_attention false)";
  } else {
    os << ", k=" << c.k << " S=" << c.S << " W=" << c.windows << " mix=" << c.mix << (c.tied ? " tied" : " untied")
       << " text_pos=" << to_string(c.tp) << " summary_pos=" << to_string(c.sp)
       << " summary_layernorm=" << c.summary_layernorm;
    if (!c.summary_layers.empty()) {
      os << " summary_layer_freq=[";
      for (uint8_t x : c.summary_layers) os << int(x);
      os << "]";
    }
  }
  return os.str();
}

ModelConfig make_config(const Case& c) { return test::tiny_config(c, kTextVocab); }

// The cases of the suite (see describe()). Together they cover GQA ratios 1/2/4, S = 1 and 2, k = 3 and 4,
// mix 0 / 0.5 / 1, tied and untied embeddings, windows 0, 1, 2 and >= chunks, a hybrid with plain causal
// layers, all text and summary position modes, the summary layernorm, and plain Qwen3.
std::vector<Case> cases() {
  std::vector<Case> v;
  {
    Case c;
    c.name = "gqa2_k4_S1_mix0.5_tied_W[0,1,2,64]_sumnorm";
    c.Hkv = 2, c.k = 4, c.S = 1, c.mix = 0.5, c.tied = true, c.windows = "[0,1,2,64]", c.summary_layernorm = true;
    c.seed = 11;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "gqa4_k3_S2_mix1_untied_inner_zeros";
    c.Hkv = 1, c.k = 3, c.S = 2, c.mix = 1.0, c.tied = false, c.windows = "[1,0,2,1]";
    c.tp = TextPositions::inner_chunk, c.sp = SummaryPositions::zeros;
    c.seed = 22;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "mha_k4_S2_mix0_left";
    c.Hkv = 4, c.k = 4, c.S = 2, c.mix = 0.0, c.tied = true, c.windows = "[2]*2+[0,1]";
    c.sp = SummaryPositions::last_chunk_slice_left;
    c.seed = 33;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "hybrid_k3_S1_mix0.5_untied";
    c.Hkv = 2, c.k = 3, c.S = 1, c.mix = 0.5, c.tied = false, c.windows = "[1,1,0,2]";
    c.summary_layers = {1, 0, 1, 0};
    c.seed = 44;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "largeW_k4_S2_mix0.5_right";
    c.Hkv = 2, c.k = 4, c.S = 2, c.mix = 0.5, c.tied = true, c.windows = "[100]*3+[40]";
    c.seed = 55;
    v.push_back(c);
  }
  {
    Case c;
    c.name = "plain_qwen3_untied";
    c.Hkv = 2, c.tied = false, c.windows = "0", c.summary_attention = false;
    c.seed = 66;
    v.push_back(c);
  }
  for (Case& c : v) c.seed += seed_offset();
  return v;
}

// A random checkpoint of a case, its reference, and engines.
struct Built {
  Case c;
  ModelConfig cfg;
  test::TempDir dir{"engine"};
  std::unique_ptr<ReferenceModel> ref;

  explicit Built(const Case& cs) : Built(cs, make_config(cs)) {}
  Built(const Case& cs, const ModelConfig& config) : c(cs), cfg(config) {
    RandomModelOptions o;
    o.seed = cs.seed;
    write_random_model(cfg, dir.str(), o);
    ref = std::make_unique<ReferenceModel>(dir.str());
  }
  Model engine(DType kv, int threads = 2, int64_t max_text = 0) const {
    ModelOptions o;
    o.kv_dtype = kv;
    o.threads = threads;
    o.max_text_tokens = max_text;
    return Model::load(dir.str(), o);
  }
  int64_t V() const { return cfg.logits_size(); }
};

std::vector<int32_t> random_text(std::mt19937_64& rng, int64_t n) { return test::random_text(rng, n, kTextVocab); }
using test::prefill;
using test::stepwise;

// A fresh sequence fed in random pieces of 1..max_piece tokens (turns of a conversation).
std::vector<float> in_pieces(Model& m, std::span<const int32_t> text, std::mt19937_64& rng, int64_t max_piece) {
  const SeqId id = m.new_sequence();
  const size_t V = size_t(m.vocab());
  std::vector<float> out(text.size() * V);
  std::uniform_int_distribution<int64_t> d(1, max_piece);
  size_t i = 0;
  while (i < text.size()) {
    const size_t n = std::min(text.size() - i, size_t(d(rng)));
    m.append(id, text.subspan(i, n), LogitsFor::all, std::span<float>(out).subspan(i * V, n * V));
    i += n;
  }
  m.release(id);
  return out;
}

using test::argmax;
using test::Diff;
using test::diff;
using test::within;

// ---------------------------------------------------------------------------------------------------
// a. Engine prefill (f32 cache) vs the reference, every case, awkward lengths.

TEST(EngineReference, PrefillMatchesReference) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const Built b(c);
    Model m = b.engine(DType::f32);
    EXPECT_EQ(m.vocab(), b.V());
    std::mt19937_64 rng(c.seed);
    const int64_t k = c.summary_attention ? c.k : 4;
    double worst_rel = 0, worst_naive_rel = 0;
    for (int64_t T : {int64_t(1), k - 1, k, k + 1, int64_t(37), int64_t(61)}) {
      SCOPED_TRACE("T=" + std::to_string(T));
      const std::vector<int32_t> text = random_text(rng, T);
      const std::vector<double> want = b.ref->logits(text);
      const std::vector<double> naive = b.ref->logits_f32(text);
      const std::vector<float> got = prefill(m, text);
      const Diff dn = diff(naive, want), d = diff(got, want);
      ASSERT_LT(dn.nonfinite, 0) << "the reference produced a non-finite logit";
      const double tol = kNaiveMultiple * dn.max_err + kFloorRel * dn.max_abs;
      EXPECT_TRUE(within(d, tol, b.V())) << "(naive fp32 error " << dn.max_err << ")";
      worst_rel = std::max(worst_rel, d.rel());
      worst_naive_rel = std::max(worst_naive_rel, dn.rel());
      // The reference is not degenerate: logits vary across the vocabulary and across positions.
      EXPECT_GT(dn.max_abs, 1e-3);
    }
    if (verbose())
      std::printf("[prefill vs ref] %-45s engine %.3g  naive-f32 %.3g (relative to max |logit|)\n", c.name.c_str(),
                  worst_rel, worst_naive_rel);
  }
}

// A step of more than 4,096 stream rows runs its MLP on parts of its rows (Model::step: SwiGLU's output then
// fits the q/k/v buffer): still the reference's logits. A case whose intermediate size (192) exceeds its
// q/k/v columns (128), cut to its first two layers (the reference's attention is quadratic in the rows), the
// prompt in one step of 4,125 rows (MLP parts of 2,112 and 2,013).
TEST(EngineReference, LongStepRunsTheMlpInPartsAndMatchesReference) {
  {
    const Case c = cases()[0];
    const int64_t T = 3300;
    SCOPED_TRACE(describe(c) + ", first 2 layers, T=" + std::to_string(T));
    ModelConfig cfg = make_config(c);
    cfg.num_hidden_layers = 2;
    cfg.windows.resize(2);
    cfg.summary_layers.resize(2);
    cfg.window_pattern = "[" + std::to_string(cfg.windows[0]) + "," + std::to_string(cfg.windows[1]) + "]";
    cfg.validate();
    const Built b(c, cfg);
    Model m = b.engine(DType::f32);
    std::mt19937_64 rng(c.seed + 7);
    const std::vector<int32_t> text = random_text(rng, T);
    const std::vector<double> want = b.ref->logits(text);
    const Diff dn = diff(b.ref->logits_f32(text), want), d = diff(prefill(m, text), want);
    const double tol = kNaiveMultiple * dn.max_err + kFloorRel * dn.max_abs;
    EXPECT_TRUE(within(d, tol, b.V())) << "(naive fp32 error " << dn.max_err << ")";
    EXPECT_GT(dn.max_abs, 1e-3);
  }
}

// f(case, built, engine, text, reference logits) for every case: the engine with a `kv` cache and 61 random
// text tokens (the case's seed + seed_offset).
template <class F>
void on_61_tokens(DType kv, uint64_t seed_offset, F&& f) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const Built b(c);
    Model m = b.engine(kv);
    std::mt19937_64 rng(c.seed + seed_offset);
    const std::vector<int32_t> text = random_text(rng, 61);
    f(c, b, m, text, b.ref->logits(text));
  }
}

// A bf16 KV cache (the default) stays close to the exact reference (a coarse bound; see kRefRelBf16).
TEST(EngineReference, Bf16CacheNearReference) {
  on_61_tokens(DType::bf16, 1, [](const Case& c, const Built& b, Model& m, const std::vector<int32_t>& text,
                                  const std::vector<double>& want) {
    const Diff d = diff(prefill(m, text), want);
    EXPECT_TRUE(within(d, kRefRelBf16 * d.max_abs, b.V()));
    if (verbose()) std::printf("[bf16 prefill vs ref] %-45s %.3g\n", c.name.c_str(), d.rel());
  });
}

// Products through the CPU's bf16 dot-product instructions (x rounded to bf16, as the CUDA engine and the
// reference's bf16 inference do) stay within the bf16-cache bound of the exact reference, and differ from the
// fp32 products (so the path ran). Skipped on CPUs without AVX512_BF16.
TEST(EngineReference, Bf16ProductsNearReference) {
  cpu::set_bf16_products(true);
  const bool on = cpu::bf16_products();
  if (!on) {
    cpu::set_bf16_products(false);
    GTEST_SKIP() << "this CPU has no AVX512_BF16: products of bf16 weights run in fp32 here";
  }
  on_61_tokens(DType::f32, 2, [](const Case& c, const Built& b, Model& m, const std::vector<int32_t>& text,
                                 const std::vector<double>& want) {
    cpu::set_bf16_products(true);
    const std::vector<float> got = prefill(m, text);
    cpu::set_bf16_products(false);
    const std::vector<float> got32 = prefill(m, text);
    const Diff d = diff(got, want), d32 = diff(got32, want), apart = diff(got, got32);
    EXPECT_TRUE(within(d, kRefRelBf16 * d.max_abs, b.V()));
    // The weights of these models are bf16 (the path needs them): rounding x moves the logits far above the
    // fp32 engine's own error.
    EXPECT_GT(apart.max_err, 100 * d32.max_err) << "bf16 products did not change the logits";
    if (verbose())
      std::printf("[bf16 products vs ref] %-45s %.3g (fp32 products %.3g)\n", c.name.c_str(), d.rel(), d32.rel());
  });
}

// A layer whose window covers every chunk is plain causal attention over text for text queries (docs/ksa.md
// §4), and summary tokens never reach a text token: the text logits equal plain Qwen3's on the same
// weights (origin positions). Checked on the reference (exactly) and on the engine.
TEST(EngineReference, WindowCoveringAllChunksEqualsPlainQwen3) {
  Case c;
  c.name = "allW_k3_S2_mix0.5";
  c.Hkv = 2, c.k = 3, c.S = 2, c.mix = 0.5, c.tied = false, c.windows = "[30]*4", c.summary_layernorm = true;
  c.seed = 77 + seed_offset();
  SCOPED_TRACE(describe(c));
  const Built b(c);
  test::TempDir plain{"engine"};
  fs::copy(b.dir.str(), plain.str(), fs::copy_options::recursive);
  ModelConfig pc = b.cfg;
  pc.use_summary_attention = false;
  pc.summary_layers.assign(4, 0);
  {
    std::ofstream f(fs::path(plain.str()) / "config.json", std::ios::trunc);
    f << pc.to_json();
  }
  const ReferenceModel pref(plain.str());
  std::mt19937_64 rng(c.seed);
  const std::vector<int32_t> text = random_text(rng, 61);
  const std::vector<double> a = b.ref->logits(text), p = pref.logits(text);
  const Diff dr = diff(a, p);
  EXPECT_TRUE(within(dr, 1e-12 * dr.max_abs, b.V())) << "reference";
  Model m = b.engine(DType::f32), mp = Model::load(plain.str(), ModelOptions{Device::cpu, 2, 0, DType::f32, {}});
  const Diff de = diff(prefill(m, text), prefill(mp, text));
  EXPECT_TRUE(within(de, kSelfRelF32 * de.max_abs, b.V())) << "engine";
}

// ---------------------------------------------------------------------------------------------------
// b. Decoding through the cache equals one prefill: one token at a time (crossing every chunk boundary
// and wrapping the window ring many times: 97 tokens >> (W+1)*k), in random multi-turn pieces, and
// interleaved with a second sequence.

TEST(EngineDecode, StepwiseAndPiecesEqualPrefill) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const Built b(c);
    std::mt19937_64 rng(c.seed + 2);
    const std::vector<int32_t> text = random_text(rng, 97);
    const std::vector<double> want = b.ref->logits(text);
    const Diff dn = diff(b.ref->logits_f32(text), want);
    const double ref_tol = kNaiveMultiple * dn.max_err + kFloorRel * dn.max_abs;
    for (DType kv : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(std::string("kv cache ") + dtype_name(kv));
      const double rel = kv == DType::f32 ? kSelfRelF32 : kSelfRelBf16;
      Model m = b.engine(kv);
      const std::vector<float> whole = prefill(m, text);
      const std::vector<float> steps = stepwise(m, text);
      const std::vector<float> pieces = in_pieces(m, text, rng, 13);
      const Diff ds = diff(steps, whole), dp = diff(pieces, whole);
      EXPECT_TRUE(within(ds, rel * ds.max_abs, b.V())) << "one token at a time vs one prefill";
      EXPECT_TRUE(within(dp, rel * dp.max_abs, b.V())) << "random pieces vs one prefill";
      if (kv == DType::f32) {
        // The decode path against the oracle directly, with the prefill's bound.
        const Diff dr = diff(steps, want);
        EXPECT_TRUE(within(dr, ref_tol, b.V())) << "one token at a time vs the reference";
      }
      if (verbose())
        std::printf("[decode %s] %-45s steps %.3g  pieces %.3g\n", dtype_name(kv), c.name.c_str(), ds.rel(), dp.rel());
    }
  }
}

TEST(EngineDecode, SequencesDoNotInterfere) {
  const Case c = cases()[1];  // k=3, S=2, small windows: many ring wrap-arounds
  SCOPED_TRACE(describe(c));
  const Built b(c);
  Model m = b.engine(DType::f32);
  std::mt19937_64 rng(c.seed + 3);
  const std::vector<int32_t> ta = random_text(rng, 50), tb = random_text(rng, 43);
  const std::vector<float> wa = prefill(m, ta), wb = prefill(m, tb);
  const size_t V = size_t(m.vocab());
  // A third sequence holds a prompt across the whole run, then continues.
  const SeqId other = m.new_sequence();
  const std::vector<int32_t> to = random_text(rng, 20);
  std::vector<float> lo(V);
  m.append(other, std::span(to).first(10), LogitsFor::none, {});
  const SeqId a = m.new_sequence(), bb = m.new_sequence();
  std::vector<float> ga(ta.size() * V), gb(tb.size() * V);
  for (size_t i = 0; i < std::max(ta.size(), tb.size()); ++i) {
    if (i < ta.size()) m.append(a, std::span(ta).subspan(i, 1), LogitsFor::last, std::span(ga).subspan(i * V, V));
    if (i < tb.size()) m.append(bb, std::span(tb).subspan(i, 1), LogitsFor::last, std::span(gb).subspan(i * V, V));
  }
  EXPECT_EQ(m.text_tokens(a), 50);
  EXPECT_EQ(m.stream_tokens(a), 50 + (50 / 3) * 2);
  EXPECT_EQ(m.text_tokens(bb), 43);
  EXPECT_EQ(m.stream_tokens(bb), 43 + (43 / 3) * 2);
  const Diff da = diff(ga, wa), db = diff(gb, wb);
  EXPECT_TRUE(within(da, kSelfRelF32 * da.max_abs, b.V())) << "sequence a";
  EXPECT_TRUE(within(db, kSelfRelF32 * db.max_abs, b.V())) << "sequence b";
  // The held sequence continues as if alone (logits of its last token).
  m.append(other, std::span(to).subspan(10), LogitsFor::last, lo);
  const std::vector<float> wo = prefill(m, to);
  const std::vector<float> wo_last(wo.end() - std::ptrdiff_t(V), wo.end());
  const Diff dl = diff(lo, wo_last);
  EXPECT_TRUE(within(dl, kSelfRelF32 * dl.max_abs, b.V())) << "held sequence";
  m.release(a);
  m.release(bb);
  m.release(other);
}

// Model::step: a batch that mixes prompt chunks and single tokens of several sequences gives each sequence
// the logits it gets alone; sampled ids are reproducible from the seed; a bad item changes nothing.
TEST(EngineStep, MixedBatchEqualsSequencesAlone) {
  const Case c = cases()[1];  // k=3, S=2: chunk boundaries inside the prompt chunks
  SCOPED_TRACE(describe(c));
  const Built b(c);
  Model m = b.engine(DType::f32);
  std::mt19937_64 rng(c.seed + 7);
  const size_t V = size_t(m.vocab());
  const std::vector<int32_t> ta = random_text(rng, 41), tb = random_text(rng, 29), tc = random_text(rng, 17);
  const std::vector<float> wa = prefill(m, ta), wb = prefill(m, tb), wc = prefill(m, tc);
  const SeqId a = m.new_sequence(), bb = m.new_sequence(), cc = m.new_sequence();
  // a: 20-token prompt chunk then one token per step; b: chunks of 5; c joins at step 3, all at once.
  std::vector<float> ga(ta.size() * V), gb(tb.size() * V), gc(tc.size() * V);
  size_t ia = 0, ib = 0, ic = 0;
  StepResult r;
  for (int step = 0; ia < ta.size() || ib < tb.size() || ic < tc.size(); ++step) {
    std::vector<StepItem> items;
    std::vector<std::pair<std::vector<float>*, size_t>> dst;
    auto add = [&](SeqId id, const std::vector<int32_t>& t, size_t& i, size_t n, std::vector<float>& g) {
      n = std::min(n, t.size() - i);
      if (n == 0) return;
      StepItem it;
      it.id = id;
      it.tokens = std::span(t).subspan(i, n);
      it.logits = LogitsFor::all;
      items.push_back(it);
      dst.emplace_back(&g, i);
      i += n;
    };
    add(a, ta, ia, step == 0 ? 20 : 1, ga);
    add(bb, tb, ib, 5, gb);
    if (step >= 3) add(cc, tc, ic, tc.size(), gc);
    m.step(items, r);
    ASSERT_EQ(r.logits_row.size(), items.size());
    for (size_t j = 0; j < items.size(); ++j)
      std::copy_n(r.logits.begin() + r.logits_row[j] * int64_t(V), items[j].tokens.size() * V,
                  dst[j].first->begin() + dst[j].second * V);
  }
  const Diff da = diff(ga, wa), db = diff(gb, wb), dc = diff(gc, wc);
  EXPECT_TRUE(within(da, kSelfRelF32 * da.max_abs, b.V())) << "sequence a";
  EXPECT_TRUE(within(db, kSelfRelF32 * db.max_abs, b.V())) << "sequence b";
  EXPECT_TRUE(within(dc, kSelfRelF32 * dc.max_abs, b.V())) << "sequence c";
  EXPECT_EQ(m.num_sequences(), 3);
  EXPECT_GT(m.kv_bytes_in_use(), 0);
  EXPECT_LE(m.kv_bytes(a), m.kv_bytes_for(41));
  m.release(a);
  m.release(bb);
  m.release(cc);
  EXPECT_EQ(m.kv_bytes_in_use(), 0);
}

TEST(EngineStep, SamplingIsReproducibleAndErrorsChangeNothing) {
  const Case c = cases()[0];
  const Built b(c);
  Model m = b.engine(DType::bf16);
  std::mt19937_64 rng(c.seed + 8);
  const std::vector<int32_t> prompt = random_text(rng, 13);
  SamplerConfig sc;
  sc.temperature = 1.5f;
  sc.top_k = 40;
  sc.seed = 1234;
  auto run = [&](uint64_t seed, bool with_other) {
    SamplerConfig s2 = sc;
    s2.seed = seed;
    const SeqId id = m.new_sequence();
    const SeqId other = m.new_sequence();
    std::vector<int32_t> toks(prompt);
    StepResult r;
    for (int i = 0; i < 24; ++i) {
      std::vector<StepItem> items(1);
      items[0].id = id;
      items[0].tokens = i == 0 ? std::span<const int32_t>(toks) : std::span<const int32_t>(&toks.back(), 1);
      items[0].sampler = &s2;
      items[0].history = toks;
      const int32_t o = prompt[size_t(i) % prompt.size()];
      if (with_other) items.push_back(StepItem{other, std::span<const int32_t>(&o, 1), LogitsFor::last, nullptr, {}});
      m.step(items, r);
      EXPECT_TRUE(r.next[0] >= 0 && r.next[0] < m.vocab());
      if (with_other) {
        EXPECT_EQ(r.next[1], -1);
      }
      toks.push_back(r.next[0]);
    }
    m.release(id);
    m.release(other);
    return toks;
  };
  const std::vector<int32_t> s1 = run(1234, false), s2 = run(1234, true), s3 = run(99, false);
  EXPECT_EQ(s1, s2) << "the same seed gives the same tokens, whatever else is in the batch";
  EXPECT_NE(s1, s3) << "another seed, other tokens (24 draws at temperature 1.5)";

  // Errors: an unknown id, an empty item, a summary token id, a duplicate id -- nothing changes.
  const SeqId id = m.new_sequence();
  const int32_t good = 5, sum_id = int32_t(b.cfg.summary_token_begin);
  StepResult r;
  std::vector<StepItem> bad = {{id, std::span<const int32_t>(&good, 1), LogitsFor::last, nullptr, {}},
                               {id + 100, std::span<const int32_t>(&good, 1), LogitsFor::last, nullptr, {}}};
  EXPECT_THROW(m.step(bad, r), Error);
  bad[1] = StepItem{id, std::span<const int32_t>(&good, 1), LogitsFor::last, nullptr, {}};
  EXPECT_THROW(m.step(bad, r), Error);  // the same id twice
  bad[1] = StepItem{id, {}, LogitsFor::last, nullptr, {}};
  EXPECT_THROW(m.check(bad[1]), Error);
  bad.resize(1);
  bad[0].tokens = std::span<const int32_t>(&sum_id, 1);
  EXPECT_THROW(m.step(bad, r), Error);
  std::vector<float> lg(size_t(m.vocab()));
  EXPECT_THROW(m.append(id, std::span<const int32_t>(&sum_id, 1), LogitsFor::last, lg), Error);
  EXPECT_EQ(m.text_tokens(id), 0);
  m.release(id);
}

// LogitsFor::last of a prefill is the last row of LogitsFor::all; LogitsFor::none still fills the cache.
TEST(EngineDecode, LogitsForLastAndNone) {
  const Case c = cases()[0];
  SCOPED_TRACE(describe(c));
  const Built b(c);
  Model m = b.engine(DType::f32);
  std::mt19937_64 rng(c.seed + 4);
  const std::vector<int32_t> text = random_text(rng, 23);
  const size_t V = size_t(m.vocab());
  const std::vector<float> all = prefill(m, text);
  const std::vector<float> all_last(all.end() - std::ptrdiff_t(V), all.end());
  std::vector<float> last(V);
  const SeqId id = m.new_sequence();
  m.append(id, text, LogitsFor::last, last);
  const Diff d0 = diff(last, all_last);
  EXPECT_TRUE(within(d0, kSelfRelF32 * d0.max_abs, b.V())) << "last vs the last row of all";
  const SeqId id2 = m.new_sequence();
  m.append(id2, std::span(text).first(22), LogitsFor::none, {});
  m.append(id2, std::span(text).subspan(22), LogitsFor::last, last);
  const Diff d = diff(last, all_last);
  EXPECT_TRUE(within(d, kSelfRelF32 * d.max_abs, b.V()));
}

// ---------------------------------------------------------------------------------------------------
// c. Determinism and thread counts.

TEST(EngineDeterminism, SameInputsSameBitsAndThreadCountsAgree) {
  for (const Case& c : {cases()[0], cases()[3]}) {
    SCOPED_TRACE(describe(c));
    const Built b(c);
    std::mt19937_64 rng(c.seed + 5);
    const std::vector<int32_t> text = random_text(rng, 61);
    Model m2 = b.engine(DType::f32, 2);
    const std::vector<float> a1 = prefill(m2, text), a2 = prefill(m2, text);
    EXPECT_EQ(a1, a2) << "same model, two sequences: bitwise equal";
    Model m2b = b.engine(DType::f32, 2);
    EXPECT_EQ(prefill(m2b, text), a1) << "two loads: bitwise equal";
    EXPECT_EQ(stepwise(m2, text), stepwise(m2b, text)) << "decode: bitwise equal";
    Model m1 = b.engine(DType::f32, 1);
    const std::vector<float> s1 = prefill(m1, text);
    const Diff d = diff(s1, a1);
    const double tol = kSelfRelF32 * d.max_abs;
    EXPECT_TRUE(within(d, tol, b.V())) << "threads=1 vs threads=2";
    // Greedy picks agree wherever the top two logits are further apart than the tolerance.
    const size_t V = size_t(b.V());
    for (size_t t = 0; t < text.size(); ++t) {
      std::span<const float> r1(s1.data() + t * V, V), r2(a1.data() + t * V, V);
      std::vector<float> sorted(r2.begin(), r2.end());
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
      if (sorted[0] - sorted[1] > 2 * tol) {
        EXPECT_EQ(argmax(r1), argmax(r2)) << "token " << t;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// d. Errors.

using test::error_of;

TEST(EngineErrors, LoadMissingDirectoryNamesThePath) {
  const std::string dir = (fs::temp_directory_path() / ("ksa_engine_missing_" + std::to_string(::getpid()))).string();
  const std::string msg = error_of([&] { (void)Model::load(dir); });
  EXPECT_NE(msg, test::kNoError);
  EXPECT_NE(msg.find(dir), std::string::npos) << msg;
}

TEST(EngineErrors, ContextLimitLeavesTheSequenceUnchanged) {
  const Case c = cases()[0];  // k=4
  SCOPED_TRACE(describe(c));
  const Built b(c);
  Model m = b.engine(DType::f32, 2, 20);
  EXPECT_EQ(m.max_text_tokens(), 20);
  std::mt19937_64 rng(c.seed + 6);
  const std::vector<int32_t> text = random_text(rng, 20);
  const size_t V = size_t(m.vocab());
  const SeqId id = m.new_sequence();
  m.append(id, std::span(text).first(15), LogitsFor::none, {});
  const std::vector<int32_t> too_many = random_text(rng, 6);
  std::vector<float> buf(too_many.size() * V);
  const std::string msg = error_of([&] { m.append(id, too_many, LogitsFor::all, buf); });
  EXPECT_NE(msg, test::kNoError);
  EXPECT_NE(msg.find("20"), std::string::npos) << "names the limit: " << msg;
  EXPECT_EQ(m.text_tokens(id), 15);
  EXPECT_EQ(m.stream_tokens(id), 15 + 3);
  // Stepwise past the limit too.
  std::vector<float> all(5 * V);
  m.append(id, std::span(text).subspan(15), LogitsFor::all, all);  // exactly at the limit: fine
  EXPECT_EQ(m.text_tokens(id), 20);
  std::vector<float> one(V);
  EXPECT_THROW(m.append(id, std::span(text).first(1), LogitsFor::last, one), Error);
  EXPECT_EQ(m.text_tokens(id), 20);
  // The continuation equals the prefill of all 20 tokens: the failed append changed nothing.
  const std::vector<float> whole = prefill(m, text);
  const std::vector<float> tail(whole.begin() + std::ptrdiff_t(15 * V), whole.end());
  const Diff d = diff(all, tail);
  EXPECT_TRUE(within(d, kSelfRelF32 * d.max_abs, b.V()));
  // A prefill longer than the limit on a fresh sequence also throws and leaves it empty.
  const SeqId id2 = m.new_sequence();
  const std::vector<int32_t> long_text = random_text(rng, 21);
  EXPECT_THROW(m.append(id2, long_text, LogitsFor::none, {}), Error);
  EXPECT_EQ(m.text_tokens(id2), 0);
  EXPECT_EQ(m.stream_tokens(id2), 0);
  std::vector<float> first(V);
  m.append(id2, std::span(text).first(1), LogitsFor::last, first);
  const Diff d1 = diff(first, std::vector<float>(whole.begin(), whole.begin() + std::ptrdiff_t(V)));
  EXPECT_TRUE(within(d1, kSelfRelF32 * d1.max_abs, b.V())) << "first token after a failed prefill";
}

TEST(EngineErrors, BadIdsSizesAndTokens) {
  const Case c = cases()[2];
  SCOPED_TRACE(describe(c));
  const Built b(c);
  Model m = b.engine(DType::f32);
  const size_t V = size_t(m.vocab());
  std::mt19937_64 rng(c.seed + 7);
  const std::vector<int32_t> text = random_text(rng, 9);
  std::vector<float> buf(text.size() * V);
  // Unknown ids, and a released id (ids are never reused).
  EXPECT_THROW(m.append(12345, text, LogitsFor::all, buf), Error);
  EXPECT_THROW((void)m.text_tokens(-1), Error);
  EXPECT_THROW((void)m.stream_tokens(777), Error);
  EXPECT_THROW(m.release(999), Error);
  const SeqId gone = m.new_sequence();
  m.release(gone);
  EXPECT_THROW(m.append(gone, text, LogitsFor::all, buf), Error);
  EXPECT_THROW(m.release(gone), Error);
  const SeqId id = m.new_sequence();
  EXPECT_NE(id, gone);
  // Logits spans of the wrong size.
  std::vector<float> small(text.size() * V - 1), big(text.size() * V + 1), one(V), none;
  EXPECT_THROW(m.append(id, text, LogitsFor::all, small), Error);
  EXPECT_THROW(m.append(id, text, LogitsFor::all, big), Error);
  EXPECT_THROW(m.append(id, text, LogitsFor::all, one), Error);
  EXPECT_THROW(m.append(id, text, LogitsFor::last, buf), Error);
  EXPECT_THROW(m.append(id, text, LogitsFor::none, one), Error);
  EXPECT_THROW(m.append(id, text, LogitsFor::last, none), Error);
  // Token ids outside the vocabulary.
  std::vector<int32_t> bad = text;
  bad[4] = int32_t(m.config().vocab_size);
  EXPECT_THROW(m.append(id, bad, LogitsFor::all, buf), Error);
  bad[4] = -1;
  EXPECT_THROW(m.append(id, bad, LogitsFor::all, buf), Error);
  EXPECT_EQ(m.text_tokens(id), 0);
  // After all of that the sequence still works and matches the reference.
  m.append(id, text, LogitsFor::all, buf);
  const std::vector<double> want = b.ref->logits(text);
  const Diff dn = diff(b.ref->logits_f32(text), want), d = diff(buf, want);
  EXPECT_TRUE(within(d, kNaiveMultiple * dn.max_err + kFloorRel * dn.max_abs, b.V()));
}

}  // namespace
}  // namespace ksa
