// `ksa serve`: the OpenAI-compatible server (src/serve) on a checkpoint directory. The command parses the
// flags, turns SIGINT/SIGTERM into a graceful stop (Server::request_stop) and exits 0 once the server has
// stopped.
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cstdio>
#include <thread>

#include "common.hpp"
#include "serve/server.hpp"

namespace ksa::tools {
namespace {

int signal_pipe[2] = {-1, -1};

void on_stop_signal(int sig) {
  const unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = ::write(signal_pipe[1], &b, 1);
}

// "1073741824", "512MiB", "8G", "1.5GB": bytes (K, M, G, T are powers of 1024, with or without "iB"/"B").
int64_t parse_bytes(const std::string& flag, const std::string& s) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    throw cli::UsageError(flag + ": expected a byte count such as 8G or 512MiB (got '" + s + "')");
  }
  std::string unit = s.substr(used);
  for (char& c : unit) c = char(std::toupper(static_cast<unsigned char>(c)));
  double mul = 1;
  if (unit.empty() || unit == "B") mul = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB") mul = 1024.0;
  else if (unit == "M" || unit == "MB" || unit == "MIB") mul = 1024.0 * 1024;
  else if (unit == "G" || unit == "GB" || unit == "GIB") mul = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "TB" || unit == "TIB") mul = 1024.0 * 1024 * 1024 * 1024;
  else throw cli::UsageError(flag + ": unknown unit '" + s.substr(used) + "' (use K, M, G or T)");
  if (!(v >= 0) || v * mul > 9.0e18) throw cli::UsageError(flag + ": out of range (got '" + s + "')");
  return int64_t(v * mul);
}

int run_serve(int argc, char** argv) {
  cli::Flags f(
      "serve",
      "Serve a checkpoint over an OpenAI-compatible HTTP API with continuous batching: POST /v1/chat/completions,\n"
      "POST /v1/completions (stream: true for server-sent events), GET /v1/models, GET /health, GET /metrics\n"
      "(Prometheus), POST /tokenize, POST /detokenize. SIGINT/SIGTERM stop it gracefully (docs/serve.md).");
  serve::ServeOptions o;
  const ModelDirFlag model_flag(f);
  std::string& host = f.str("--host", o.host, "address to listen on");
  int64_t& port = f.i64("--port", o.port, "port to listen on (0 = any free port, printed)", 0, 65535);
  std::string& device = f.str("--device", o.device, "engine device: cpu, cuda, or auto (cuda when a GPU is visible)");
  std::string& api_key =
      f.str("--api-key", "", "require 'Authorization: Bearer KEY' (default: $KSA_API_KEY, else none)");
  std::string& name = f.str("--model-name", "", "the model id clients name (default: the directory's name)");
  int64_t& max_seqs = f.i64("--max-seqs", o.scheduler.max_seqs, "sequences running at once", 1, 1 << 20);
  int64_t& max_queue =
      f.i64("--max-queue", o.scheduler.max_queue, "requests waiting beyond --max-seqs; more get 429", 0, 1 << 20);
  std::string& kv_budget = f.str("--kv-budget", "auto",
                                 "KV-cache bytes the running sequences may reserve (e.g. 8G; 0 = no limit; auto = half "
                                 "the memory on the CPU, the free device memory less 4 GiB on the GPU)");
  int64_t& ctx = f.i64("--ctx", 0, "context limit per sequence in text tokens (0 = config max_position_embeddings)", 0,
                       cli::kMaxTokens);
  int64_t& chunk = f.i64("--prefill-chunk", 0,
                         "prompt tokens per engine step (long prompts are prefilled in chunks between decode steps); "
                         "0 = 256 on the CPU, 1024 on the GPU",
                         0, cli::kMaxTokens);
  int64_t& idle_chunk = f.i64("--idle-prefill-chunk", 0,
                              "prompt tokens per engine step while no request is decoding; 0 = 4096 (--prefill-chunk "
                              "if larger, and always with --batch-invariant)",
                              0, cli::kMaxTokens);
  int64_t& threads = f.i64("-t,--threads", 0, "engine threads (0 = all cores)", 0, cli::kMaxThreads);
  bool& kv_f32 = f.flag("--kv-f32", "keep the KV cache in f32 (default bf16)");
  bool& no_mmap = f.flag("--no-mmap", cli::kNoMmapHelp);
  bool& autotune = f.flag("--gemm-autotune", cli::kGemmAutotuneHelp);
  bool& batch_invariant =
      f.flag("--batch-invariant",
             "CPU: every matrix product row by row, so a request gets the same tokens under any load "
             "(slower prefill)");
  std::string& max_body = f.str("--max-body", "16M", "largest request body; larger ones get 413");
  double& grace =
      f.f64("--shutdown-grace", o.shutdown_grace, "seconds running requests get to finish after SIGINT/SIGTERM");
  bool& quiet = f.flag("--quiet", "do not log every request on stderr");
  if (!f.parse(argc, argv)) return 0;
  const std::string dir = model_flag.dir();
  if (port < 0 || port > 65535)
    throw cli::UsageError("--port: must be in [0, 65535] (got " + std::to_string(port) + ")");
  if (max_seqs < 1) throw cli::UsageError("--max-seqs: must be >= 1 (got " + std::to_string(max_seqs) + ")");
  if (max_queue < 0) throw cli::UsageError("--max-queue: must be >= 0 (got " + std::to_string(max_queue) + ")");
  if (ctx < 0) throw cli::UsageError("--ctx: must be >= 0 (got " + std::to_string(ctx) + ")");
  if (chunk < 0) throw cli::UsageError("--prefill-chunk: must be >= 0 (got " + std::to_string(chunk) + ")");
  if (threads < 0) throw cli::UsageError("--threads: must be >= 0 (got " + std::to_string(threads) + ")");
  if (!(grace >= 0)) throw cli::UsageError("--shutdown-grace: must be >= 0");
  o.model_dir = dir;
  o.host = host;
  o.port = port;
  o.device = device;
  o.api_key = api_key;
  if (!f.given("--api-key"))
    if (const char* k = std::getenv("KSA_API_KEY")) o.api_key = k;
  o.model_name = name;
  o.scheduler.max_seqs = max_seqs;
  o.scheduler.max_queue = max_queue;
  o.scheduler.prefill_chunk = chunk;
  o.scheduler.idle_prefill_chunk = idle_chunk;
  o.kv_budget = kv_budget == "auto" ? -1 : parse_bytes("--kv-budget", kv_budget);
  o.ctx = ctx;
  o.threads = threads;
  o.kv_f32 = kv_f32;
  o.batch_invariant = batch_invariant;
  o.no_mmap = no_mmap;
  o.gemm_autotune = autotune;
  o.max_body = parse_bytes("--max-body", max_body);
  if (o.max_body < 1) throw cli::UsageError("--max-body: must be at least 1 byte");
  o.shutdown_grace = grace;
  o.log_requests = !quiet;

  // SIGINT/SIGTERM: a handler writes the signal number into a pipe (all it may safely do; any thread may take
  // the signal, since libraries start threads of their own), and a thread reading the pipe asks the server to
  // stop. SIGPIPE is ignored: a client that left makes a write fail, not the process die.
  if (pipe(signal_pipe) != 0) fail("ksa serve: pipe: cannot create the signal pipe");
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  serve::Server server(o);
  server.bind();
  std::atomic<bool> stopped{false};
  std::thread waiter([&] {
    while (!stopped) {
      pollfd p{signal_pipe[0], POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      unsigned char sig = 0;
      if (::read(signal_pipe[0], &sig, 1) == 1) {
        std::fprintf(stderr, "ksa serve: %s received\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
        server.request_stop();
      }
    }
  });
  try {
    server.run();
  } catch (...) {
    stopped = true;
    waiter.join();
    throw;
  }
  stopped = true;
  waiter.join();
  return 0;
}

cli::Register reg{{"serve", "OpenAI-compatible HTTP server with continuous batching", run_serve}};

}  // namespace
}  // namespace ksa::tools
