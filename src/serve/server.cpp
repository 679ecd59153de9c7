#include "serve/server.hpp"

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <random>

#include <httplib.h>

#include "ksa/chat_template.hpp"
#include "ksa/error.hpp"
#include "ksa/generation_config.hpp"
#include "ksa/model.hpp"
#include "ksa/tokenizer.hpp"
#include "serve/api.hpp"

namespace ksa::serve {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

// Prompt tokens per step while no request decodes (--idle-prefill-chunk 0).
constexpr int64_t kDefaultIdlePrefillChunk = 4096;

// --device onto the engine's options: the one place that knows which devices this build's engine has.
void apply_device(const std::string& device, const std::string& dir, ModelOptions& mo) {
  if (device == "cpu") {
    mo.device = Device::cpu;
  } else if (device == "cuda" || device == "auto" || device.empty()) {
    if (device == "cuda" && !cuda_engine_available())
      fail(
          "--device cuda: no CUDA device is visible, or this build has no CUDA engine (see `ksa info`); use --device "
          "cpu");
    mo.device = device == "cuda" ? Device::cuda : default_device(dir);
  } else {
    fail("--device: expected cpu, cuda or auto (got '", device, "')");
  }
}

// Half of the machine's memory: the default KV budget on the CPU.
int64_t half_of_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? int64_t(pages) * int64_t(page) / 2 : int64_t(8) << 30;
}

std::string numeric_host(const sockaddr* sa, socklen_t len, int* port) {
  char host[NI_MAXHOST];
  if (getnameinfo(sa, len, host, sizeof host, nullptr, 0, NI_NUMERICHOST) != 0) return {};
  *port = sa->sa_family == AF_INET    ? ntohs(reinterpret_cast<const sockaddr_in*>(sa)->sin_port)
          : sa->sa_family == AF_INET6 ? ntohs(reinterpret_cast<const sockaddr_in6*>(sa)->sin6_port)
                                      : -1;
  return host;
}

// The socket a request came on, or -1. cpp-httplib 0.11 does not hand it to handlers, and a client that
// leaves is otherwise noticed only when a write fails (the second write after it left, or never while its
// request waits in the queue). The connection's two addresses identify it among the process's sockets; the
// worker thread running the handler keeps it open until the handler returns.
int connection_socket(const httplib::Request& req) {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return -1;
  int found = -1;
  while (const dirent* e = readdir(d)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(d)) continue;
    struct stat st;
    if (fstat(int(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage a{}, b{};
    socklen_t la = sizeof a, lb = sizeof b;
    if (getpeername(int(fd), reinterpret_cast<sockaddr*>(&a), &la) != 0) continue;
    if (getsockname(int(fd), reinterpret_cast<sockaddr*>(&b), &lb) != 0) continue;
    int peer_port = -1, local_port = -1;
    const std::string peer = numeric_host(reinterpret_cast<sockaddr*>(&a), la, &peer_port);
    const std::string local = numeric_host(reinterpret_cast<sockaddr*>(&b), lb, &local_port);
    if (peer_port == req.remote_port && local_port == req.local_port && peer == req.remote_addr &&
        local == req.local_addr) {
      found = int(fd);
      break;
    }
  }
  closedir(d);
  return found;
}

// Whether the client closed its side of the connection (or it broke).
bool peer_gone(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

int64_t unix_now() { return int64_t(std::time(nullptr)); }

uint64_t random_seed() {
  static thread_local std::mt19937_64 rng{std::random_device{}() ^
                                          uint64_t(std::chrono::steady_clock::now().time_since_epoch().count())};
  return rng();
}

// cpp-httplib's server with a deeper listen backlog: Debian's build fixes it at 5, and a burst of clients
// connecting at once would see their connections dropped and retried a second later.
class HttpServer : public httplib::Server {
 public:
  void deepen_backlog() {
    if (svr_sock_ != INVALID_SOCKET) ::listen(svr_sock_, SOMAXCONN);
  }
};

// Routes the metrics count by name (anything else is "other", so hostile paths do not add label values).
std::string route_label(const std::string& path) {
  static const char* known[] = {
      "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize"};
  for (const char* k : known)
    if (path == k) return k;
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models/{id}";
  return "other";
}

// The methods a known route answers ("" for an unknown path): a request with another method gets 405.
std::string allowed_methods(const std::string& path) {
  const std::string route = route_label(path);
  if (route == "/v1/chat/completions" || route == "/v1/completions" || route == "/tokenize" || route == "/detokenize")
    return "POST";
  return route == "other" ? "" : "GET, HEAD";
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status();
  res.set_content(error_body(e), "application/json");
}

}  // namespace

struct Server::Impl {
  ServeOptions opt;
  Tokenizer tok;
  Model model;
  Metrics metrics;
  std::unique_ptr<Scheduler> sched;
  HttpServer http;
  std::string name;
  int64_t created = unix_now();
  SamplingDefaults defaults;
  std::vector<int32_t> eos_plain, eos_chat;  // completions: the checkpoint's eos ids; chat: also <|im_end|>
  int64_t ctx = 0, vocab_size = 0, summary_begin = 0, summary_count = 0;
  int port = -1;

  std::mutex stop_mu;
  std::condition_variable stop_cv;
  int stop_requests = 0;

  Impl(const ServeOptions& o, ModelOptions mo)
      : opt(o),
        tok(Tokenizer::load((fs::path(o.model_dir) / "tokenizer.json").string())),
        model(Model::load(o.model_dir, mo)) {}

  void routes();
  void handle_generate(const httplib::Request& req, const std::string& body, httplib::Response& res, Route route);
  std::vector<int32_t> prompt_of(const GenerateRequest& g) const;
  void check_model(const std::string& requested) const;
  void log(const char* fmt, ...) const;
};

void Server::Impl::check_model(const std::string& requested) const {
  if (requested != name)
    throw ApiError(404, "The model `" + requested + "` does not exist; this server serves `" + name + "`", "model",
                   "model_not_found");
}

std::vector<int32_t> Server::Impl::prompt_of(const GenerateRequest& g) const {
  std::vector<int32_t> ids;
  if (g.route == Route::chat) {
    ChatOptions co;
    co.add_generation_prompt = true;
    co.enable_thinking = g.enable_thinking;
    ids = tok.encode(render_qwen3_chat(g.messages, co));
  } else if (g.prompt_is_ids) {
    for (size_t i = 0; i < g.prompt_ids.size(); ++i) {
      const int64_t id = g.prompt_ids[i];
      if (id >= vocab_size || (id >= summary_begin && id < summary_begin + summary_count))
        throw ApiError(
            400, "prompt[" + std::to_string(i) + "]: " + std::to_string(id) + " is not a text token id of this model",
            "prompt");
      ids.push_back(int32_t(id));
    }
  } else {
    ids = tok.encode(g.prompt);
  }
  if (ids.empty())
    throw ApiError(400, "the prompt is empty (it encodes to no tokens)",
                   g.route == Route::chat ? "messages" : "prompt");
  return ids;
}

void Server::Impl::handle_generate(const httplib::Request& req, const std::string& body, httplib::Response& res,
                                   Route route) {
  GenerateRequest g = parse_generate_request(body, route);
  check_model(g.model);
  std::vector<int32_t> prompt = prompt_of(g);
  const int64_t n = int64_t(prompt.size());
  const char* where = route == Route::chat ? "messages" : "prompt";
  if (n >= ctx)
    throw ApiError(400,
                   "This model's maximum context length is " + std::to_string(ctx) + " tokens; the prompt has " +
                       std::to_string(n) + ", which leaves no room for a completion",
                   where, "context_length_exceeded");
  if (g.max_tokens && *g.max_tokens > ctx - n)
    throw ApiError(400,
                   "This model's maximum context length is " + std::to_string(ctx) + " tokens; you requested " +
                       std::to_string(n) + " in the prompt and max_tokens " + std::to_string(*g.max_tokens) +
                       " (at most " + std::to_string(ctx - n) + " with this prompt)",
                   "max_tokens", "context_length_exceeded");
  JobSpec spec;
  spec.prompt = std::move(prompt);
  spec.sampler = sampler_config(g, defaults, random_seed());
  try {
    spec.sampler.validate();
  } catch (const Error& e) {
    throw ApiError(400, e.what());
  }
  spec.max_tokens = g.max_tokens.value_or(ctx - n);
  if (!g.ignore_eos) spec.eos = route == Route::chat ? eos_chat : eos_plain;
  spec.stop = g.stop;
  Submitted s = sched->submit(std::move(spec));
  if (s.status == SubmitStatus::queue_full) throw ApiError(429, s.message, "", "rate_limit_exceeded");
  if (s.status == SubmitStatus::shutting_down) throw ApiError(503, s.message, "", "shutting_down");
  if (s.status == SubmitStatus::too_large) throw ApiError(400, s.message, "max_tokens", "context_length_exceeded");
  std::shared_ptr<Job> job = s.job;
  const int fd = connection_socket(req);
  ResponseHead head{route, new_response_id(route), unix_now(), name};
  const Usage usage0{n, 0};

  if (!g.stream) {
    std::string text;
    JobProgress p;
    for (;;) {
      if (job->wait(p, 50ms)) {
        text += p.text;
        if (p.done) break;
      }
      // Checked after every wake, not only when a wait times out: while tokens flow, every wait returns
      // progress, and a client that left would otherwise have its completion run to the end.
      if (peer_gone(fd)) {
        job->cancel();
        res.status = 499;  // the client closed the request (nginx's code; nobody reads it)
        return;
      }
    }
    if (p.finish == Finish::error) throw ApiError(500, "generation failed: " + p.error, "", "generation_failed");
    if (p.finish == Finish::cancelled)
      throw ApiError(503, "the request was cancelled: the server is shutting down", "", "shutting_down");
    res.set_content(completion_body(head, text, finish_name(p.finish), Usage{n, p.completion_tokens}),
                    "application/json");
    return;
  }

  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  const bool include_usage = g.include_usage;
  res.set_chunked_content_provider(
      "text/event-stream",
      [job, head, include_usage, fd, usage0](size_t, httplib::DataSink& sink) -> bool {
        auto send = [&](const std::string& payload) {
          const std::string ev = "data: " + payload + "\n\n";
          return sink.write(ev.data(), ev.size()) && !peer_gone(fd);
        };
        auto gone = [&] {
          job->cancel();
          return false;  // cpp-httplib closes the connection
        };
        if (head.route == Route::chat && !send(chunk_body(head, "", true, ""))) return gone();
        JobProgress p;
        for (;;) {
          if (!job->wait(p, 50ms)) {
            if (peer_gone(fd)) return gone();
            continue;
          }
          if (!p.text.empty() && !send(chunk_body(head, p.text, false, ""))) return gone();
          if (p.done) break;
          if (p.text.empty() && peer_gone(fd)) return gone();  // tokens without text (held back) send nothing
        }
        if (p.finish == Finish::error || p.finish == Finish::cancelled) {
          const ApiError e =
              p.finish == Finish::error
                  ? ApiError(500, "generation failed: " + p.error, "", "generation_failed")
                  : ApiError(503, "the request was cancelled: the server is shutting down", "", "shutting_down");
          if (!send(error_body(e))) return gone();
        } else {
          if (!send(chunk_body(head, "", false, finish_name(p.finish)))) return gone();
          if (include_usage && !send(usage_chunk_body(head, Usage{usage0.prompt_tokens, p.completion_tokens})))
            return gone();
        }
        const std::string done = "data: [DONE]\n\n";
        sink.write(done.data(), done.size());
        sink.done();
        return true;
      },
      [job](bool success) {
        if (!success) job->cancel();
      });
}

void Server::Impl::log(const char* fmt, ...) const {
  va_list ap;
  va_start(ap, fmt);
  char line[1024];
  std::vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "ksa serve: %s\n", line);
}

void Server::Impl::routes() {
  // Every handler turns an ApiError (or anything else thrown) into an OpenAI-style error response.
  auto guarded = [this](auto fn) {
    return [this, fn](const httplib::Request& req, httplib::Response& res) {
      try {
        fn(req, res);
      } catch (const ApiError& e) {
        send_error(res, e);
      } catch (const Error& e) {
        send_error(res, ApiError(400, e.what()));
      } catch (const std::bad_alloc&) {
        send_error(res, ApiError(500, "out of memory"));
      } catch (const std::exception& e) {
        send_error(res, ApiError(500, std::string("internal error: ") + e.what()));
      }
    };
  };

  // POST bodies are read here, within --max-body: cpp-httplib 0.11 checks a declared Content-Length against
  // its limit but reads a chunked body without one.
  using PostHandler = std::function<void(const httplib::Request&, const std::string&, httplib::Response&)>;
  auto post = [this, guarded](const char* pattern, PostHandler fn) {
    http.Post(pattern, [this, guarded, fn](const httplib::Request& req, httplib::Response& res,
                                           const httplib::ContentReader& reader) {
      // cpp-httplib hands a multipart body only to a multipart reader (the plain one throws: a 500).
      if (req.is_multipart_form_data()) {
        res.set_header("Connection", "close");  // the body is not read
        send_error(res, ApiError(400, "a multipart/form-data body is not supported; send JSON (Content-Type: "
                                      "application/json)"));
        return;
      }
      std::string body;
      bool too_large = false;
      const size_t limit = size_t(opt.max_body);
      const bool read = reader([&](const char* data, size_t n) {
        if (body.size() + n > limit) {
          too_large = true;
          return false;
        }
        body.append(data, n);
        return true;
      });
      if (too_large || res.status == 413) {
        res.set_header("Connection", "close");  // the rest of the body is not read
        send_error(res,
                   ApiError(413, "the request body is larger than " + std::to_string(limit) + " bytes (--max-body)"));
        return;
      }
      if (!read) {
        res.set_header("Connection", "close");
        send_error(res, ApiError(400, "the request body could not be read"));
        return;
      }
      guarded([&](const httplib::Request& q, httplib::Response& r) { fn(q, body, r); })(req, res);
    });
  };
  post("/v1/chat/completions", [this](const httplib::Request& q, const std::string& b, httplib::Response& r) {
    handle_generate(q, b, r, Route::chat);
  });
  post("/v1/completions", [this](const httplib::Request& q, const std::string& b, httplib::Response& r) {
    handle_generate(q, b, r, Route::completions);
  });
  http.Get("/v1/models", guarded([this](const httplib::Request&, httplib::Response& r) {
             r.set_content(models_body(name, created, ctx), "application/json");
           }));
  http.Get("/v1/models/(.+)", guarded([this](const httplib::Request& q, httplib::Response& r) {
             check_model(q.matches[1].str());
             r.set_content(model_body(name, created, ctx), "application/json");
           }));
  http.Get("/health", [this](const httplib::Request&, httplib::Response& r) {
    const bool up = sched->accepting();
    r.status = up ? 200 : 503;
    r.set_content(up ? "{\"status\":\"ok\"}" : "{\"status\":\"shutting down\"}", "application/json");
  });
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& r) {
    r.set_content(metrics.render(sched->gauges()), "text/plain; version=0.0.4");
  });
  post("/tokenize", [this](const httplib::Request&, const std::string& b, httplib::Response& r) {
    const TokenizeRequest t = parse_tokenize_request(b);
    if (!t.model.empty()) check_model(t.model);
    std::vector<int32_t> ids;
    if (t.chat) {
      ChatOptions co;
      co.add_generation_prompt = t.add_generation_prompt;
      co.enable_thinking = t.enable_thinking;
      ids = tok.encode(render_qwen3_chat(t.messages, co));
    } else {
      ids = tok.encode(t.prompt);
    }
    r.set_content(tokenize_body(ids, ctx), "application/json");
  });
  post("/detokenize", [this](const httplib::Request&, const std::string& b, httplib::Response& r) {
    const DetokenizeRequest d = parse_detokenize_request(b);
    if (!d.model.empty()) check_model(d.model);
    std::vector<int32_t> ids;
    for (int64_t id : d.tokens) {
      if (id >= vocab_size)
        throw ApiError(400, "tokens: " + std::to_string(id) + " is not a token id of this model", "tokens");
      ids.push_back(int32_t(id));
    }
    r.set_content(detokenize_body(tok.decode(ids)), "application/json");
  });

  // The API key guards everything but /health and /metrics (for monitors).
  http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (opt.api_key.empty() || req.path == "/health" || req.path == "/metrics")
      return httplib::Server::HandlerResponse::Unhandled;
    const std::string auth = req.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    if (auth.empty()) {
      send_error(res,
                 ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", "", "invalid_api_key"));
      return httplib::Server::HandlerResponse::Handled;
    }
    const std::string given = auth.rfind(prefix, 0) == 0 ? auth.substr(prefix.size()) : std::string();
    // Compared in time independent of where the strings differ.
    unsigned diff = given.size() != opt.api_key.size();
    for (size_t i = 0; i < opt.api_key.size(); ++i)
      diff |= unsigned(uint8_t(opt.api_key[i]) ^ uint8_t(i < given.size() ? given[i] : 0));
    if (diff) {
      send_error(res, ApiError(401, "incorrect API key", "", "invalid_api_key"));
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  // Errors cpp-httplib answers itself (unknown route, body too large, bad request line) get an OpenAI body.
  http.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    // A known route asked with another method (GET on a POST route, say): 405 naming the methods it takes.
    if (const std::string allow = allowed_methods(req.path); res.status == 404 && !allow.empty()) {
      res.set_header("Allow", allow);
      send_error(res,
                 ApiError(405, "method " + req.method + " is not allowed on " + req.path + " (use " + allow + ")"));
      return httplib::Server::HandlerResponse::Handled;
    }
    std::string msg = res.status == 404   ? "no route " + req.method + " " + req.path
                      : res.status == 413 ? "the request body is too large (--max-body)"
                                          : "bad request";
    send_error(res, ApiError(res.status, msg));
    return httplib::Server::HandlerResponse::Handled;
  }));
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    send_error(res, ApiError(500, "internal error"));
  });
  http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    metrics.count_request(route_label(req.path), res.status);
    if (opt.log_requests)
      log("%s:%d %s %s %d", req.remote_addr.c_str(), req.remote_port, req.method.c_str(),
          route_label(req.path) == "other" ? "(other)" : req.path.c_str(), res.status);
  });
}

Server::Server(const ServeOptions& o) {
  if (!fs::is_directory(o.model_dir)) fail("model directory '", o.model_dir, "' does not exist or is not a directory");
  if (!fs::exists(fs::path(o.model_dir) / "tokenizer.json"))
    fail(o.model_dir,
         " has no tokenizer.json (ksa serve needs one; `ksa make-model` copies the Qwen3 tokenizer that "
         "scripts/fetch_test_data.sh caches)");
  if (o.max_body < 1) fail("--max-body: must be >= 1 (got ", o.max_body, ")");
  if (!(o.shutdown_grace >= 0)) fail("--shutdown-grace: must be >= 0 (got ", o.shutdown_grace, ")");
  ModelOptions mo;
  mo.threads = int(o.threads);
  mo.max_text_tokens = o.ctx;
  mo.kv_dtype = o.kv_f32 ? DType::f32 : DType::bf16;
  mo.batch_invariant = o.batch_invariant;
  if (o.no_mmap) mo.load = FileLoad::copy;
  mo.cuda_gemm_autotune = o.gemm_autotune;
  apply_device(o.device, o.model_dir, mo);
  impl_ = std::make_unique<Impl>(o, mo);
  Impl& m = *impl_;
  const ModelConfig& cfg = m.model.config();
  m.name = o.model_name.empty() ? fs::path(o.model_dir).lexically_normal().filename().string() : o.model_name;
  if (m.name.empty() || m.name == ".")
    m.name = fs::absolute(o.model_dir).lexically_normal().parent_path().filename().string();
  m.ctx = m.model.max_text_tokens();
  m.vocab_size = cfg.vocab_size;
  m.summary_begin = cfg.use_summary_attention ? cfg.summary_token_begin : cfg.vocab_size;
  m.summary_count = cfg.use_summary_attention ? cfg.summary_token_num : 0;

  const GenerationConfig gen = load_generation_config(o.model_dir);
  for (int64_t e : gen.eos_token_ids.empty() ? cfg.eos_token_ids : gen.eos_token_ids) m.eos_plain.push_back(int32_t(e));
  m.eos_chat = m.eos_plain;
  if (const int32_t im_end = m.tok.token_to_id("<|im_end|>");
      im_end >= 0 && std::find(m.eos_chat.begin(), m.eos_chat.end(), im_end) == m.eos_chat.end())
    m.eos_chat.push_back(im_end);
  if (gen.temperature) m.defaults.temperature = *gen.temperature;
  if (gen.top_p) m.defaults.top_p = *gen.top_p;
  if (gen.top_k) m.defaults.top_k = *gen.top_k;
  if (gen.min_p) m.defaults.min_p = *gen.min_p;
  if (gen.repetition_penalty) m.defaults.repetition_penalty = *gen.repetition_penalty;

  SchedulerOptions so = o.scheduler;
  // 0: by device. A GPU step of 1,024 prompt tokens costs about as much as a few decode steps of 64 streams
  // (4B shape on the H200: p99 inter-token latency 40-43 ms against 22 ms at 256) and amortises the weights
  // over four times the rows (docs/serve.md, Benchmark); on the CPU a prompt token costs far more, so 256.
  if (so.prefill_chunk == 0) so.prefill_chunk = mo.device == Device::cuda ? 1024 : 256;
  // While nothing decodes, a prompt goes in larger pieces (a lone 4K-token prompt on the CPU, `small` model:
  // time to first token 1.5 s in pieces of 4,096 against 3.6 s in pieces of 256; docs/serve.md). Not with
  // --batch-invariant: a request's pieces, and so its bits, would then depend on the load.
  if (o.batch_invariant) so.idle_prefill_chunk = 0;
  else if (so.idle_prefill_chunk == 0) so.idle_prefill_chunk = kDefaultIdlePrefillChunk;
  if (o.kv_budget >= 0) {
    so.kv_budget = o.kv_budget;
  } else if (const int64_t free = m.model.device_bytes_free(); free >= 0) {
    // GPU: the device memory left after the weights, less 4 GiB for a step's activations (prompt chunks).
    so.kv_budget = std::max<int64_t>(int64_t(1) << 30, free - (int64_t(4) << 30));
  } else {
    so.kv_budget = half_of_memory();
  }
  m.sched = std::make_unique<Scheduler>(m.model, &m.tok, so, &m.metrics);

  // One HTTP thread per connection the scheduler may be serving (running and queued), plus a few for
  // /health, /metrics and refusals.
  const size_t threads = size_t(std::clamp<int64_t>(so.max_seqs + so.max_queue + 16, 16, 4096));
  m.http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  m.http.set_payload_max_length(size_t(o.max_body));
  m.http.set_tcp_nodelay(true);  // each streamed token leaves at once (Nagle would hold it for the client's ACK)
  m.routes();

  m.log(
      "%s: %lld layers, hidden %lld, context %lld, KV %s; max %lld sequences, queue %lld, KV budget %s, prefill "
      "chunk %lld (%lld while nothing decodes); model id '%s'",
      o.model_dir.c_str(), (long long)cfg.num_hidden_layers, (long long)cfg.hidden_size, (long long)m.ctx,
      o.kv_f32 ? "f32" : "bf16", (long long)so.max_seqs, (long long)so.max_queue,
      so.kv_budget ? (std::to_string(so.kv_budget) + " bytes").c_str() : "none", (long long)so.prefill_chunk,
      (long long)std::max(so.prefill_chunk, so.idle_prefill_chunk), m.name.c_str());
}

Server::~Server() = default;

const std::string& Server::model_name() const { return impl_->name; }

int Server::bind() {
  Impl& m = *impl_;
  if (m.opt.port < 0 || m.opt.port > 65535) fail("--port: must be in [0, 65535] (got ", m.opt.port, ")");
  if (m.opt.port == 0) {
    m.port = m.http.bind_to_any_port(m.opt.host);
    if (m.port <= 0) fail("cannot bind to ", m.opt.host, " (any port)");
  } else {
    if (!m.http.bind_to_port(m.opt.host, int(m.opt.port)))
      fail("cannot bind to ", m.opt.host, ":", m.opt.port, " (in use, or not an address of this machine?)");
    m.port = int(m.opt.port);
  }
  m.http.deepen_backlog();
  return m.port;
}

void Server::request_stop() {
  {
    std::lock_guard<std::mutex> lk(impl_->stop_mu);
    ++impl_->stop_requests;
  }
  impl_->stop_cv.notify_all();
}

void Server::run() {
  Impl& m = *impl_;
  if (m.port < 0) bind();
  std::thread listener([&m] { m.http.listen_after_bind(); });
  m.log("listening on http://%s:%d (model '%s')", m.opt.host.c_str(), m.port, m.name.c_str());
  {
    std::unique_lock<std::mutex> lk(m.stop_mu);
    m.stop_cv.wait(lk, [&] { return m.stop_requests > 0; });
  }
  m.sched->stop_accepting();
  const Gauges g = m.sched->gauges();
  m.log(
      "shutting down: new requests get 503; %lld running and %lld queued get up to %g s to finish (signal again to "
      "cancel them)",
      (long long)g.running, (long long)g.queued, m.opt.shutdown_grace);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(m.opt.shutdown_grace);
  while (!m.sched->idle()) {
    std::unique_lock<std::mutex> lk(m.stop_mu);
    if (m.stop_cv.wait_for(lk, 20ms, [&] { return m.stop_requests > 1; })) {
      m.log("second signal: cancelling what is left");
      break;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      m.log("grace period over: cancelling what is left");
      break;
    }
  }
  m.sched->cancel_all();
  for (int i = 0; i < 500 && !m.sched->idle(); ++i) std::this_thread::sleep_for(20ms);
  m.http.stop();  // closes the listener; joins the HTTP threads once their responses are written
  listener.join();
  m.log("stopped");
}

}  // namespace ksa::serve
