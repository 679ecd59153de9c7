// The continuous-batching scheduler on a small random-weight model (tiny shape, a 2,048-token vocabulary so
// that a step is cheap): reproducible tokens whatever else runs, prompts prefilled in chunks between other
// sequences' decode steps, admission by --max-seqs and by KV bytes, the bounded queue, cancellation and
// release, the finish reasons, a bad item failing alone, and shutdown with work in flight.
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "ksa/model.hpp"
#include "ksa/model_writer.hpp"
#include "serve/scheduler.hpp"
#include "test_util.hpp"

namespace ksa::serve {
namespace {

using namespace std::chrono_literals;

constexpr int64_t kTextVocab = 2047;  // summary token id 2047, vocab 2048

class SchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir("serve_sched");
    ModelConfig cfg = model_shape_config("tiny");
    cfg.summary_token_begin = kTextVocab;
    cfg.vocab_size = kTextVocab + cfg.summary_token_num;
    cfg.truncate_predict_nums = kTextVocab;
    cfg.bos_token_id = 1;
    cfg.eos_token_ids = {2};
    RandomModelOptions o;
    o.seed = 20261205;
    write_random_model(cfg, dir_->str(), o);
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static Model load(int64_t max_text = 0) {
    ModelOptions o;
    o.threads = 1;
    o.max_text_tokens = max_text;
    o.batch_invariant = true;  // the same bits for a sequence alone and under load (SameTokensAloneAndUnderLoad)
    return Model::load(dir_->str(), o);
  }
  static inline test::TempDir* dir_ = nullptr;
};

// A prompt of n ids from a simple generator (never the summary id).
std::vector<int32_t> prompt_of(int n, int salt) {
  std::vector<int32_t> p;
  uint32_t x = 2463534242u + uint32_t(salt) * 7919u;
  for (int i = 0; i < n; ++i) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    p.push_back(int32_t(3 + x % uint32_t(kTextVocab - 3)));
  }
  return p;
}

JobSpec spec_of(std::vector<int32_t> prompt, int64_t max_tokens, float temperature = 0.f, uint64_t seed = 0) {
  JobSpec s;
  s.prompt = std::move(prompt);
  s.max_tokens = max_tokens;
  s.sampler.temperature = temperature;
  s.sampler.top_k = temperature > 0 ? 50 : 0;
  s.sampler.seed = seed;
  return s;
}

struct Outcome {
  std::vector<int32_t> ids;
  JobProgress last;
};

// Reads a job to its end (bounded: a test that hangs fails instead).
Outcome drain(Job& job, std::chrono::seconds limit = 60s) {
  Outcome o;
  const auto end = std::chrono::steady_clock::now() + limit;
  JobProgress p;
  while (std::chrono::steady_clock::now() < end) {
    if (!job.wait(p, 50ms)) continue;
    o.ids.insert(o.ids.end(), p.ids.begin(), p.ids.end());
    if (p.done) {
      o.last = p;
      return o;
    }
  }
  ADD_FAILURE() << "the job did not finish within " << limit.count() << " s";
  return o;
}

std::shared_ptr<Job> submit_ok(Scheduler& s, JobSpec spec) {
  Submitted r = s.submit(std::move(spec));
  EXPECT_EQ(r.status, SubmitStatus::ok) << r.message;
  return r.job;
}

// Waits until pred() or the limit.
template <class F>
bool eventually(F pred, std::chrono::milliseconds limit = 20000ms) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return pred();
}

// Records every step's items.
struct Recorder {
  std::mutex mu;
  std::vector<std::vector<StepTrace>> steps;
  void attach(Scheduler& s) {
    s.set_step_observer([this](std::span<const StepTrace> t) {
      std::lock_guard<std::mutex> lk(mu);
      steps.emplace_back(t.begin(), t.end());
    });
  }
  std::vector<std::vector<StepTrace>> get() {
    std::lock_guard<std::mutex> lk(mu);
    return steps;
  }
};

TEST_F(SchedulerTest, SameTokensAloneAndUnderLoad) {
  const JobSpec probe = spec_of(prompt_of(45, 1), 24, 0.9f, 77);
  Model m = load();
  std::vector<int32_t> alone;
  {
    SchedulerOptions so{.prefill_chunk = 16};
    Scheduler s(m, nullptr, so);
    alone = drain(*submit_ok(s, probe)).ids;
  }
  ASSERT_EQ(alone.size(), 24u);
  {
    SchedulerOptions so{.max_seqs = 4, .prefill_chunk = 16};
    Scheduler s(m, nullptr, so);
    std::vector<std::shared_ptr<Job>> others;
    for (int i = 0; i < 6; ++i)
      others.push_back(
          submit_ok(s, spec_of(prompt_of(10 + 13 * i, 100 + i), 5 + 7 * i, i % 2 ? 0.7f : 0.f, uint64_t(i))));
    auto job = submit_ok(s, probe);
    const Outcome o = drain(*job);
    EXPECT_EQ(o.ids, alone) << "the same request and seed give the same tokens whatever else is batched";
    EXPECT_EQ(o.last.finish, Finish::length);
    EXPECT_EQ(o.last.completion_tokens, 24);
    for (auto& j : others) EXPECT_NE(drain(*j).last.finish, Finish::error);
  }
  EXPECT_EQ(m.num_sequences(), 0);
  EXPECT_EQ(m.kv_bytes_in_use(), 0);
}

TEST_F(SchedulerTest, LongPromptIsPrefilledInChunksBetweenDecodeSteps) {
  Model m = load();
  SchedulerOptions so{.prefill_chunk = 16};
  Recorder rec;  // declared first: it must outlive the scheduler thread that calls it
  Scheduler s(m, nullptr, so);
  rec.attach(s);
  auto decoder = submit_ok(s, spec_of(prompt_of(5, 2), 400));
  JobProgress p;
  ASSERT_TRUE(decoder->wait(p, 20000ms));  // decoding now
  auto longp = submit_ok(s, spec_of(prompt_of(100, 3), 2));
  const Outcome lo = drain(*longp);
  EXPECT_EQ(lo.last.finish, Finish::length);
  decoder->cancel();
  drain(*decoder);

  // Find the decoder's and the long prompt's sequence ids from the trace: the decoder's first item is a 5-token
  // prefill, the long prompt's are 16-token chunks.
  const auto steps = rec.get();
  ASSERT_FALSE(steps.empty());
  const SeqId dec = steps.front().front().seq;
  int chunks = 0;
  int64_t fed = 0;
  for (const auto& st : steps) {
    int64_t prefill = 0;
    bool decoded = false, has_long = false;
    for (const StepTrace& t : st) {
      if (t.prefill) prefill += t.tokens;
      if (t.seq == dec && !t.prefill) decoded = true;
      if (t.seq != dec && t.prefill) has_long = true, fed += t.tokens;
    }
    EXPECT_LE(prefill, so.prefill_chunk) << "a step holds at most one chunk's worth of prompt tokens";
    if (has_long) {
      ++chunks;
      EXPECT_TRUE(decoded) << "the running stream decodes in every step of the long prompt's prefill";
    }
  }
  EXPECT_EQ(chunks, 7) << "100 tokens in chunks of 16";
  EXPECT_EQ(fed, 100);
}

// While no sequence decodes, prompts go in pieces of idle_prefill_chunk; once one decodes, of prefill_chunk.
// Alone, a 100-token prompt takes two steps (64 + 36 tokens); then, beside a decoding stream, another takes
// 16-token chunks, each step with the stream's token.
TEST_F(SchedulerTest, PromptsTakeLargerPiecesWhileNothingDecodes) {
  Model m = load();
  SchedulerOptions so{.prefill_chunk = 16, .idle_prefill_chunk = 64};
  Recorder rec;  // declared first: it must outlive the scheduler thread that calls it
  Scheduler s(m, nullptr, so);
  rec.attach(s);
  const Outcome alone = drain(*submit_ok(s, spec_of(prompt_of(100, 4), 2)));
  EXPECT_EQ(alone.last.finish, Finish::length);
  // The observer sees a step after its tokens are published: wait for the last one.
  EXPECT_TRUE(eventually([&] { return rec.get().size() >= 3; }));
  std::vector<std::vector<StepTrace>> steps = rec.get();
  ASSERT_GE(steps.size(), 3u);
  ASSERT_EQ(steps[0].size(), 1u);
  EXPECT_TRUE(steps[0][0].prefill);
  EXPECT_EQ(steps[0][0].tokens, 64);
  ASSERT_EQ(steps[1].size(), 1u);
  EXPECT_EQ(steps[1][0].tokens, 36);
  EXPECT_FALSE(steps[2][0].prefill);  // its second token

  const size_t first = rec.get().size();
  auto decoder = submit_ok(s, spec_of(prompt_of(5, 2), 400));
  // Decoding now: a step after its prompt's holds its next token (the observer may lag the token).
  EXPECT_TRUE(eventually([&] {
    const auto st = rec.get();
    for (size_t i = first; i < st.size(); ++i)
      if (!st[i].empty() && !st[i][0].prefill) return true;
    return false;
  }));
  const size_t before = rec.get().size();
  EXPECT_EQ(drain(*submit_ok(s, spec_of(prompt_of(100, 3), 2))).last.finish, Finish::length);
  decoder->cancel();
  drain(*decoder);
  steps = rec.get();
  int64_t fed = 0;
  for (size_t i = before; i < steps.size(); ++i) {
    int64_t prefill = 0;
    bool decoded = false;
    for (const StepTrace& t : steps[i]) {
      if (t.prefill) prefill += t.tokens;
      else decoded = true;
    }
    fed += prefill;
    EXPECT_LE(prefill, so.prefill_chunk) << "step " << i << ": a stream decodes, so chunks of prefill_chunk";
    if (prefill > 0) {
      EXPECT_TRUE(decoded) << "step " << i;
    }
  }
  EXPECT_EQ(fed, 100);
}

TEST_F(SchedulerTest, AdmissionByMaxSeqs) {
  Model m = load();
  SchedulerOptions so{.max_seqs = 2};
  Recorder rec;  // declared first: it must outlive the scheduler thread that calls it
  Scheduler s(m, nullptr, so);
  rec.attach(s);
  std::vector<std::shared_ptr<Job>> jobs;
  for (int i = 0; i < 5; ++i) jobs.push_back(submit_ok(s, spec_of(prompt_of(6 + i, 10 + i), 8)));
  for (auto& j : jobs) EXPECT_EQ(drain(*j).last.finish, Finish::length);
  size_t most = 0;
  for (const auto& st : rec.get()) most = std::max(most, st.size());
  EXPECT_EQ(most, 2u) << "never more than --max-seqs sequences in a step, and the limit is used";
  EXPECT_TRUE(eventually([&] { return s.idle(); }));
  EXPECT_EQ(s.gauges().live_sequences, 0);
}

TEST_F(SchedulerTest, AdmissionByKvBytes) {
  Model m = load();
  const int64_t per_job = m.kv_bytes_for(30 + 10);
  SchedulerOptions so{.max_seqs = 16, .kv_budget = 2 * per_job + per_job / 2};  // room for two
  Recorder rec;  // declared first: it must outlive the scheduler thread that calls it
  Scheduler s(m, nullptr, so);
  rec.attach(s);
  std::vector<std::shared_ptr<Job>> jobs;
  for (int i = 0; i < 5; ++i) jobs.push_back(submit_ok(s, spec_of(prompt_of(30, 20 + i), 10)));
  for (auto& j : jobs) EXPECT_EQ(drain(*j).last.finish, Finish::length);
  size_t most = 0;
  for (const auto& st : rec.get()) most = std::max(most, st.size());
  EXPECT_EQ(most, 2u) << "the KV budget admits two at a time";
  // One job that could never fit is refused at once.
  const Submitted big = s.submit(spec_of(prompt_of(30, 9), 4000));
  EXPECT_EQ(big.status, SubmitStatus::too_large);
  EXPECT_NE(big.message.find("KV budget"), std::string::npos) << big.message;
  EXPECT_GE(s.max_job_tokens(), 40);
  EXPECT_LT(s.max_job_tokens(), 4030);
}

TEST_F(SchedulerTest, BoundedQueueRefusesWhenFull) {
  Model m = load();
  SchedulerOptions so{.max_seqs = 1, .max_queue = 2};
  Scheduler s(m, nullptr, so);
  auto first = submit_ok(s, spec_of(prompt_of(4, 30), 3000));
  JobProgress p;
  ASSERT_TRUE(first->wait(p, 20000ms));  // running: the queue is empty again
  auto q1 = submit_ok(s, spec_of(prompt_of(4, 31), 4));
  auto q2 = submit_ok(s, spec_of(prompt_of(4, 32), 4));
  const Submitted over = s.submit(spec_of(prompt_of(4, 33), 4));
  EXPECT_EQ(over.status, SubmitStatus::queue_full);
  EXPECT_FALSE(over.job);
  EXPECT_EQ(s.gauges().queued, 2);
  first->cancel();
  EXPECT_EQ(drain(*first).last.finish, Finish::cancelled);
  EXPECT_EQ(drain(*q1).last.finish, Finish::length);
  EXPECT_EQ(drain(*q2).last.finish, Finish::length);
}

TEST_F(SchedulerTest, CancelReleasesTheSequence) {
  Model m = load();
  Scheduler s(m, nullptr, SchedulerOptions{});
  auto running = submit_ok(s, spec_of(prompt_of(20, 40), 3000));
  JobProgress p;
  ASSERT_TRUE(running->wait(p, 20000ms));
  EXPECT_TRUE(eventually([&] { return s.gauges().kv_bytes_in_use > 0 && s.gauges().live_sequences == 1; }));
  running->cancel();
  const Outcome o = drain(*running);
  EXPECT_EQ(o.last.finish, Finish::cancelled);
  EXPECT_LT(o.last.completion_tokens, 3000);
  EXPECT_TRUE(eventually([&] {
    const Gauges g = s.gauges();
    return g.live_sequences == 0 && g.kv_bytes_in_use == 0 && g.running == 0 && g.kv_bytes_reserved == 0;
  })) << "live "
      << s.gauges().live_sequences << ", KV bytes " << s.gauges().kv_bytes_in_use;
}

TEST_F(SchedulerTest, CancelWhileQueued) {
  Model m = load();
  SchedulerOptions so{.max_seqs = 1};
  Scheduler s(m, nullptr, so);
  auto first = submit_ok(s, spec_of(prompt_of(4, 50), 3000));
  auto queued = submit_ok(s, spec_of(prompt_of(4, 51), 4));
  queued->cancel();
  const Outcome q = drain(*queued);
  EXPECT_EQ(q.last.finish, Finish::cancelled);
  EXPECT_EQ(q.last.completion_tokens, 0);
  first->cancel();
  drain(*first);
  EXPECT_TRUE(eventually([&] { return s.idle() && s.gauges().live_sequences == 0; }));
}

TEST_F(SchedulerTest, FinishReasons) {
  Model m = load(/*max_text=*/40);
  Scheduler s(m, nullptr, SchedulerOptions{});
  // max_tokens.
  const Outcome a = drain(*submit_ok(s, spec_of(prompt_of(10, 60), 7)));
  EXPECT_EQ(a.last.finish, Finish::length);
  EXPECT_EQ(a.ids.size(), 7u);
  // An end-of-sequence id: the greedy first token of the same prompt, made an eos id.
  JobSpec e = spec_of(prompt_of(10, 60), 7);
  e.eos = {a.ids[0]};
  const Outcome b = drain(*submit_ok(s, e));
  EXPECT_EQ(b.last.finish, Finish::stop);
  EXPECT_EQ(b.ids, std::vector<int32_t>{a.ids[0]});
  EXPECT_EQ(b.last.completion_tokens, 1);
  // The context limit: 35 prompt tokens, 40 in all: the sequence takes 5 generated tokens, the 6th is sampled
  // from the full context and not fed.
  const Outcome c = drain(*submit_ok(s, spec_of(prompt_of(35, 61), 100)));
  EXPECT_EQ(c.last.finish, Finish::length);
  EXPECT_EQ(c.ids.size(), 6u);
  EXPECT_TRUE(eventually([&] { return s.gauges().live_sequences == 0; }));
}

TEST_F(SchedulerTest, BadItemFailsAloneOthersContinue) {
  Model m = load();
  Scheduler s(m, nullptr, SchedulerOptions{});
  std::vector<int32_t> bad = prompt_of(12, 70);
  bad[5] = int32_t(kTextVocab);  // the summary token id: the model refuses it as text
  auto good = submit_ok(s, spec_of(prompt_of(12, 71), 6));
  auto failing = submit_ok(s, spec_of(bad, 6));
  const Outcome f = drain(*failing);
  EXPECT_EQ(f.last.finish, Finish::error);
  EXPECT_NE(f.last.error.find("summary"), std::string::npos) << f.last.error;
  EXPECT_EQ(drain(*good).last.finish, Finish::length);
  EXPECT_TRUE(eventually([&] { return s.gauges().live_sequences == 0; }));
}

TEST_F(SchedulerTest, ShutdownCancelsWorkInFlight) {
  Model m = load();
  std::vector<std::shared_ptr<Job>> jobs;
  {
    SchedulerOptions so{.max_seqs = 2};
    Scheduler s(m, nullptr, so);
    for (int i = 0; i < 5; ++i) jobs.push_back(submit_ok(s, spec_of(prompt_of(8, 80 + i), 3000)));
    JobProgress p;
    ASSERT_TRUE(jobs[0]->wait(p, 20000ms));
    s.stop_accepting();
    EXPECT_EQ(s.submit(spec_of(prompt_of(4, 90), 2)).status, SubmitStatus::shutting_down);
  }  // destroyed with two running and three queued
  for (auto& j : jobs) EXPECT_EQ(drain(*j, 5s).last.finish, Finish::cancelled);
  EXPECT_EQ(m.num_sequences(), 0);
  EXPECT_EQ(m.kv_bytes_in_use(), 0);
}

TEST_F(SchedulerTest, MetricsSeeTokensAndLatencies) {
  Model m = load();
  Metrics metrics;
  Scheduler s(m, nullptr, SchedulerOptions{}, &metrics);
  drain(*submit_ok(s, spec_of(prompt_of(9, 95), 5)));
  EXPECT_TRUE(eventually([&] { return s.idle(); }));
  const std::string text = metrics.render(s.gauges());
  EXPECT_NE(text.find("ksa_prompt_tokens_total 9\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_generation_tokens_total 5\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_time_to_first_token_seconds_count 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_inter_token_latency_seconds_count 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_completions_total{reason=\"length\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_kv_bytes_in_use 0\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_live_sequences 0\n"), std::string::npos) << text;
  // One step with the 9-token prompt (which samples the first token), then 4 steps of one token each.
  EXPECT_NE(text.find("ksa_step_duration_seconds_count{kind=\"prefill\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_step_duration_seconds_count{kind=\"decode\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_steps_total 5\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ksa_graph_replays_total 0\n"), std::string::npos) << text;  // the CPU has no graphs
}

}  // namespace
}  // namespace ksa::serve
