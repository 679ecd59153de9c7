// The OpenAI-compatible formats of `ksa serve`: request bodies parsed and checked field by field into plain
// structs (no model or tokenizer needed, so tests drive them directly), and the response, stream-chunk and
// error bodies. Every problem with a request is an ApiError carrying its HTTP status and OpenAI's error
// object, never a crash.
#pragma once
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "ksa/chat_template.hpp"
#include "ksa/sampler.hpp"

namespace ksa::serve {

// An error an HTTP client receives: the status and {"error": {"message", "type", "param", "code"}}.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, const std::string& message, std::string param = {}, std::string code = {})
      : std::runtime_error(message), status_(status), message_(message), param_(std::move(param)),
        code_(std::move(code)) {}
  int status() const { return status_; }
  // The whole message (what() stops at a NUL byte, which a request can put into it: a model id "%00").
  const std::string& message() const { return message_; }
  const std::string& param() const { return param_; }
  const std::string& code() const { return code_; }
  // OpenAI's error type for the status: invalid_request_error (400, 404, 413, ...), authentication_error
  // (401), rate_limit_error (429), server_error (5xx).
  std::string type() const;

 private:
  int status_;
  std::string message_;
  std::string param_, code_;
};

// The body of an error response.
std::string error_body(const ApiError& e);

// Request bodies nested deeper than this are refused before parsing (the JSON parser recurses).
inline constexpr int kMaxJsonDepth = 64;
// The most stop strings a request may give, and the longest one (bytes).
inline constexpr size_t kMaxStops = 16, kMaxStopBytes = 256;

enum class Route { chat, completions };

// POST /v1/chat/completions or /v1/completions. Optional fields left out (or null) stay unset; the server
// fills them from the checkpoint's generation_config.json or OpenAI's defaults.
struct GenerateRequest {
  Route route = Route::chat;
  std::string model;
  // chat: the conversation; chat_template_kwargs.enable_thinking (as vLLM takes it)
  std::vector<ChatMessage> messages;
  std::optional<bool> enable_thinking;
  // completions: a text prompt, or token ids (prompt_is_ids)
  std::string prompt;
  std::vector<int64_t> prompt_ids;
  bool prompt_is_ids = false;
  // both
  std::optional<int64_t> max_tokens;  // max_tokens, or max_completion_tokens (chat)
  std::optional<double> temperature, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty;
  std::optional<int64_t> top_k;  // -1 and 0: off
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool ignore_eos = false;     // vLLM's extension: generate max_tokens tokens whatever they are
};

// Parses and checks a body; throws ApiError (400) naming the field.
GenerateRequest parse_generate_request(std::string_view body, Route route);

// What a request that leaves a sampling field out gets: the checkpoint's recommendation
// (generation_config.json) where it has one, else OpenAI's defaults (temperature 1, top_p 1).
struct SamplingDefaults {
  double temperature = 1.0, top_p = 1.0, min_p = 0.0, repetition_penalty = 1.0;
  int64_t top_k = 0;
};
// The sampler configuration of a request; `random_seed` is used when it gives no seed.
SamplerConfig sampler_config(const GenerateRequest& r, const SamplingDefaults& d, uint64_t random_seed);

// POST /tokenize: {"prompt": "text"} or {"messages": [...], "add_generation_prompt": true}, as in vLLM.
struct TokenizeRequest {
  std::string model;  // empty: not given
  bool chat = false;
  std::string prompt;
  std::vector<ChatMessage> messages;
  bool add_generation_prompt = true;
  std::optional<bool> enable_thinking;
};
TokenizeRequest parse_tokenize_request(std::string_view body);

// POST /detokenize: {"tokens": [ids]}.
struct DetokenizeRequest {
  std::string model;
  std::vector<int64_t> tokens;
};
DetokenizeRequest parse_detokenize_request(std::string_view body);

// ---- responses ----

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

// What every response and chunk of one request repeats.
struct ResponseHead {
  Route route = Route::chat;
  std::string id;       // chatcmpl-... / cmpl-...
  int64_t created = 0;  // unix seconds
  std::string model;
};

// A new response id: "chatcmpl-" or "cmpl-" and 24 random hex digits.
std::string new_response_id(Route route);

// The non-streamed response.
std::string completion_body(const ResponseHead& h, const std::string& text, const std::string& finish_reason,
                            const Usage& u);
// One stream chunk (the JSON after "data: "): a text delta; for chat, `role` adds the assistant role (the
// first chunk); a non-empty finish_reason makes it the last chunk of the choice.
std::string chunk_body(const ResponseHead& h, const std::string& text, bool role, const std::string& finish_reason);
// The extra last chunk with no choices and the usage (stream_options.include_usage).
std::string usage_chunk_body(const ResponseHead& h, const Usage& u);

std::string models_body(const std::string& model, int64_t created, int64_t max_model_len);
std::string model_body(const std::string& model, int64_t created, int64_t max_model_len);
std::string tokenize_body(const std::vector<int32_t>& ids, int64_t max_model_len);
std::string detokenize_body(const std::string& text);

// Deepest nesting of arrays and objects in `body` (strings skipped); a quick scan before parsing.
int json_depth(std::string_view body);

}  // namespace ksa::serve
