// `ksa serve`: an OpenAI-compatible HTTP server (cpp-httplib, Debian's libcpp-httplib-dev) over the
// continuous-batching Scheduler. Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON or
// server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus), POST /tokenize,
// POST /detokenize. docs/serve.md describes them.
//
// Threads: cpp-httplib's pool answers HTTP (one thread per open connection); the scheduler's thread alone
// drives the model. A handler parses and checks the request, tokenizes it, submits a job and then relays the
// job's text (whole, or as stream chunks), watching its connection: a client that goes away cancels its job.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "serve/scheduler.hpp"

namespace ksa::serve {

struct ServeOptions {
  std::string model_dir;
  std::string host = "127.0.0.1";
  int64_t port = 8080;           // 0: any free port (see Server::bind)
  std::string device = "cpu";    // cpu | cuda
  std::string api_key;           // non-empty: /v1/*, /tokenize and /detokenize need "Authorization: Bearer KEY"
  std::string model_name;        // the id clients name; empty: the model directory's name
  int64_t ctx = 0;               // context limit per sequence (0: config.json max_position_embeddings)
  int64_t threads = 0;           // engine threads (0: all cores)
  bool kv_f32 = false;           // f32 KV cache (default bf16)
  bool batch_invariant = false;  // CPU: the same tokens for a request under any load (ModelOptions::batch_invariant)
  bool no_mmap = false;          // CPU: the weights copied into anonymous memory (ModelOptions::load, FileLoad::copy)
  bool gemm_autotune = false;    // CUDA: cuBLASLt's fastest candidates (ModelOptions::cuda_gemm_autotune)
  int64_t kv_budget = -1;        // -1: half the machine's memory; 0: no limit; else bytes
  SchedulerOptions scheduler;    // max_seqs, max_queue, prefill_chunk (0 here: 256 on the CPU, 1024 on the GPU;
                                 // kv_budget is filled from the above), idle_prefill_chunk (0 here:
                                 // kDefaultIdlePrefillChunk; none with batch_invariant)
  int64_t max_body = 16 << 20;   // request bodies above this many bytes get 413
  double shutdown_grace = 30;    // seconds running requests may take to finish after SIGINT/SIGTERM
  bool log_requests = true;      // one line per request on stderr
};

class Server {
 public:
  // Loads the tokenizer (DIR/tokenizer.json) and the model; throws ksa::Error naming what is wrong.
  explicit Server(const ServeOptions& opt);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port (port 0: a free one); returns the port. Throws ksa::Error when it cannot.
  int bind();
  // Serves until request_stop(). Then refuses new requests (503), gives the running and queued ones up to
  // shutdown_grace seconds to finish (a second request_stop() cancels them at once), cancels what is left,
  // closes the listener and returns.
  void run();
  // Thread-safe; may be called before run().
  void request_stop();

  const std::string& model_name() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ksa::serve
