#include "serve/scheduler.hpp"

#include <algorithm>

#include "ksa/enum_name.hpp"
#include "ksa/error.hpp"
#include "ksa/text_stream.hpp"

namespace ksa::serve {

using Clock = std::chrono::steady_clock;

const char* finish_name(Finish f) { return enum_name(f, {"", "stop", "length", "cancelled", "error"}, ""); }

// ---- Job ----

Job::Job(JobSpec spec) : spec_(std::move(spec)), arrival_(Clock::now()) {}

bool Job::wait(JobProgress& out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!cv_.wait_for(lk, timeout, [&] { return changed_; })) return false;
  out.text = std::move(text_);
  text_.clear();
  out.ids = std::move(ids_);
  ids_.clear();
  out.completion_tokens = tokens_;
  out.done = done_;
  out.finish = finish_;
  out.error = error_;
  changed_ = done_;  // a finished job answers every later wait at once
  return true;
}

void Job::publish(const std::string& text, int32_t id, int64_t tokens, Finish finish, const std::string& error) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    text_ += text;
    if (id >= 0) ids_.push_back(id);
    tokens_ = tokens;
    if (finish != Finish::none) {
      done_ = true;
      finish_ = finish;
      error_ = error;
    }
    changed_ = true;
  }
  cv_.notify_all();
}

// ---- Scheduler ----

// A running job: its sequence and where it is.
struct Scheduler::Active {
  std::shared_ptr<Job> job;
  SeqId seq = -1;
  int64_t reserve = 0;           // KV bytes reserved at admission
  size_t fed = 0;                // prompt tokens fed so far
  std::vector<int32_t> history;  // prompt + sampled tokens (the penalties look at it)
  int32_t pending = -1;          // the sampled token the next step feeds
  int64_t generated = 0;
  std::unique_ptr<TextStream> text;
  Clock::time_point last_token;
  bool done = false;

  bool prefilling() const { return fed < job->spec().prompt.size(); }
};

Scheduler::Scheduler(Model& model, const Tokenizer* tok, const SchedulerOptions& opt, Metrics* metrics)
    : model_(model), tok_(tok), opt_(opt), metrics_(metrics) {
  if (opt_.max_seqs < 1) fail("--max-seqs: must be >= 1 (got ", opt_.max_seqs, ")");
  if (opt_.max_queue < 0) fail("--max-queue: must be >= 0 (got ", opt_.max_queue, ")");
  if (opt_.kv_budget < 0) fail("--kv-budget: must be >= 0 (got ", opt_.kv_budget, ")");
  if (opt_.prefill_chunk < 1) fail("--prefill-chunk: must be >= 1 (got ", opt_.prefill_chunk, ")");
  if (opt_.idle_prefill_chunk < 0)
    fail("--idle-prefill-chunk: must be >= 0 (got ", opt_.idle_prefill_chunk, ")");
  max_text_ = model_.max_text_tokens();
  // The longest job whose reservation fits the budget on its own (kv_bytes_for grows with the tokens).
  max_job_tokens_ = max_text_;
  if (opt_.kv_budget > 0 && model_.kv_bytes_for(max_text_) > opt_.kv_budget) {
    int64_t lo = 0, hi = max_text_;  // kv_bytes_for(lo) <= budget < kv_bytes_for(hi), or lo = 0
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      (model_.kv_bytes_for(mid) <= opt_.kv_budget ? lo : hi) = mid;
    }
    max_job_tokens_ = lo;
  }
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  accepting_ = false;
  cv_.notify_all();
  thread_.join();
}

Submitted Scheduler::submit(JobSpec spec) {
  Submitted r;
  if (spec.prompt.empty()) fail("Scheduler::submit: empty prompt");
  if (spec.max_tokens < 1) fail("Scheduler::submit: max_tokens must be >= 1 (got ", spec.max_tokens, ")");
  if (!tok_ && !spec.stop.empty()) fail("Scheduler::submit: stop strings need a tokenizer");
  const int64_t need = std::min<int64_t>(int64_t(spec.prompt.size()) + spec.max_tokens, max_text_);
  if (need > max_job_tokens_) {
    r.status = SubmitStatus::too_large;
    r.message = detail::cat("the request needs the KV cache of ", need, " tokens; the KV budget (--kv-budget ",
                            opt_.kv_budget, " bytes) holds at most ", max_job_tokens_, " for one request");
    return r;
  }
  auto job = std::make_shared<Job>(std::move(spec));
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!accepting_ || stop_) {
      r.status = SubmitStatus::shutting_down;
      r.message = "the server is shutting down";
      return r;
    }
    if (int64_t(queue_.size()) >= opt_.max_queue) {
      r.status = SubmitStatus::queue_full;
      r.message = detail::cat("the server is busy: ", queue_.size(), " requests are waiting (--max-queue ",
                              opt_.max_queue, "); retry later");
      return r;
    }
    queue_.push_back(job);
    g_queued_ = int64_t(queue_.size());
  }
  cv_.notify_all();
  r.job = std::move(job);
  return r;
}

void Scheduler::stop_accepting() { accepting_ = false; }

void Scheduler::cancel_all() {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& j : queue_) j->cancel();
  for (auto& a : running_) a->job->cancel();
}

bool Scheduler::idle() const {
  std::lock_guard<std::mutex> lk(mu_);
  return queue_.empty() && running_.empty();
}

Gauges Scheduler::gauges() const {
  Gauges g;
  g.queued = g_queued_;
  g.running = g_running_;
  g.live_sequences = g_live_;
  g.kv_bytes_in_use = g_kv_;
  g.kv_bytes_reserved = g_reserved_;
  g.kv_budget = opt_.kv_budget;
  g.max_seqs = opt_.max_seqs;
  g.steps = g_steps_;
  g.graph_replays = g_replays_;
  g.graph_captures = g_captures_;
  g.plans_ahead_used = g_plans_used_;
  g.plans_ahead_dropped = g_plans_dropped_;
  return g;
}

void Scheduler::publish_gauges() {
  g_running_ = int64_t(running_.size());
  g_live_ = model_.num_sequences();
  g_kv_ = model_.kv_bytes_in_use();
  g_reserved_ = reserved_;
  g_replays_ = model_.graph_replays();
  g_captures_ = model_.graph_captures();
  g_plans_used_ = model_.plans_ahead_used();
  g_plans_dropped_ = model_.plans_ahead_dropped();
}

void Scheduler::loop() {
  for (;;) {
    std::vector<std::shared_ptr<Job>> dropped;
    bool stopping;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !queue_.empty() || !running_.empty(); });
      stopping = stop_;
      if (stopping) {
        dropped.assign(queue_.begin(), queue_.end());
        queue_.clear();
        g_queued_ = 0;
      }
    }
    for (auto& j : dropped) {
      j->publish({}, -1, 0, Finish::cancelled);
      if (metrics_) metrics_->count_finished("cancelled");
    }
    if (stopping)
      for (auto& a : running_) a->job->cancel();
    try {
      admit();
      step_once();
    } catch (const std::exception& e) {
      // Nothing here should throw (items are checked first); if something does, fail the running jobs rather
      // than the server.
      for (auto& a : running_)
        if (!a->done) finish(*a, Finish::error, {}, -1, std::string("internal error: ") + e.what());
    }
    std::lock_guard<std::mutex> lk(mu_);
    std::erase_if(running_, [](const std::unique_ptr<Active>& a) { return a->done; });
    publish_gauges();
    if (stopping && running_.empty()) return;
  }
}

void Scheduler::admit() {
  // Drop cancelled jobs first (queued or running), so that their room is free for the admission below.
  for (auto& a : running_)
    if (!a->done && a->job->cancelled()) finish(*a, Finish::cancelled, {}, -1);
  std::vector<std::shared_ptr<Job>> dropped;
  std::vector<std::unique_ptr<Active>> admitted;
  {
    std::lock_guard<std::mutex> lk(mu_);
    std::erase_if(running_, [](const std::unique_ptr<Active>& a) { return a->done; });
    for (auto it = queue_.begin(); it != queue_.end();) {
      if ((*it)->cancelled()) dropped.push_back(*it), it = queue_.erase(it);
      else ++it;
    }
    while (!queue_.empty() && int64_t(running_.size() + admitted.size()) < opt_.max_seqs) {
      const JobSpec& s = queue_.front()->spec();
      const int64_t reserve =
          model_.kv_bytes_for(std::min<int64_t>(int64_t(s.prompt.size()) + s.max_tokens, max_text_));
      // First come, first served: the head waits for room rather than being overtaken.
      if (opt_.kv_budget > 0 && reserved_ + reserve > opt_.kv_budget && !(running_.empty() && admitted.empty())) break;
      auto a = std::make_unique<Active>();
      a->job = std::move(queue_.front());
      queue_.pop_front();
      a->reserve = reserve;
      reserved_ += reserve;
      admitted.push_back(std::move(a));
    }
    g_queued_ = int64_t(queue_.size());
    for (auto& a : admitted) running_.push_back(std::move(a));
  }
  for (auto& j : dropped) {
    j->publish({}, -1, 0, Finish::cancelled);
    if (metrics_) metrics_->count_finished("cancelled");
  }
  for (auto& a : running_) {
    if (a->seq >= 0 || a->done) continue;
    const JobSpec& s = a->job->spec();
    a->seq = model_.new_sequence();
    a->history = s.prompt;
    a->history.reserve(s.prompt.size() + size_t(std::min<int64_t>(s.max_tokens, 1 << 16)));
    if (tok_) a->text = std::make_unique<TextStream>(*tok_, s.stop);
  }
}

void Scheduler::step_once() {
  std::vector<StepItem> items;
  std::vector<Active*> owners;
  std::vector<StepTrace> trace;
  int64_t prefill_used = 0;
  // Decoding sequences: one token each.
  for (auto& a : running_) {
    if (a->done || a->prefilling()) continue;
    StepItem it;
    it.id = a->seq;
    it.tokens = std::span<const int32_t>(&a->pending, 1);
    it.sampler = &a->job->spec().sampler;
    it.history = a->history;
    items.push_back(it);
    owners.push_back(a.get());
    trace.push_back({a->seq, 1, false});
  }
  // Prefilling sequences, in admission order, as many chunks as fit the step's budget: prefill_chunk tokens,
  // or idle_prefill_chunk while no sequence decodes (then no stream waits on this step).
  // An idle step fills its budget (a prompt may end in a piece of any length); otherwise chunks stay whole, so
  // that a prompt is cut at multiples of prefill_chunk under any load.
  const bool idle = items.empty() && opt_.idle_prefill_chunk > opt_.prefill_chunk;
  const int64_t budget = idle ? opt_.idle_prefill_chunk : opt_.prefill_chunk;
  for (auto& a : running_) {
    if (a->done || !a->prefilling()) continue;
    const std::vector<int32_t>& p = a->job->spec().prompt;
    const int64_t len = std::min<int64_t>(idle ? budget - prefill_used : budget, int64_t(p.size() - a->fed));
    if (len <= 0 || (prefill_used > 0 && prefill_used + len > budget)) break;
    prefill_used += len;
    StepItem it;
    it.id = a->seq;
    it.tokens = std::span<const int32_t>(p.data() + a->fed, size_t(len));
    const bool last = a->fed + size_t(len) == p.size();
    if (last) {
      it.sampler = &a->job->spec().sampler;
      it.history = a->history;
    }
    items.push_back(it);
    owners.push_back(a.get());
    trace.push_back({a->seq, len, true});
  }
  if (items.empty()) return;

  StepResult res;
  const Clock::time_point t0 = Clock::now();
  try {
    model_.step(items, res);
  } catch (const std::exception& e) {
    // Model::step changes nothing when it throws for a bad item: fail the items Model::check rejects and let
    // the next step run the others. Anything else fails the whole step's jobs.
    bool found = false;
    for (size_t i = 0; i < items.size(); ++i) {
      try {
        model_.check(items[i]);
      } catch (const std::exception& bad) {
        finish(*owners[i], Finish::error, {}, -1, bad.what());
        found = true;
      }
    }
    if (!found)
      for (Active* a : owners) finish(*a, Finish::error, {}, -1, std::string("engine step failed: ") + e.what());
    return;
  }
  const Clock::time_point t1 = Clock::now();
  g_steps_ += 1;
  if (metrics_) {
    metrics_->observe_step(std::chrono::duration<double>(t1 - t0).count(), prefill_used > 0);
    if (prefill_used) metrics_->add_prompt_tokens(prefill_used);
  }
  for (size_t i = 0; i < items.size(); ++i) {
    Active& a = *owners[i];
    if (a.prefilling()) a.fed += items[i].tokens.size();
    if (res.next[i] >= 0) on_token(a, res.next[i]);
  }
  if (observer_) observer_(trace);
}

void Scheduler::on_token(Active& a, int32_t next) {
  const JobSpec& s = a.job->spec();
  const Clock::time_point now = Clock::now();
  if (metrics_) {
    metrics_->add_generated_tokens(1);
    if (a.generated == 0) metrics_->observe_ttft(std::chrono::duration<double>(now - a.job->arrival_).count());
    else metrics_->observe_itl(std::chrono::duration<double>(now - a.last_token).count());
  }
  a.last_token = now;
  ++a.generated;
  if (std::find(s.eos.begin(), s.eos.end(), next) != s.eos.end()) {
    finish(a, Finish::stop, {}, next);
    return;
  }
  std::string piece;
  const bool stopped = a.text && a.text->push(next, piece);
  a.history.push_back(next);
  if (stopped) finish(a, Finish::stop, piece, next);
  else if (a.generated >= s.max_tokens || model_.text_tokens(a.seq) >= max_text_)
    finish(a, Finish::length, piece, next);
  else {
    a.pending = next;
    a.job->publish(piece, next, a.generated, Finish::none);
  }
}

void Scheduler::finish(Active& a, Finish why, const std::string& text, int32_t id, const std::string& error) {
  if (a.done) return;
  a.done = true;
  std::string piece = text;
  if (a.text && (why == Finish::stop || why == Finish::length)) a.text->finish(piece);
  if (a.seq >= 0) {
    try {
      model_.release(a.seq);
    } catch (const std::exception&) {
      // An id the model no longer knows holds nothing to release.
    }
  }
  a.seq = -1;
  reserved_ -= a.reserve;
  a.reserve = 0;
  if (metrics_) {
    metrics_->count_finished(finish_name(why));
    if (why == Finish::stop || why == Finish::length)
      metrics_->observe_e2e(std::chrono::duration<double>(Clock::now() - a.job->arrival_).count());
  }
  a.job->publish(piece, id, a.generated, why, error);
}

}  // namespace ksa::serve
