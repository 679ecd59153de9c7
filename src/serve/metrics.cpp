#include "serve/metrics.hpp"

#include <cstdio>

namespace ksa::serve {
namespace {

std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

void head(std::string& out, const std::string& name, const char* type, const std::string& help) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void gauge(std::string& out, const std::string& name, const std::string& help, int64_t v) {
  head(out, name, "gauge", help);
  out += name + " " + std::to_string(v) + "\n";
}

// Latency buckets (seconds): 1 ms to 60 s, roughly x2.5 apart.
std::vector<double> latency_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  size_t b = 0;
  while (b < bounds_.size() && v > bounds_[b]) ++b;
  std::lock_guard<std::mutex> lk(mu_);
  ++counts_[b];
  sum_ += v;
  ++n_;
}

int64_t Histogram::count() const {
  std::lock_guard<std::mutex> lk(mu_);
  return n_;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help,
                       const std::string& label) const {
  std::lock_guard<std::mutex> lk(mu_);
  if (!help.empty()) head(out, name, "histogram", help);
  const std::string lead = label.empty() ? "{" : "{" + label + ",";
  const std::string tail = label.empty() ? " " : "{" + label + "} ";
  int64_t cum = 0;
  for (size_t b = 0; b < bounds_.size(); ++b) {
    cum += counts_[b];
    out += name + "_bucket" + lead + "le=\"" + num(bounds_[b]) + "\"} " + std::to_string(cum) + "\n";
  }
  cum += counts_.back();
  out += name + "_bucket" + lead + "le=\"+Inf\"} " + std::to_string(cum) + "\n";
  out += name + "_sum" + tail + num(sum_) + "\n" + name + "_count" + tail + std::to_string(n_) + "\n";
}

Metrics::Metrics()
    : ttft_(latency_buckets()),
      itl_(latency_buckets()),
      step_decode_(latency_buckets()),
      step_prefill_(latency_buckets()),
      e2e_(latency_buckets()) {}

void Metrics::count_request(const std::string& route, int status) {
  std::lock_guard<std::mutex> lk(mu_);
  ++requests_[{route, status}];
}

void Metrics::count_finished(const char* reason) {
  std::lock_guard<std::mutex> lk(mu_);
  ++finished_[reason];
}

std::string Metrics::render(const Gauges& g) const {
  std::string out;
  {
    std::lock_guard<std::mutex> lk(mu_);
    head(out, "ksa_requests_total", "counter", "HTTP requests answered, by route and status.");
    for (const auto& [key, n] : requests_)
      out += "ksa_requests_total{route=\"" + key.first + "\",status=\"" + std::to_string(key.second) + "\"} " +
             std::to_string(n) + "\n";
    head(out, "ksa_completions_total", "counter", "Generation requests finished, by finish reason.");
    for (const char* r : {"stop", "length", "cancelled", "error"}) {
      const auto it = finished_.find(r);
      out += std::string("ksa_completions_total{reason=\"") + r + "\"} " +
             std::to_string(it == finished_.end() ? 0 : it->second) + "\n";
    }
  }
  head(out, "ksa_prompt_tokens_total", "counter", "Prompt tokens prefilled.");
  out += "ksa_prompt_tokens_total " + std::to_string(prompt_tokens_.load()) + "\n";
  head(out, "ksa_generation_tokens_total", "counter", "Tokens generated.");
  out += "ksa_generation_tokens_total " + std::to_string(generated_tokens_.load()) + "\n";
  gauge(out, "ksa_queue_depth", "Requests waiting for admission.", g.queued);
  gauge(out, "ksa_running_sequences", "Requests admitted and running (prefilling or decoding).", g.running);
  gauge(out, "ksa_live_sequences", "Sequences held by the engine.", g.live_sequences);
  gauge(out, "ksa_kv_bytes_in_use", "KV-cache bytes held by the engine's sequences.", g.kv_bytes_in_use);
  gauge(out, "ksa_kv_bytes_reserved", "KV-cache bytes reserved by admitted requests (upper bound at their max_tokens).",
        g.kv_bytes_reserved);
  gauge(out, "ksa_kv_budget_bytes", "KV-cache admission budget in bytes (0: none).", g.kv_budget);
  gauge(out, "ksa_max_sequences", "Admission limit on running sequences (--max-seqs).", g.max_seqs);
  head(out, "ksa_steps_total", "counter", "Engine steps run.");
  out += "ksa_steps_total " + std::to_string(g.steps) + "\n";
  head(out, "ksa_graph_replays_total", "counter", "Engine steps replayed from a CUDA graph (0 on the CPU).");
  out += "ksa_graph_replays_total " + std::to_string(g.graph_replays) + "\n";
  head(out, "ksa_graph_captures_total", "counter", "CUDA graphs captured (0 on the CPU).");
  out += "ksa_graph_captures_total " + std::to_string(g.graph_captures) + "\n";
  head(out, "ksa_plans_ahead_total", "counter",
       "Decode plans made during the step before (CUDA), by whether the next step used them.");
  out += "ksa_plans_ahead_total{outcome=\"used\"} " + std::to_string(g.plans_ahead_used) + "\n";
  out += "ksa_plans_ahead_total{outcome=\"dropped\"} " + std::to_string(g.plans_ahead_dropped) + "\n";
  ttft_.render(out, "ksa_time_to_first_token_seconds", "Time from a request's arrival to its first generated token.");
  itl_.render(out, "ksa_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.");
  e2e_.render(out, "ksa_request_duration_seconds", "Time from a request's arrival to its last token.");
  step_decode_.render(out, "ksa_step_duration_seconds",
                      "Duration of one engine step (all its sequences), by kind: prefill (with prompt tokens) or "
                      "decode (every sequence continued by one token).",
                      "kind=\"decode\"");
  step_prefill_.render(out, "ksa_step_duration_seconds", "", "kind=\"prefill\"");
  return out;
}

}  // namespace ksa::serve
