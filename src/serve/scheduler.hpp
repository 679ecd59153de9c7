// The request scheduler of `ksa serve`: continuous batching over ksa::Model::step.
//
// One thread (the scheduler's) drives the model; HTTP threads submit jobs and read their text through Job.
// Every loop iteration is one engine step:
//   - cancelled jobs are dropped and their sequences released;
//   - queued jobs are admitted, first come first served, while fewer than max_seqs run and the KV bytes they
//     reserve (Model::kv_bytes_for(prompt + max_tokens): KSA's compressed cache at its largest) fit the budget;
//   - the step holds one token for every decoding sequence, plus prompt chunks of at most `prefill_chunk`
//     tokens in all, so a long prompt is prefilled over several steps while the others keep decoding;
//   - sampled tokens go through the job's TextStream (UTF-8, stop strings); a job ends at an end-of-sequence
//     id, a stop string, max_tokens or the context limit, and its sequence is released at once.
// A prompt is always cut at the same places (multiples of prefill_chunk from its start), whatever else runs,
// so the same request with the same seed gives the same tokens under any load.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "ksa/model.hpp"
#include "ksa/sampler.hpp"
#include "ksa/tokenizer.hpp"
#include "serve/metrics.hpp"

namespace ksa::serve {

enum class Finish : uint8_t { none, stop, length, cancelled, error };
const char* finish_name(Finish f);  // "stop", "length", "cancelled", "error" ("" for none)

// What a job runs.
struct JobSpec {
  std::vector<int32_t> prompt;  // >= 1 token, within the context
  SamplerConfig sampler;
  int64_t max_tokens = 16;        // tokens to sample at most (>= 1)
  std::vector<int32_t> eos;       // ids that end the completion (never part of its text)
  std::vector<std::string> stop;  // stop strings (need the scheduler's tokenizer)
};

// What an HTTP thread reads of its job.
struct JobProgress {
  std::string text;               // text released since the previous wait
  std::vector<int32_t> ids;       // tokens sampled since the previous wait (an end-of-sequence id included)
  int64_t completion_tokens = 0;  // tokens sampled so far
  bool done = false;
  Finish finish = Finish::none;
  std::string error;  // Finish::error: what went wrong
};

class Job {
 public:
  explicit Job(JobSpec spec);
  // Waits until the job has new text or is done, at most `timeout`; moves the new text into `out` (replacing
  // its text) and fills the rest. Returns false when nothing happened before the timeout.
  bool wait(JobProgress& out, std::chrono::milliseconds timeout);
  // Asks the scheduler to drop the job at its next step (its sequence is released then). Idempotent.
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }
  const JobSpec& spec() const { return spec_; }
  int64_t prompt_tokens() const { return int64_t(spec_.prompt.size()); }

 private:
  friend class Scheduler;
  // Adds released text and a sampled id (-1: none); a finish other than none ends the job.
  void publish(const std::string& text, int32_t id, int64_t tokens, Finish finish, const std::string& error = {});

  JobSpec spec_;
  std::chrono::steady_clock::time_point arrival_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::string text_;
  std::vector<int32_t> ids_;
  int64_t tokens_ = 0;
  bool changed_ = false, done_ = false;
  Finish finish_ = Finish::none;
  std::string error_;
};

struct SchedulerOptions {
  int64_t max_seqs = 64;        // jobs running at once
  int64_t max_queue = 256;      // jobs waiting for admission; a submit beyond it is refused
  int64_t kv_budget = 0;        // KV-cache bytes the running jobs may reserve (0: no limit)
  int64_t prefill_chunk = 256;  // prompt tokens per step, over all prefilling jobs
  // Prompt tokens per step while no job is decoding (no stream waits on the step): larger pieces prefill
  // faster. 0: prefill_chunk. Leave it 0 where a request must get the same tokens alone and under load
  // (a batch-invariant model): the prompt's pieces would differ.
  int64_t idle_prefill_chunk = 0;
};

enum class SubmitStatus { ok, queue_full, too_large, shutting_down };
struct Submitted {
  SubmitStatus status = SubmitStatus::ok;
  std::shared_ptr<Job> job;  // set when ok
  std::string message;       // why not, otherwise
};

// One item of a step, as the step observer sees it (tests).
struct StepTrace {
  SeqId seq = -1;
  int64_t tokens = 0;    // tokens the item fed
  bool prefill = false;  // a prompt chunk (else one generated token)
};

class Scheduler {
 public:
  // `tok` may be null (then jobs release no text and may not have stop strings). The model and tokenizer must
  // outlive the scheduler; from here on only the scheduler's thread touches the model.
  Scheduler(Model& model, const Tokenizer* tok, const SchedulerOptions& opt, Metrics* metrics = nullptr);
  ~Scheduler();  // cancels every job and joins the thread
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a job (thread-safe). Refused when the queue is full, when shutting down, or when the job could
  // never be admitted (its KV reservation alone is over the budget).
  Submitted submit(JobSpec spec);
  // Refuse new jobs from now on (shutdown).
  void stop_accepting();
  bool accepting() const { return accepting_; }
  // Cancels every queued and running job.
  void cancel_all();
  // True when no job is queued or running.
  bool idle() const;
  Gauges gauges() const;
  int64_t max_text_tokens() const { return max_text_; }
  // The most text tokens (prompt + max_tokens) one job may reserve under the KV budget.
  int64_t max_job_tokens() const { return max_job_tokens_; }

  // Called on the scheduler thread after every step with its items (tests). Set before the first submit.
  void set_step_observer(std::function<void(std::span<const StepTrace>)> f) { observer_ = std::move(f); }

 private:
  struct Active;
  void loop();
  void admit();
  void step_once();
  void on_token(Active& a, int32_t next);
  // Ends a job: releases its sequence and publishes its last text and id (-1: none) with the reason.
  void finish(Active& a, Finish why, const std::string& text, int32_t id, const std::string& error = {});
  void publish_gauges();

  Model& model_;
  const Tokenizer* tok_;
  SchedulerOptions opt_;
  Metrics* metrics_;
  int64_t max_text_ = 0, max_job_tokens_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stop_ = false;
  std::atomic<bool> accepting_{true};

  std::vector<std::unique_ptr<Active>> running_;  // scheduler thread only
  int64_t reserved_ = 0;                          // scheduler thread only
  std::function<void(std::span<const StepTrace>)> observer_;

  // Published by the scheduler thread for gauges().
  std::atomic<int64_t> g_queued_{0}, g_running_{0}, g_live_{0}, g_kv_{0}, g_reserved_{0}, g_steps_{0};
  std::atomic<int64_t> g_replays_{0}, g_captures_{0}, g_plans_used_{0}, g_plans_dropped_{0};
  std::thread thread_;
};

}  // namespace ksa::serve
