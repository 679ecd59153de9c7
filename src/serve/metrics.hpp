// Counters and latency histograms of `ksa serve`, rendered in the Prometheus text format (GET /metrics).
// Written from the HTTP threads (requests by status) and the scheduler thread (tokens, latencies); every
// method is thread-safe. The gauges (queue depth, running sequences, KV bytes) are the scheduler's own
// numbers, passed in when rendering.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace ksa::serve {

// A cumulative histogram with fixed upper bounds (seconds), as Prometheus defines one.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void observe(double v);
  // Appends `name`'s HELP and TYPE lines (unless `help` is empty: another series of the same name came first),
  // then its _bucket{le=...}, _sum and _count lines, each with `label` (e.g. kind="decode") when given.
  void render(std::string& out, const std::string& name, const std::string& help, const std::string& label = {}) const;
  int64_t count() const;

 private:
  std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<int64_t> counts_;  // per bucket (not cumulative); the last one is +Inf
  double sum_ = 0;
  int64_t n_ = 0;
};

// The scheduler's gauges at one moment.
struct Gauges {
  int64_t queued = 0;             // requests waiting for admission
  int64_t running = 0;            // admitted requests (prefilling or decoding)
  int64_t live_sequences = 0;     // sequences the engine holds (Model::num_sequences)
  int64_t kv_bytes_in_use = 0;    // KV-cache bytes the engine holds (Model::kv_bytes_in_use)
  int64_t kv_bytes_reserved = 0;  // KV-cache bytes reserved by admitted requests (their upper bound)
  int64_t kv_budget = 0;          // the admission budget (0: none)
  int64_t max_seqs = 0;
  int64_t steps = 0;  // engine steps run
  // The engine's CUDA-graph and plan-ahead counters (Model::graph_replays, ...; 0 on the CPU).
  int64_t graph_replays = 0, graph_captures = 0, plans_ahead_used = 0, plans_ahead_dropped = 0;
};

class Metrics {
 public:
  Metrics();
  // One finished HTTP request: its route ("/v1/chat/completions", ...) and status.
  void count_request(const std::string& route, int status);
  void add_prompt_tokens(int64_t n) { prompt_tokens_ += n; }
  void add_generated_tokens(int64_t n) { generated_tokens_ += n; }
  void count_finished(const char* reason);  // "stop", "length", "cancelled", "error"
  void observe_ttft(double seconds) { ttft_.observe(seconds); }
  void observe_itl(double seconds) { itl_.observe(seconds); }
  // One engine step: with prompt tokens in it (prefill) or only sequences continued by a token (decode).
  void observe_step(double seconds, bool prefill) { (prefill ? step_prefill_ : step_decode_).observe(seconds); }
  void observe_e2e(double seconds) { e2e_.observe(seconds); }

  std::string render(const Gauges& g) const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, int64_t> requests_;
  std::map<std::string, int64_t> finished_;
  std::atomic<int64_t> prompt_tokens_{0}, generated_tokens_{0};
  Histogram ttft_, itl_, step_decode_, step_prefill_, e2e_;
};

}  // namespace ksa::serve
