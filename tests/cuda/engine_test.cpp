// The CUDA engine (ksa::Model with Device::cuda) against the CPU engine on random checkpoints: prefill,
// step-by-step decode, mixed batches, chunk boundaries and window wrap-around, config variants; greedy text;
// the device sampler against the exact distribution; errors. Skips without a GPU.
//
// Tolerance (bf16): both engines read the same bf16 weights; the CPU engine (bf16 KV cache) keeps its
// activations in fp32 and rounds q, k, v and the attention output to bf16, the CUDA engine in addition
// rounds the inputs of every matrix product (normalised hidden states, attention output, SwiGLU product) to
// bf16: each such rounding moves a value by up to 2^-9 relative, and a few of them per layer pass through
// the residual stream and the norms. The bound is kRelBf16 of max |logit| (16 bf16 steps, 6.3%), and the
// RMS error must stay under kRmsRel of the logits' RMS; the numbers measured on the H200 are printed.
// A wrong window, a lost summary or a wrong position moves logits by far more (see tests/model/engine_test).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine_util.hpp"
#include "gpu_test_util.hpp"
#include "ksa/cuda_dense.hpp"
#include "ksa/error.hpp"
#include "ksa/model.hpp"
#include "ksa/model_writer.hpp"
#include "ksa/pattern.hpp"
#include "test_util.hpp"

namespace ksa {
namespace {

constexpr double kRelBf16 = 16.0 * 0x1p-8;
constexpr double kRmsRel = 0.02;
constexpr int64_t kTextVocab = 512;

struct Variant {
  std::string name;
  int64_t D = 64, Hq = 4, Hkv = 2, k = 4, S = 1;
  double mix = 0.5;
  std::string windows = "[1,2,0,64]";
  std::vector<uint8_t> summary_layers;  // empty: all summary layers
  bool summary_attention = true, summary_layernorm = true, tied = true;
  uint64_t seed = 1;
};

std::vector<Variant> variants() {
  std::vector<Variant> v;
  v.push_back({"D64_gqa2_mix0.5_sumnorm", 64, 4, 2, 4, 1, 0.5, "[1,2,0,64]", {}, true, true, true, 11});
  v.push_back({"D128_gqa4_S2_mix1_untied", 128, 8, 2, 3, 2, 1.0, "[1,0,2,1]", {}, true, false, false, 22});
  v.push_back({"D64_mha_mix0", 64, 4, 4, 4, 2, 0.0, "[2]*2+[0,1]", {}, true, false, true, 33});
  v.push_back({"D128_gqa8_hybrid", 128, 8, 1, 4, 1, 0.5, "[1,1,0,2]", {1, 0, 1, 0}, true, true, false, 44});
  v.push_back({"D64_plain_qwen3", 64, 4, 2, 4, 1, 0.0, "0", {}, false, false, false, 55});
  return v;
}

ModelConfig make_config(const Variant& c) {
  test::TinyModel t;
  t.D = c.D, t.Hq = c.Hq, t.Hkv = c.Hkv, t.k = c.k, t.S = c.S, t.mix = c.mix, t.tied = c.tied;
  t.windows = c.windows, t.summary_layers = c.summary_layers, t.summary_layernorm = c.summary_layernorm;
  t.summary_attention = c.summary_attention;
  return test::tiny_config(t, kTextVocab);
}

struct Pair {
  test::TempDir dir{"cuda_engine"};
  Model cpu, gpu;
  static Model load(const std::string& d, Device dev, int64_t max_text = 0) {
    ModelOptions o;
    o.device = dev;
    o.max_text_tokens = max_text;
    o.threads = 2;
    o.kv_dtype = DType::bf16;
    return Model::load(d, o);
  }
  explicit Pair(const Variant& v, int64_t max_text = 0)
      : cpu(make(v, dir.str(), Device::cpu, max_text)), gpu(load(dir.str(), Device::cuda, max_text)) {}
  static Model make(const Variant& v, const std::string& d, Device dev, int64_t max_text) {
    RandomModelOptions o;
    o.seed = v.seed;
    write_random_model(make_config(v), d, o);
    return load(d, dev, max_text);
  }
};

std::vector<int32_t> random_text(std::mt19937_64& rng, int64_t n) { return test::random_text(rng, n, kTextVocab); }
using test::prefill;
using test::stepwise;

struct Err {
  double max_err = 0, max_abs = 0, rms_err = 0, rms = 0;
  bool finite = true;
};
Err compare(const std::vector<float>& got, const std::vector<float>& want) {
  Err e;
  if (got.size() != want.size() || got.empty()) {
    e.finite = false;
    return e;
  }
  double se = 0, sw = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(want[i])) e.finite = false;
    const double d = std::abs(double(got[i]) - want[i]);
    e.max_err = std::max(e.max_err, d);
    e.max_abs = std::max(e.max_abs, std::abs(double(want[i])));
    se += d * d;
    sw += double(want[i]) * want[i];
  }
  e.rms_err = std::sqrt(se / double(got.size()));
  e.rms = std::sqrt(sw / double(got.size()));
  return e;
}
::testing::AssertionResult close(const Err& e) {
  if (e.finite && e.max_err <= kRelBf16 * e.max_abs && e.rms_err <= kRmsRel * e.rms)
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max |gpu-cpu| " << e.max_err << " (" << e.max_err / e.max_abs
                                       << " of max |logit|, bound " << kRelBf16 << "), rms err " << e.rms_err << " ("
                                       << e.rms_err / e.rms << " of rms, bound " << kRmsRel << ")"
                                       << (e.finite ? "" : ", non-finite values or size mismatch");
}
void report(const char* what, const std::string& name, const Err& e) {
  std::printf("[cuda engine] %-10s %-28s max %.3g of max|logit|, rms %.3g of rms\n", what, name.c_str(),
              e.max_err / std::max(e.max_abs, 1e-30), e.rms_err / std::max(e.rms, 1e-30));
}

TEST(CudaEngine, PrefillAndDecodeMatchTheCpuEngine) {
  REQUIRE_GPU();
  for (const Variant& v : variants()) {
    SCOPED_TRACE(v.name);
    Pair p(v);
    std::mt19937_64 rng(v.seed);
    for (int64_t T : {int64_t(1), v.k - 1, v.k, v.k + 1, int64_t(61), int64_t(203)}) {
      SCOPED_TRACE("T=" + std::to_string(T));
      const std::vector<int32_t> text = random_text(rng, T);
      const Err e = compare(prefill(p.gpu, text), prefill(p.cpu, text));
      EXPECT_TRUE(close(e)) << "prefill";
      if (T == 203) report("prefill", v.name, e);
    }
    // Decode one token at a time across many chunk boundaries and ring wrap-arounds (W <= 2 chunks).
    const std::vector<int32_t> text = random_text(rng, 150);
    const Err e = compare(stepwise(p.gpu, text), stepwise(p.cpu, text));
    EXPECT_TRUE(close(e)) << "step by step";
    report("decode", v.name, e);
  }
}

// A prompt run in prefill pieces (ModelOptions::prefill_tokens: 7 and 24 text tokens, so that pieces end
// inside and at the ends of chunks, and W-chunk windows span several pieces), then a continuation of 150
// tokens (more than one decode step takes: prefill pieces attending over the cache), then single tokens:
// every logit against the CPU engine (same tolerance as a whole prefill), and the pieces' GPU logits against
// the GPU's one-piece prefill of the same text.
TEST(CudaEngine, PrefillPiecesMatchTheCpuEngine) {
  REQUIRE_GPU();
  for (size_t vi : {size_t(0), size_t(1), size_t(3), size_t(4)}) {
    const Variant v = variants()[vi];
    SCOPED_TRACE(v.name);
    Pair p(v);
    std::mt19937_64 rng(v.seed + 5);
    const std::vector<int32_t> prompt = random_text(rng, 203), more = random_text(rng, 150), tail = random_text(rng, 9);
    auto run = [&](Model& m) {
      const SeqId id = m.new_sequence();
      std::vector<float> all, lg;
      for (std::span<const int32_t> part : {std::span<const int32_t>(prompt), std::span<const int32_t>(more)}) {
        lg.resize(part.size() * size_t(m.vocab()));
        m.append(id, part, LogitsFor::all, lg);
        all.insert(all.end(), lg.begin(), lg.end());
      }
      lg.resize(size_t(m.vocab()));
      for (int32_t t : tail) {
        m.append(id, std::span<const int32_t>(&t, 1), LogitsFor::last, lg);
        all.insert(all.end(), lg.begin(), lg.end());
      }
      m.release(id);
      return all;
    };
    const std::vector<float> want = run(p.cpu), whole = run(p.gpu);
    for (int64_t piece : {int64_t(7), int64_t(24)}) {
      ModelOptions o;
      o.device = Device::cuda;
      o.threads = 2;
      o.prefill_tokens = piece;
      Model g = Model::load(p.dir.str(), o);
      const std::vector<float> got = run(g);
      const Err e = compare(got, want), ew = compare(got, whole);
      EXPECT_TRUE(close(e)) << "pieces of " << piece << " vs the CPU engine";
      EXPECT_TRUE(close(ew)) << "pieces of " << piece << " vs one GPU prefill";
      report("pieces", v.name + " /" + std::to_string(piece), e);
    }
  }
}

// The same sequences alone and inside a mixed batch (prompt chunks, single tokens, a sequence joining late,
// one released mid-way) give the same logits on the GPU (the batch changes only the rows of the products).
// Run twice: with every layer storing summaries, and with a context of 250 where layer 3 (W*k = 256 >= 250)
// keeps one chunk's summaries only, so that multi-token pieces are split at chunk ends.
class CudaEngineBatch : public ::testing::TestWithParam<int64_t> {};
TEST_P(CudaEngineBatch, MixedBatchEqualsSequencesAlone) {
  REQUIRE_GPU();
  const int64_t ctx = GetParam();
  const Variant v = variants()[ctx > 0 ? 0 : 1];
  Pair p(v, ctx);
  Model& m = p.gpu;
  std::mt19937_64 rng(7);
  const size_t V = size_t(m.vocab());
  std::vector<std::vector<int32_t>> texts;
  for (int64_t n : {240, 77, 140, 33}) texts.push_back(random_text(rng, n));
  std::vector<std::vector<float>> alone;
  for (const auto& t : texts) alone.push_back(stepwise(m, t));  // continuation path throughout
  std::vector<std::vector<float>> got(texts.size());
  std::vector<SeqId> ids(texts.size(), -1);
  std::vector<size_t> at(texts.size(), 0);
  for (size_t i = 0; i < texts.size(); ++i) got[i].resize(texts[i].size() * V);
  const SeqId extra = m.new_sequence();  // released mid-way
  const std::vector<int32_t> xt = random_text(rng, 64);
  StepResult r;
  for (int step = 0;; ++step) {
    std::vector<StepItem> items;
    std::vector<size_t> who;
    for (size_t i = 0; i < texts.size(); ++i) {
      if (step < int(i) * 3 || at[i] == texts[i].size()) continue;
      if (ids[i] < 0) ids[i] = m.new_sequence();
      // the first token alone (a fresh one-token prefill, as stepwise does), then pieces of 1..40
      const size_t n = at[i] == 0 ? 1 : std::min(texts[i].size() - at[i], size_t(1 + (step * 7 + i * 13) % 40));
      items.push_back(StepItem{ids[i], std::span(texts[i]).subspan(at[i], n), LogitsFor::all, nullptr, {}});
      who.push_back(i);
    }
    if (step < 10)
      items.push_back(StepItem{extra, std::span(xt).subspan(size_t(step) * 6, 6), LogitsFor::last, nullptr, {}});
    if (step == 10) m.release(extra);
    if (items.empty()) break;
    m.step(items, r);
    for (size_t j = 0; j < who.size(); ++j) {
      const size_t i = who[j];
      const size_t n = items[j].tokens.size();
      std::copy_n(r.logits.begin() + r.logits_row[j] * int64_t(V), n * V, got[i].begin() + int64_t(at[i] * V));
      at[i] += n;
    }
  }
  for (size_t i = 0; i < texts.size(); ++i) {
    const Err e = compare(got[i], alone[i]);
    EXPECT_TRUE(close(e)) << "sequence " << i;
    report("batch", "seq " + std::to_string(i), e);
    m.release(ids[i]);
  }
  EXPECT_EQ(m.kv_bytes_in_use(), 0);
}
INSTANTIATE_TEST_SUITE_P(Contexts, CudaEngineBatch, ::testing::Values(int64_t(0), int64_t(250)));

// CUDA graphs: steps that only continue sequences are replayed from a graph of the whole forward (captured
// the second time a shape runs). Replays must give exactly the logits of eager launches (the same kernels on
// the same inputs; a graph's attend grid has spare CTAs that return at once): a batch of three decoding
// sequences (steps of 3 to 6 rows as chunks complete) over 300 steps, past window wrap-around and past plans
// that outgrow a graph's attend capacity (a power of two of work units: captured anew), then a single
// sequence after the others are released.
TEST(CudaEngine, GraphReplaysEqualEagerLaunches) {
  REQUIRE_GPU();
  for (size_t vi : {size_t(0), size_t(3)}) {
    const Variant v = variants()[vi];
    Pair p(v);
    ModelOptions o;
    o.device = Device::cuda;
    o.threads = 2;
    o.cuda_graphs = false;
    Model eager = Model::load(p.dir.str(), o);
    Model& graphs = p.gpu;
    std::mt19937_64 rng(13);
    std::vector<std::vector<int32_t>> prompts;
    for (int64_t n : {50, 170, 9}) prompts.push_back(random_text(rng, n));
    std::vector<SeqId> ig, ie;
    for (const auto& pr : prompts) {
      ig.push_back(graphs.new_sequence());
      ie.push_back(eager.new_sequence());
      std::vector<float> a(size_t(graphs.vocab())), b(a.size());
      graphs.append(ig.back(), pr, LogitsFor::last, a);
      eager.append(ie.back(), pr, LogitsFor::last, b);
      EXPECT_EQ(a, b);
    }
    const std::vector<int32_t> toks = random_text(rng, 3 * 300 + 100);
    size_t next = 0, mismatched = 0;
    double worst = 0;
    StepResult rg, re;
    for (int step = 0; step < 400; ++step) {
      if (step == 300) {  // one sequence goes on alone
        for (size_t i = 1; i < ig.size(); ++i) graphs.release(ig[i]), eager.release(ie[i]);
        ig.resize(1), ie.resize(1);
      }
      std::vector<StepItem> sg, se;
      for (size_t i = 0; i < ig.size(); ++i, ++next) {
        const std::span<const int32_t> t(&toks[next % toks.size()], 1);
        sg.push_back(StepItem{ig[i], t, LogitsFor::last, nullptr, {}});
        se.push_back(StepItem{ie[i], t, LogitsFor::last, nullptr, {}});
      }
      graphs.step(sg, rg);
      eager.step(se, re);
      if (rg.logits != re.logits) {
        ++mismatched;
        for (size_t j = 0; j < rg.logits.size(); ++j)
          worst = std::max(worst, double(std::abs(rg.logits[j] - re.logits[j])));
      }
    }
    std::printf(
        "[cuda engine] %s: %lld of 400 steps replayed, %lld graphs captured; %zu steps differ from eager "
        "(max |diff| %g)\n",
        v.name.c_str(), (long long)graphs.graph_replays(), (long long)graphs.graph_captures(), mismatched, worst);
    EXPECT_EQ(mismatched, 0u) << v.name;
    EXPECT_GT(graphs.graph_replays(), 300) << v.name;
    EXPECT_EQ(eager.graph_replays() + eager.graph_captures(), 0) << v.name;
    // Every step is accounted for: 3 prompts (eager), 400 steps replayed, eager at a shape's first sight or
    // captured; every capture has a cause.
    const GraphStats gs = graphs.graph_stats();
    std::printf("[cuda engine] %s: captures: %lld new shapes, %lld arena, %lld plan workspace, %lld work units, "
                "%lld other slot; eager: %lld first sight, %lld prompt\n",
                v.name.c_str(), (long long)gs.new_shape, (long long)gs.arena_moved, (long long)gs.plans_moved,
                (long long)gs.over_units, (long long)gs.other_slot, (long long)gs.eager_first,
                (long long)gs.eager_prompt);
    EXPECT_EQ(gs.replays, graphs.graph_replays()) << v.name;
    EXPECT_EQ(gs.captures, graphs.graph_captures()) << v.name;
    EXPECT_EQ(gs.captures, gs.new_shape + gs.arena_moved + gs.plans_moved + gs.over_units + gs.other_slot) << v.name;
    EXPECT_EQ(gs.eager_prompt, 3) << v.name;
    EXPECT_EQ(gs.replays + gs.captures + gs.eager_first, 400) << v.name;
    EXPECT_GE(gs.new_shape, 2) << v.name;  // steps of 3 sequences, then of one
    const GraphStats ge = eager.graph_stats();
    EXPECT_EQ(ge.replays + ge.captures + ge.eager_first + ge.eager_prompt, 0) << v.name;
  }
}

// Planning ahead (ModelOptions::cuda_plan_ahead): the decode plans made during step t for step t+1 are
// the plans step t+1 would make itself, and a step that is not the one planned (a sequence joins, one is
// released, a continuation of several tokens, a step at the context limit) drops them without a trace. Three
// engines on one checkpoint run the same steps — planning at each step (graphs on), planning ahead with
// graphs, planning ahead without graphs — and must give the same logits and sampled tokens at every step,
// bit for bit (the same kernels over the same plans), with the plans made ahead used at most steps.
TEST(CudaEngine, PlanningAheadEqualsPlanningEachStep) {
  REQUIRE_GPU();
  for (size_t vi : {size_t(0), size_t(3)}) {
    const Variant v = variants()[vi];
    test::TempDir dir{"cuda_ahead"};
    RandomModelOptions ro;
    ro.seed = v.seed;
    write_random_model(make_config(v), dir.str(), ro);
    constexpr int64_t kMaxText = 400;
    auto load = [&](bool graphs, bool ahead) {
      ModelOptions o;
      o.device = Device::cuda;
      o.max_text_tokens = kMaxText;
      o.cuda_graphs = graphs;
      o.cuda_plan_ahead = ahead;
      return Model::load(dir.str(), o);
    };
    Model m[3] = {load(true, false), load(true, true), load(false, true)};
    std::mt19937_64 rng(17);
    const std::vector<int32_t> toks = random_text(rng, 4096);
    size_t next = 0;
    auto take = [&](size_t n) {
      if (next + n > toks.size()) next = 0;
      const std::span<const int32_t> t(&toks[next], n);
      next += n;
      return t;
    };
    std::vector<std::vector<SeqId>> ids(3);
    std::vector<int64_t> len;  // text tokens per live sequence
    auto start = [&](int64_t n, std::vector<StepItem> (&items)[3]) {
      const std::span<const int32_t> t = take(size_t(n));
      for (int e = 0; e < 3; ++e) {
        ids[e].push_back(m[e].new_sequence());
        items[e].push_back(StepItem{ids[e].back(), t, LogitsFor::last, nullptr, {}});
      }
      len.push_back(n);
    };
    auto release = [&](size_t i) {
      for (int e = 0; e < 3; ++e) {
        m[e].release(ids[e][i]);
        ids[e].erase(ids[e].begin() + std::ptrdiff_t(i));
      }
      len.erase(len.begin() + std::ptrdiff_t(i));
    };
    SamplerConfig sc;
    sc.temperature = 0.9f;
    sc.top_p = 0.95f;
    sc.seed = 5;
    size_t steps_differ = 0;
    int64_t steps = 0;
    SeqId pid[3] = {-1, -1, -1};
    int64_t used_before_pieces = 0, used_during_pieces = 0;
    for (int64_t n : {50, 170, 9}) {  // the prompts, each its own step
      std::vector<StepItem> items[3];
      start(n, items);
      StepResult r[3];
      for (int e = 0; e < 3; ++e) m[e].step(items[e], r[e]);
      steps_differ += r[1].logits != r[0].logits || r[2].logits != r[0].logits;
    }
    for (int step = 0; step < 320; ++step) {
      std::vector<StepItem> items[3];
      for (size_t i = len.size(); i-- > 0;)
        if (len[i] >= kMaxText) release(i);  // at its context limit (the plans made ahead for it were refused)
      if (step == 120) release(0);
      const bool sample = step % 2 == 0;
      for (size_t i = 0; i < len.size(); ++i) {
        const size_t n = (step == 80 && i == 0) ? 3 : 1;  // a continuation of several tokens
        const std::span<const int32_t> t = take(n);
        len[i] += int64_t(n);
        for (int e = 0; e < 3; ++e)
          items[e].push_back(StepItem{ids[e][i], t, sample ? LogitsFor::none : LogitsFor::last,
                                      sample ? &sc : nullptr, {}});
      }
      if (step == 40 || step == 200) start(30, items);  // a sequence joins mid-run
      // 260..262: a prompt in three pieces of 130 tokens (each over the decode's 128: the prefill kernel)
      // beside the decoding sequences, as `ksa serve` runs one; only the last returns logits. The steps after
      // the first two pieces are the ones planned ahead (the prompt's next piece needs no decode plan), and
      // after the last one the prompt's sequence decodes with the others.
      if (step == 260)
        for (int e = 0; e < 3; ++e) pid[e] = m[e].new_sequence();
      if (step >= 260 && step <= 262) {
        const std::span<const int32_t> t = take(130);
        for (int e = 0; e < 3; ++e)
          items[e].push_back(StepItem{pid[e], t, step == 262 ? LogitsFor::last : LogitsFor::none, nullptr, {}});
      }
      if (step == 261) used_before_pieces = m[1].plans_ahead_used();
      if (step == 250)  // a step without logits or samples (nothing is planned ahead after it)
        for (int e = 0; e < 3; ++e)
          for (StepItem& it : items[e]) it.logits = LogitsFor::none, it.sampler = nullptr;
      StepResult r[3];
      for (int e = 0; e < 3; ++e) m[e].step(items[e], r[e]);
      ++steps;
      if (step == 262) {
        for (int e = 0; e < 3; ++e) ids[e].push_back(pid[e]);
        len.push_back(390);
      }
      if (step == 263) used_during_pieces = m[1].plans_ahead_used() - used_before_pieces;
      if (r[1].logits != r[0].logits || r[2].logits != r[0].logits || r[1].next != r[0].next ||
          r[2].next != r[0].next)
        ++steps_differ;
    }
    std::printf("[cuda engine] %s: plans made ahead used at %lld of %lld steps, dropped %lld times (ahead + graphs); "
                "%lld / %lld without graphs; %zu steps differ\n",
                v.name.c_str(), (long long)m[1].plans_ahead_used(), (long long)steps,
                (long long)m[1].plans_ahead_dropped(), (long long)m[2].plans_ahead_used(),
                (long long)m[2].plans_ahead_dropped(), steps_differ);
    EXPECT_EQ(steps_differ, 0u) << v.name;
    EXPECT_GT(m[1].plans_ahead_used(), 250) << v.name;
    EXPECT_GE(m[1].plans_ahead_dropped(), 4) << v.name;  // the joins, the release, the 3-token step
    EXPECT_EQ(used_during_pieces, 3) << v.name << ": steps 261-263 (beside a prompt's pieces) not planned ahead";
    EXPECT_EQ(m[0].plans_ahead_used() + m[0].plans_ahead_dropped(), 0) << v.name;
    EXPECT_GT(m[1].graph_replays(), 250) << v.name;
    while (!len.empty()) release(0);
    for (int e = 0; e < 3; ++e) EXPECT_EQ(m[e].kv_bytes_in_use(), 0) << v.name << " engine " << e;
  }
}

// Greedy generation against the CPU engine. A step is a near tie when the CPU's top two logits are closer
// than twice the largest |gpu - cpu| logit difference of that step: only there can the two argmaxes differ
// (each logit moved by at most that difference). Both engines are fed the CPU's greedy text (so that one
// near tie does not end the comparison); at every step that is not a near tie the GPU's argmax must be the
// CPU's, and at least 64 such steps must occur. Free-running, the GPU's own greedy text equals the CPU's up
// to the first near tie (printed).
TEST(CudaEngine, GreedyTextEqualsTheCpuEngine) {
  REQUIRE_GPU();
  const Variant v = variants()[0];
  Pair p(v);
  std::mt19937_64 rng(5);
  const std::vector<int32_t> prompt = random_text(rng, 37);
  const SeqId a = p.cpu.new_sequence(), b = p.gpu.new_sequence();
  std::vector<float> la(size_t(p.cpu.vocab())), lb(la.size());
  p.cpu.append(a, prompt, LogitsFor::last, la);
  p.gpu.append(b, prompt, LogitsFor::last, lb);
  int clear = 0, ties = 0, first_tie = -1;
  for (int i = 0; i < 128; ++i) {
    double diff = 0;
    for (size_t j = 0; j < la.size(); ++j) diff = std::max(diff, double(std::abs(la[j] - lb[j])));
    std::vector<float> sorted(la);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    const int32_t ta = int32_t(std::max_element(la.begin(), la.end()) - la.begin());
    const int32_t tb = int32_t(std::max_element(lb.begin(), lb.end()) - lb.begin());
    if (double(sorted[0]) - sorted[1] < 2 * diff) {
      ++ties;
      if (first_tie < 0) first_tie = i;
    } else {
      ++clear;
      EXPECT_EQ(tb, ta) << "token " << i << ": margin " << sorted[0] - sorted[1] << " > 2 x max diff " << diff;
    }
    p.cpu.append(a, std::span<const int32_t>(&ta, 1), LogitsFor::last, la);
    p.gpu.append(b, std::span<const int32_t>(&ta, 1), LogitsFor::last, lb);
  }
  std::printf(
      "[cuda engine] greedy: %d of 128 steps clear of a near tie, all equal; %d near ties; the free-running "
      "texts are identical at least up to token %d (the first near tie)\n",
      clear, ties, first_tie < 0 ? 128 : first_tie);
  EXPECT_GE(clear, 64);
}

// Element `at` of a product's output downloaded as raw bytes (fp32 or bf16).
double output_at(const std::vector<uint8_t>& raw, size_t at, DType dt) {
  if (dt == DType::f32) {
    float f;
    std::memcpy(&f, raw.data() + at * 4, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, raw.data() + at * 2, 2);
  return bf16::to_float(h);
}

// Products of at most kGemvMaxM rows run ksa's own GEMV kernel; against a double-precision product on the
// host (the same bf16 inputs), every output within 1e-5 of sum_k |x w| (fp32 sums of up to ~10K terms in two
// different orders) plus, for bf16 outputs, half a bf16 unit in the last place; M = 9, 64 and 72 (cuBLASLt) as
// a control, each with cuBLASLt's first choice and autotuned (Gemm's autotune: the fastest of its candidates).
// Shapes: K from one 16-byte chunk to 9728 (not a multiple of the warp's stride), odd N, an output row stride.
TEST(CudaEngine, SmallMProductsMatchTheHostProduct) {
  REQUIRE_GPU();
  std::mt19937_64 rng(17);
  std::normal_distribution<float> nd(0.f, 1.f);
  struct Case {
    int64_t M, K, N, ldy;
    DType y;
  };
  for (const Case c :
       {Case{1, 2560, 6144, 0, DType::f32}, Case{1, 9728, 2561, 0, DType::f32}, Case{3, 8, 5, 7, DType::f32},
        Case{8, 2568, 1001, 1003, DType::bf16}, Case{5, 4096, 33, 0, DType::bf16}, Case{2, 776, 151, 0, DType::f32},
        Case{9, 1024, 300, 0, DType::f32}, Case{1, 264, 40001, 0, DType::bf16}, Case{64, 2560, 2560, 0, DType::f32},
        Case{72, 2560, 6144, 0, DType::bf16}}) {
    SCOPED_TRACE("M " + std::to_string(c.M) + " K " + std::to_string(c.K) + " N " + std::to_string(c.N));
    const int64_t ldy = c.ldy ? c.ldy : c.N;
    std::vector<uint16_t> x(size_t(c.M * c.K)), w(size_t(c.N * c.K));
    for (auto& v : x) v = bf16::from_float(nd(rng));
    for (auto& v : w) v = bf16::from_float(nd(rng));
    test::DevMem dx(x.size() * 2), dw(w.size() * 2), dy(size_t(c.M * ldy) * 4);
    ASSERT_TRUE(dx.p && dw.p && dy.p);
    CK(cudaMemcpy(dx.p, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw.p, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    // Batch 1: every block shape of the thin kernel (ksa bench-gemm --gemv-shape; 0 is the engine's). Over 8
    // rows (cuBLASLt): first choice (0) and autotuned (1).
    const int variants = c.M == 1 ? cuda::Gemm::gemv_shapes() : c.M > 8 ? 2 : 1;
    for (int var = 0; var < variants; ++var) {
      const bool tune = c.M > 8 && var == 1;
      const int shape = c.M == 1 ? var : 0;
      SCOPED_TRACE(tune ? std::string("autotuned") : "gemv shape " + std::to_string(shape));
      CK(cudaMemset(dy.p, 0, size_t(c.M * ldy) * 4));
      {
        cuda::Gemm g(nullptr, true, tune);
        g.set_gemv_shape(shape);
        g.run(dx.p, c.M, c.K, dw.p, c.N, dy.p, c.y, c.ldy);
        // One class timed, cuBLASLt offering more than one candidate for these shapes.
        EXPECT_EQ(g.tuned_classes(), tune ? 1 : 0);
      }
      CK(cudaDeviceSynchronize());
      const size_t es = c.y == DType::f32 ? 4 : 2;
      std::vector<uint8_t> raw(size_t(c.M * ldy) * es);
      CK(cudaMemcpy(raw.data(), dy.p, raw.size(), cudaMemcpyDeviceToHost));
      int64_t bad = 0;
      for (int64_t m = 0; m < c.M; ++m)
        for (int64_t n = 0; n < c.N; ++n) {
          double ref = 0, mag = 0;
          for (int64_t k = 0; k < c.K; ++k) {
            const double p = double(bf16::to_float(x[size_t(m * c.K + k)])) * bf16::to_float(w[size_t(n * c.K + k)]);
            ref += p;
            mag += std::abs(p);
          }
          const double got = output_at(raw, size_t(m * ldy + n), c.y);
          const double tol = 1e-5 * mag + (c.y == DType::bf16 ? std::abs(ref) * 0x1p-8 : 0.0);
          if (!(std::abs(got - ref) <= tol) && bad++ < 5)
            ADD_FAILURE() << "y[" << m << ", " << n << "] = " << got << ", host " << ref << " (tol " << tol << ")";
        }
      EXPECT_EQ(bad, 0);
    }
  }
}

// The GLU form of the thin kernel (gate|up in one product, SwiGLU in its epilogue: Gemm::run_swiglu), every
// block shape at batch 1, against silu(x·gate)·(x·up) in double precision on the host, within 1e-5 of the
// sums' magnitudes (as above, through silu's derivative, at most 1.1) plus a bf16 half-unit of the result.
// I = 12001: more blocks than the device holds at once, an odd tail.
TEST(CudaEngine, SmallMSwigluMatchesTheHost) {
  REQUIRE_GPU();
  std::mt19937_64 rng(23);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const auto [M, K, I] : {std::array<int64_t, 3>{1, 2560, 12001}, std::array<int64_t, 3>{3, 776, 301}}) {
    SCOPED_TRACE("M " + std::to_string(M) + " K " + std::to_string(K) + " I " + std::to_string(I));
    std::vector<uint16_t> x(size_t(M * K)), w(size_t(2 * I * K));
    for (auto& v : x) v = bf16::from_float(nd(rng) * 0.25f);
    for (auto& v : w) v = bf16::from_float(nd(rng) * 0.25f);
    test::DevMem dx(x.size() * 2), dw(w.size() * 2), dy(size_t(M * I) * 2);
    ASSERT_TRUE(dx.p && dw.p && dy.p);
    CK(cudaMemcpy(dx.p, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw.p, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    for (int shape = 0; shape < (M == 1 ? cuda::Gemm::gemv_shapes() : 1); ++shape) {
      SCOPED_TRACE("gemv shape " + std::to_string(shape));
      CK(cudaMemset(dy.p, 0, size_t(M * I) * 2));
      {
        cuda::Gemm g(nullptr);
        g.set_gemv_shape(shape);
        ASSERT_TRUE(g.swiglu_fits(dx.p, M, K, dw.p, I));
        g.run_swiglu(dx.p, M, K, dw.p, I, dy.p);
      }
      CK(cudaDeviceSynchronize());
      std::vector<uint16_t> got(size_t(M * I));
      CK(cudaMemcpy(got.data(), dy.p, got.size() * 2, cudaMemcpyDeviceToHost));
      int64_t bad = 0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < I; ++n) {
          double gsum = 0, usum = 0, gmag = 0, umag = 0;
          for (int64_t k = 0; k < K; ++k) {
            const double xv = bf16::to_float(x[size_t(m * K + k)]);
            const double pg = xv * bf16::to_float(w[size_t(n * K + k)]);
            const double pu = xv * bf16::to_float(w[size_t((I + n) * K + k)]);
            gsum += pg, usum += pu, gmag += std::abs(pg), umag += std::abs(pu);
          }
          const double silu = gsum / (1 + std::exp(-gsum)), ref = silu * usum;
          const double tol = 1e-5 * (1.1 * gmag * std::abs(usum) + std::abs(silu) * umag) + std::abs(ref) * 0x1p-8;
          const double v = bf16::to_float(got[size_t(m * I + n)]);
          if (!(std::abs(v - ref) <= tol) && bad++ < 5)
            ADD_FAILURE() << "y[" << m << ", " << n << "] = " << v << ", host " << ref << " (tol " << tol << ")";
        }
      EXPECT_EQ(bad, 0);
    }
  }
}

// The decode layer's joined ops (Gemm::run_norm, run_add): the normed thin product (every block normalises
// the fp32 rows itself, as rms_norm() does) must equal rms_norm() into bf16 rows and then run() / run_swiglu()
// bit for bit (the same sums in the same order), and the host's double-precision product of the host-normed
// rows within 1e-5 of the sums' magnitudes plus half a bf16 unit of each normed element (a rounding that
// falls the other way on the host) and, for bf16 outputs, of the result. run_add must equal run() into fp32
// and add() bit for bit on the thin kernel; M = 9 (cuBLASLt with beta = 1) within 1e-5 of the magnitudes.
// More groups of rows than the persistent grid holds (N = 12001), M up to 8, K from 776 to 4096 (rms_norm's
// longest one-pass row).
TEST(CudaEngine, SmallMNormedProductsAndAddMatchTheHost) {
  REQUIRE_GPU();
  std::mt19937_64 rng(31);
  std::normal_distribution<float> nd(0.f, 1.f);
  const float eps = 1e-6f;
  struct Case {
    int64_t M, K, N;
    int mode;  // 0: fp32 out, 1: bf16 out, 2: GLU (N = I)
  };
  for (const Case c : {Case{1, 2560, 6144, 0}, Case{1, 2560, 12001, 2}, Case{3, 776, 301, 1}, Case{8, 2560, 1001, 0},
                       Case{2, 2560, 9728, 2}, Case{4, 4096, 257, 2}}) {
    SCOPED_TRACE("M " + std::to_string(c.M) + " K " + std::to_string(c.K) + " N " + std::to_string(c.N) + " mode " +
                 std::to_string(c.mode));
    const bool glu = c.mode == 2;
    const DType ydt = c.mode == 0 ? DType::f32 : DType::bf16;
    const int64_t WN = glu ? 2 * c.N : c.N, es = ydt == DType::f32 ? 4 : 2;
    std::vector<float> x(size_t(c.M * c.K));
    std::vector<uint16_t> nw(size_t(c.K)), w(size_t(WN * c.K));
    for (auto& v : x) v = nd(rng) * 3.f;
    for (auto& v : nw) v = bf16::from_float(1.f + 0.25f * nd(rng));
    for (auto& v : w) v = bf16::from_float(nd(rng) * 0.25f);
    test::DevMem dx(x.size() * 4), dnw(nw.size() * 2), dw(w.size() * 2), dh(x.size() * 2), dy(size_t(c.M * c.N) * 4),
        dref(size_t(c.M * c.N) * 4);
    ASSERT_TRUE(dx.p && dnw.p && dw.p && dh.p && dy.p && dref.p);
    CK(cudaMemcpy(dx.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dnw.p, nw.data(), nw.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw.p, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    {
      cuda::Gemm g(nullptr);
      ASSERT_TRUE(g.norm_fits(static_cast<const float*>(dx.p), c.M, c.K, dw.p, WN));
      g.run_norm(static_cast<const float*>(dx.p), c.M, c.K, dnw.p, eps, dw.p, c.N, dy.p, ydt, c.N, glu);
      cuda::rms_norm(static_cast<const float*>(dx.p), c.M, c.K, dnw.p, nullptr, nullptr, eps, dh.p, nullptr);
      if (glu) g.run_swiglu(dh.p, c.M, c.K, dw.p, c.N, dref.p);
      else g.run(dh.p, c.M, c.K, dw.p, c.N, dref.p, ydt);
    }
    CK(cudaDeviceSynchronize());
    std::vector<uint8_t> got(size_t(c.M * c.N * es)), ref(got.size());
    CK(cudaMemcpy(got.data(), dy.p, got.size(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(ref.data(), dref.p, ref.size(), cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::memcmp(got.data(), ref.data(), got.size()), 0) << "normed product != rms_norm + product";
    int64_t bad = 0;
    for (int64_t m = 0; m < c.M; ++m) {
      double ss = 0;
      for (int64_t k = 0; k < c.K; ++k) ss += double(x[size_t(m * c.K + k)]) * x[size_t(m * c.K + k)];
      const double inv = 1 / std::sqrt(ss / double(c.K) + eps);
      std::vector<double> h(size_t(c.K));
      for (int64_t k = 0; k < c.K; ++k)
        h[size_t(k)] =
            bf16::to_float(bf16::from_float(float(x[size_t(m * c.K + k)] * inv * bf16::to_float(nw[size_t(k)]))));
      for (int64_t n = 0; n < c.N; ++n) {
        auto dot = [&](int64_t row, double& mag) {
          double s = 0;
          mag = 0;
          for (int64_t k = 0; k < c.K; ++k) {
            const double p = h[size_t(k)] * bf16::to_float(w[size_t(row * c.K + k)]);
            s += p, mag += std::abs(p);
          }
          return s;
        };
        double gmag, ref_v, tol;
        const double gs = dot(n, gmag);
        if (glu) {
          double umag;
          const double us = dot(c.N + n, umag), silu = gs / (1 + std::exp(-gs));
          ref_v = silu * us;
          tol = (1e-5 + 0x1p-8) * (1.1 * gmag * std::abs(us) + std::abs(silu) * umag) + std::abs(ref_v) * 0x1p-8;
        } else {
          ref_v = gs;
          tol = (1e-5 + 0x1p-8) * gmag + (ydt == DType::bf16 ? std::abs(ref_v) * 0x1p-8 : 0.0);
        }
        const double v = output_at(got, size_t(m * c.N + n), ydt);
        if (!(std::abs(v - ref_v) <= tol) && bad++ < 5)
          ADD_FAILURE() << "y[" << m << ", " << n << "] = " << v << ", host " << ref_v << " (tol " << tol << ")";
      }
    }
    EXPECT_EQ(bad, 0);
  }
  // run_add: y += x W^T on the thin kernel (M <= 8) and through cuBLASLt (M = 9).
  for (const auto [M, K, N] : {std::array<int64_t, 3>{1, 4096, 2560}, std::array<int64_t, 3>{5, 9728, 2561},
                               std::array<int64_t, 3>{9, 1024, 300}}) {
    SCOPED_TRACE("add: M " + std::to_string(M) + " K " + std::to_string(K) + " N " + std::to_string(N));
    std::vector<uint16_t> a(size_t(M * K)), w(size_t(N * K));
    std::vector<float> y0(size_t(M * N));
    for (auto& v : a) v = bf16::from_float(nd(rng));
    for (auto& v : w) v = bf16::from_float(nd(rng) * 0.25f);
    for (auto& v : y0) v = nd(rng) * 10.f;
    test::DevMem da(a.size() * 2), dw(w.size() * 2), dy(y0.size() * 4), dref(y0.size() * 4), dt(y0.size() * 4);
    ASSERT_TRUE(da.p && dw.p && dy.p && dref.p && dt.p);
    CK(cudaMemcpy(da.p, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw.p, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dy.p, y0.data(), y0.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dref.p, y0.data(), y0.size() * 4, cudaMemcpyHostToDevice));
    {
      cuda::Gemm g(nullptr);
      g.run_add(da.p, M, K, dw.p, N, static_cast<float*>(dy.p));
      g.run(da.p, M, K, dw.p, N, dt.p, DType::f32);
      cuda::add(static_cast<float*>(dref.p), static_cast<const float*>(dt.p), M * N, nullptr);
    }
    CK(cudaDeviceSynchronize());
    std::vector<float> got(y0.size()), ref(y0.size());
    CK(cudaMemcpy(got.data(), dy.p, got.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(ref.data(), dref.p, ref.size() * 4, cudaMemcpyDeviceToHost));
    if (M <= cuda::kGemvMaxM) {
      EXPECT_EQ(std::memcmp(got.data(), ref.data(), got.size() * 4), 0) << "run_add != run + add";
    }
    int64_t bad = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = y0[size_t(m * N + n)], mag = std::abs(s);
        for (int64_t k = 0; k < K; ++k) {
          const double p = double(bf16::to_float(a[size_t(m * K + k)])) * bf16::to_float(w[size_t(n * K + k)]);
          s += p, mag += std::abs(p);
        }
        const double v = got[size_t(m * N + n)];
        if (!(std::abs(v - s) <= 1e-5 * mag) && bad++ < 5)
          ADD_FAILURE() << "y[" << m << ", " << n << "] = " << v << ", host " << s << " (tol " << 1e-5 * mag << ")";
      }
    EXPECT_EQ(bad, 0);
  }
}

// The generic SwiGLU's silu_mul (from fp32 and from bf16 gate|up) and the residual add, on the vector path (16
// bytes per thread: I and count multiples of 4 or 8, 16-byte aligned) and the scalar one (odd sizes, a
// misaligned start): silu_mul within the bf16 rounding of the host's silu(g) * u (expf may differ from the
// host's by an ulp), add bitwise.
TEST(CudaEngine, ElementwiseKernelsMatchTheHost) {
  REQUIRE_GPU();
  std::mt19937_64 rng(29);
  std::normal_distribution<float> nd(0.f, 3.f);
  for (const auto [n, I, off] : {std::array<int64_t, 3>{7, 9728, 0}, std::array<int64_t, 3>{3, 301, 0},
                                  std::array<int64_t, 3>{5, 64, 1}}) {
    SCOPED_TRACE("n " + std::to_string(n) + " I " + std::to_string(I) + " offset " + std::to_string(off));
    std::vector<float> gu(size_t(n * 2 * I + off)), x(size_t(n * I + off)), h(x.size());
    for (auto& v : gu) v = nd(rng);
    for (auto& v : x) v = nd(rng);
    for (auto& v : h) v = nd(rng);
    std::vector<uint16_t> gu16(gu.size());
    for (size_t i = 0; i < gu.size(); ++i) gu16[i] = bf16::from_float(gu[i]);
    test::DevMem dgu(gu.size() * 4), dgu16(gu.size() * 2), dx(x.size() * 4), dh(h.size() * 4),
        dy(size_t(n * I + off) * 2), dy16(size_t(n * I + off) * 2);
    ASSERT_TRUE(dgu.p && dgu16.p && dx.p && dh.p && dy.p && dy16.p);
    CK(cudaMemcpy(dgu.p, gu.data(), gu.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dgu16.p, gu16.data(), gu16.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dx.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dh.p, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    cuda::silu_mul(static_cast<float*>(dgu.p) + off, DType::f32, n, I, static_cast<uint16_t*>(dy.p) + off, nullptr);
    cuda::silu_mul(static_cast<uint16_t*>(dgu16.p) + off, DType::bf16, n, I, static_cast<uint16_t*>(dy16.p) + off,
                   nullptr);
    cuda::add(static_cast<float*>(dx.p) + off, static_cast<float*>(dh.p) + off, n * I, nullptr);
    CK(cudaDeviceSynchronize());
    std::vector<uint16_t> y(size_t(n * I + off)), y16(y.size());
    std::vector<float> xs(x.size());
    CK(cudaMemcpy(y.data(), dy.p, y.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(y16.data(), dy16.p, y16.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(xs.data(), dx.p, xs.size() * 4, cudaMemcpyDeviceToHost));
    int64_t bad = 0;
    // silu(g) * u on the host against the device's bf16 result.
    auto check_silu = [&](const char* what, int64_t r, int64_t c, double g, double u, uint16_t got) {
      const double ref = g / (1 + std::exp(-g)) * u, v = bf16::to_float(got);
      if (!(std::abs(v - ref) <= std::abs(ref) * 0x1p-8 + 1e-30) && bad++ < 5)
        ADD_FAILURE() << what << " [" << r << ", " << c << "] = " << v << ", host " << ref;
    };
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < I; ++c) {
        const size_t gi = size_t(off + r * 2 * I + c), yi = size_t(off + r * I + c);
        check_silu("silu_mul", r, c, gu[gi], gu[gi + size_t(I)], y[yi]);
        check_silu("silu_mul from bf16", r, c, bf16::to_float(gu16[gi]), bf16::to_float(gu16[gi + size_t(I)]), y16[yi]);
        const size_t i = size_t(off + r * I + c);
        if (xs[i] != x[i] + h[i] && bad++ < 5)
          ADD_FAILURE() << "add [" << i << "] = " << xs[i] << ", host " << x[i] + h[i];
      }
    EXPECT_EQ(bad, 0);
  }
}

// The device sampler: stratified draws u = (i + 0.5) / N must reproduce the exact kept distribution
// (computed here on the host with a full sort) to within 1/N per token; greedy = argmax.
TEST(CudaEngine, DeviceSamplerDrawsTheExactDistribution) {
  REQUIRE_GPU();
  const int64_t V = 3001, N = 20000;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<float> logits(static_cast<size_t>(V));
  for (auto& x : logits) x = nd(rng);
  struct Case {
    float temp;
    int32_t top_k;
    float top_p, min_p;
  };
  for (const Case c : {Case{1.f, 0, 1.f, 0.f}, Case{0.7f, 50, 1.f, 0.f}, Case{1.3f, 0, 0.8f, 0.f},
                       Case{1.f, 200, 0.9f, 0.05f}, Case{0.f, 0, 1.f, 0.f}}) {
    SCOPED_TRACE("temp " + std::to_string(c.temp) + " top_k " + std::to_string(c.top_k) + " top_p " +
                 std::to_string(c.top_p) + " min_p " + std::to_string(c.min_p));
    // Host: the kept set and probabilities (sorted walk, as sample_token).
    std::vector<int32_t> idx(static_cast<size_t>(V));
    for (int32_t i = 0; i < V; ++i) idx[size_t(i)] = i;
    std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
    std::vector<double> want(size_t(V), 0.0);
    if (c.temp == 0.f) {
      want[size_t(idx[0])] = 1.0;
    } else {
      const int64_t k = c.top_k > 0 ? c.top_k : V;
      std::vector<double> pr(static_cast<size_t>(k));
      double Z = 0;
      for (int64_t i = 0; i < k; ++i)
        Z += pr[size_t(i)] = std::exp((logits[size_t(idx[size_t(i)])] - logits[size_t(idx[0])]) / c.temp);
      int64_t n = k;
      if (c.top_p < 1.f) {
        double cum = 0;
        for (int64_t i = 0; i < k; ++i)
          if ((cum += pr[size_t(i)] / Z) >= c.top_p) {
            n = i + 1;
            break;
          }
      }
      int64_t keep = 1;
      while (keep < n && pr[size_t(keep)] >= c.min_p) ++keep;
      n = c.min_p > 0.f ? keep : n;
      double tot = 0;
      for (int64_t i = 0; i < n; ++i) tot += pr[size_t(i)];
      for (int64_t i = 0; i < n; ++i) want[size_t(idx[size_t(i)])] = pr[size_t(i)] / tot;
    }
    std::vector<float> rows;
    std::vector<cuda::SampleArgs> args(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) {
      cuda::SampleArgs& a = args[size_t(i)];
      a.row = 0;
      a.temperature = c.temp;
      a.top_k = c.top_k;
      a.top_p = c.top_p;
      a.min_p = c.min_p;
      a.u = (double(i) + 0.5) / double(N);
    }
    test::DevMem dl(size_t(V) * 4), da(args.size() * sizeof(cuda::SampleArgs)), dout(size_t(N) * 4), dp(16);
    CK(cudaMemcpy(dl.p, logits.data(), size_t(V) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(da.p, args.data(), args.size() * sizeof(cuda::SampleArgs), cudaMemcpyHostToDevice));
    cuda::sample_tokens(dl.as<float>(), V, da.as<cuda::SampleArgs>(), N, dp.as<int32_t>(), dout.as<int32_t>(), nullptr);
    CK(cudaDeviceSynchronize());
    std::vector<int32_t> out(static_cast<size_t>(N));
    CK(cudaMemcpy(out.data(), dout.p, size_t(N) * 4, cudaMemcpyDeviceToHost));
    std::vector<double> freq(size_t(V), 0.0);
    for (int32_t t : out) {
      ASSERT_TRUE(t >= 0 && t < V);
      freq[size_t(t)] += 1.0 / double(N);
    }
    double worst = 0;
    for (int64_t i = 0; i < V; ++i) worst = std::max(worst, std::abs(freq[size_t(i)] - want[size_t(i)]));
    EXPECT_LE(worst, 2.0 / double(N) + 1e-6) << "largest |frequency - probability| over the tokens";
  }
  // Greedy among equal largest logits takes the lowest id, wherever the ties sit among the threads' ids.
  for (std::vector<int32_t> tied : {std::vector<int32_t>{2999, 1500, 7}, std::vector<int32_t>{1024, 3000},
                                    std::vector<int32_t>{5, 6}}) {
    std::vector<float> lg(logits);
    for (int32_t t : tied) lg[size_t(t)] = 100.f;
    cuda::SampleArgs a;
    a.temperature = 0.f;
    test::DevMem dl(size_t(V) * 4), da(sizeof a), dout(4), dp(16);
    CK(cudaMemcpy(dl.p, lg.data(), size_t(V) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(da.p, &a, sizeof a, cudaMemcpyHostToDevice));
    cuda::sample_tokens(dl.as<float>(), V, da.as<cuda::SampleArgs>(), 1, dp.as<int32_t>(), dout.as<int32_t>(), nullptr);
    int32_t got = -1;
    CK(cudaMemcpy(&got, dout.p, 4, cudaMemcpyDeviceToHost));
    EXPECT_EQ(got, *std::min_element(tied.begin(), tied.end()));
  }
}

TEST(CudaEngine, ErrorsAreClearAndLeaveOtherSequencesIntact) {
  REQUIRE_GPU();
  Variant v = variants()[0];
  {  // head dim the kernels do not support
    Variant w = v;
    w.D = 32;
    test::TempDir d("cuda_engine_d32");
    RandomModelOptions o;
    write_random_model(make_config(w), d.str(), o);
    ModelOptions mo;
    mo.device = Device::cuda;
    try {
      Model::load(d.str(), mo);
      ADD_FAILURE() << "a head dim of 32 loaded on the CUDA engine";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("D: must be 64 or 128 (got 32)"), std::string::npos) << e.what();
    }
  }
  test::TempDir d("cuda_engine_ctx");
  write_random_model(make_config(v), d.str(), RandomModelOptions{});
  ModelOptions mo;
  mo.device = Device::cuda;
  mo.max_text_tokens = 40;
  Model m = Model::load(d.str(), mo);
  std::mt19937_64 rng(9);
  const std::vector<int32_t> t = random_text(rng, 60);
  const SeqId a = m.new_sequence(), b = m.new_sequence();
  std::vector<float> la(size_t(m.vocab())), lb(la.size());
  m.append(a, std::span(t).first(30), LogitsFor::last, la);
  StepResult r;
  std::vector<StepItem> items = {{a, std::span(t).subspan(30, 20), LogitsFor::last, nullptr, {}},
                                 {b, std::span(t).first(5), LogitsFor::last, nullptr, {}}};
  EXPECT_THROW(m.step(items, r), Error);  // a would pass the context limit: nothing runs
  EXPECT_EQ(m.text_tokens(a), 30);
  EXPECT_EQ(m.text_tokens(b), 0);
  items[0].tokens = std::span(t).subspan(30, 1);
  m.step(items, r);  // the same batch without the bad request runs
  EXPECT_EQ(m.text_tokens(a), 31);
  EXPECT_EQ(m.text_tokens(b), 5);
}

// Holds all of the device's free memory but less than `keep` bytes, in blocks of 256 MiB down to 64 KiB.
struct Ballast {
  std::vector<void*> blocks;
  size_t held = 0;
  explicit Ballast(size_t keep) {
    for (size_t b = size_t(256) << 20; b >= (size_t(64) << 10); b /= 2)
      for (;;) {
        if (left() < keep + b) break;
        void* p = nullptr;
        if (cudaMalloc(&p, b) != cudaSuccess) {
          cudaGetLastError();
          break;
        }
        blocks.push_back(p);
        held += b;
      }
  }
  static size_t left() {
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) cudaGetLastError();
    return free;
  }
  ~Ballast() {
    for (void* p : blocks) cudaFree(p);
  }
};

// Out of device memory (issue #20's errors): a prompt that needs more device memory than is left fails with
// the engine's one-line error, not a crash or a CUDA error at some later launch; once memory is back, a
// sequence that was not in the failed step decodes on as the CPU engine does, and a new prompt runs. A longer
// prompt first (then released) loads every kernel and grows the buffers a prompt of its size needs, so that
// what fails under the ballast is an allocation of the engine's (the bigger prompt's buffers and cache rows).
TEST(CudaEngine, OutOfDeviceMemoryIsAClearErrorAndTheModelGoesOn) {
  REQUIRE_GPU();
  const Variant v = variants()[0];
  Pair p(v);
  std::mt19937_64 rng(77);
  const std::vector<int32_t> t = random_text(rng, 48), warm = random_text(rng, 1500), big = random_text(rng, 4000);
  std::vector<float> lg(size_t(p.gpu.vocab())), lc(lg.size());
  const SeqId ga = p.gpu.new_sequence(), ca = p.cpu.new_sequence();
  p.gpu.append(ga, std::span(t).first(40), LogitsFor::last, lg);
  p.cpu.append(ca, std::span(t).first(40), LogitsFor::last, lc);
  const SeqId gw = p.gpu.new_sequence();
  p.gpu.append(gw, warm, LogitsFor::last, lg);
  p.gpu.release(gw);
  {
    Ballast hold(size_t(256) << 10);
    std::printf("[cuda engine] ballast %zu MiB, %zu KiB left\n", hold.held >> 20, Ballast::left() >> 10);
    const SeqId gb = p.gpu.new_sequence();
    try {
      p.gpu.append(gb, big, LogitsFor::last, lg);
      ADD_FAILURE() << "a 4,000-token prompt ran with " << Ballast::left() << " bytes of device memory left";
    } catch (const Error& e) {
      std::printf("[cuda engine] the error: %s\n", e.what());
      EXPECT_NE(std::string(e.what()).find("out of GPU memory"), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "one line: " << e.what();
    }
    p.gpu.release(gb);
  }
  for (int i = 40; i < 48; ++i) {  // a decodes on, token by token
    p.gpu.append(ga, std::span(t).subspan(size_t(i), 1), LogitsFor::last, lg);
    p.cpu.append(ca, std::span(t).subspan(size_t(i), 1), LogitsFor::last, lc);
    const Err e = compare(lg, lc);
    if (i == 47) report("after OOM", v.name, e);
    EXPECT_TRUE(close(e)) << "token " << i;
  }
  const SeqId gc = p.gpu.new_sequence(), cc = p.cpu.new_sequence();  // and a new prompt runs
  p.gpu.append(gc, std::span(big).first(600), LogitsFor::last, lg);
  p.cpu.append(cc, std::span(big).first(600), LogitsFor::last, lc);
  EXPECT_TRUE(close(compare(lg, lc)));
}

}  // namespace
}  // namespace ksa
