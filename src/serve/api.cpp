#include "serve/api.hpp"

#include <cmath>
#include <limits>
#include <random>

#include <nlohmann/json.hpp>

namespace ksa::serve {

using json = nlohmann::json;

std::string ApiError::type() const {
  if (status_ == 401) return "authentication_error";
  if (status_ == 429) return "rate_limit_error";
  if (status_ >= 500) return "server_error";
  return "invalid_request_error";
}

std::string error_body(const ApiError& e) {
  json err = {{"message", e.message()}, {"type", e.type()}, {"param", nullptr}, {"code", nullptr}};
  if (!e.param().empty()) err["param"] = e.param();
  if (!e.code().empty()) err["code"] = e.code();
  return json{{"error", err}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

int json_depth(std::string_view body) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') deepest = std::max(deepest, ++depth);
    else if (c == ']' || c == '}') --depth;
  }
  return deepest;
}

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& message, const std::string& code = {}) {
  throw ApiError(400, message, param, code);
}

json parse_body(std::string_view body) {
  if (body.empty()) bad("", "the request body is empty; expected a JSON object");
  if (json_depth(body) > kMaxJsonDepth)
    bad("", "the request body nests arrays/objects more than " + std::to_string(kMaxJsonDepth) + " deep");
  json j;
  try {
    j = json::parse(body.begin(), body.end());
  } catch (const json::exception& e) {
    bad("", std::string("the request body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) bad("", "the request body must be a JSON object (got " + std::string(j.type_name()) + ")");
  return j;
}

// The field if present and not null.
const json* field(const json& j, const char* name) {
  const auto it = j.find(name);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

std::string type_of(const json& v) {
  if (v.is_number_integer()) return "an integer";
  if (v.is_number_float()) return "a number";
  return std::string("a") + (v.is_object() || v.is_array() ? "n " : " ") + v.type_name();
}

bool get_bool(const json& j, const char* name, bool def) {
  const json* v = field(j, name);
  if (!v) return def;
  if (!v->is_boolean()) bad(name, std::string(name) + ": must be a boolean (got " + type_of(*v) + ")");
  return v->get<bool>();
}

std::optional<bool> get_opt_bool(const json& j, const char* name, const std::string& path) {
  const json* v = field(j, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) bad(path, path + ": must be a boolean (got " + type_of(*v) + ")");
  return v->get<bool>();
}

std::string get_string(const json& j, const char* name, const std::string& path, bool required) {
  const json* v = field(j, name);
  if (!v) {
    if (required) bad(path, path + ": required");
    return {};
  }
  if (!v->is_string()) bad(path, path + ": must be a string (got " + type_of(*v) + ")");
  return v->get<std::string>();
}

// A number in [lo, hi]; lo_open / hi_open exclude the end.
std::optional<double> get_number(const json& j, const char* name, double lo, double hi, bool lo_open = false,
                                 bool hi_open = false) {
  const json* v = field(j, name);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad(name, std::string(name) + ": must be a number (got " + type_of(*v) + ")");
  const double x = v->get<double>();
  const bool ok = std::isfinite(x) && (lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi);
  if (!ok) {
    std::string range =
        std::string(lo_open ? "(" : "[") + json(lo).dump() + ", " + json(hi).dump() + (hi_open ? ")" : "]");
    bad(name, std::string(name) + ": must be in " + range + " (got " + v->dump() + ")");
  }
  return x;
}

// An integer that fits int64_t in [lo, hi].
std::optional<int64_t> get_int(const json& j, const char* name, int64_t lo, int64_t hi) {
  const json* v = field(j, name);
  if (!v) return std::nullopt;
  if (!v->is_number_integer()) bad(name, std::string(name) + ": must be an integer (got " + type_of(*v) + ")");
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    bad(name, std::string(name) + ": must be at most " + std::to_string(hi) + " (got " + v->dump() + ")");
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi)
    bad(name, std::string(name) + ": must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] (got " +
                  v->dump() + ")");
  return x;
}

// Token ids: a non-empty array of non-negative integers.
std::vector<int64_t> get_ids(const json& v, const std::string& path) {
  if (!v.is_array()) bad(path, path + ": must be an array of token ids (got " + type_of(v) + ")");
  std::vector<int64_t> ids;
  ids.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const json& x = v[i];
    const std::string at = path + "[" + std::to_string(i) + "]";
    if (!x.is_number_integer()) bad(path, at + ": must be an integer token id (got " + type_of(x) + ")");
    if (x.is_number_unsigned() ? x.get<uint64_t>() > uint64_t(std::numeric_limits<int32_t>::max())
                               : (x.get<int64_t>() < 0 || x.get<int64_t>() > std::numeric_limits<int32_t>::max()))
      bad(path, at + ": " + x.dump() + " is not a token id");
    ids.push_back(x.get<int64_t>());
  }
  return ids;
}

// A message's content: a string, null (assistant turns), or an array of {"type": "text", "text": ...} parts
// (joined with newlines, as vLLM does).
std::string content_of(const json& m, const std::string& path, bool may_be_null) {
  const json* c = field(m, "content");
  if (!c) {
    if (may_be_null) return {};
    bad(path + ".content", path + ".content: required");
  }
  if (c->is_string()) return c->get<std::string>();
  if (!c->is_array())
    bad(path + ".content", path + ".content: must be a string or an array of text parts (got " + type_of(*c) + ")");
  std::string text;
  for (size_t i = 0; i < c->size(); ++i) {
    const json& part = (*c)[i];
    const std::string at = path + ".content[" + std::to_string(i) + "]";
    if (!part.is_object()) bad(at, at + ": must be an object (got " + type_of(part) + ")");
    const std::string type = get_string(part, "type", at + ".type", true);
    if (type != "text") bad(at + ".type", at + ".type: only \"text\" parts are supported (got \"" + type + "\")");
    if (i) text += '\n';
    text += get_string(part, "text", at + ".text", true);
  }
  return text;
}

std::vector<ChatMessage> get_messages(const json& j) {
  const json* ms = field(j, "messages");
  if (!ms) bad("messages", "messages: required");
  if (!ms->is_array()) bad("messages", "messages: must be an array (got " + type_of(*ms) + ")");
  if (ms->empty()) bad("messages", "messages: must not be empty");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < ms->size(); ++i) {
    const json& m = (*ms)[i];
    const std::string path = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) bad(path, path + ": must be an object (got " + type_of(m) + ")");
    ChatMessage msg;
    msg.role = get_string(m, "role", path + ".role", true);
    if (msg.role == "developer") msg.role = "system";  // OpenAI's newer name for the system turn
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant" && msg.role != "tool")
      bad(path + ".role",
          path + ".role: must be system, developer, user, assistant or tool (got \"" + msg.role + "\")");
    if (const json* tc = field(m, "tool_calls"); tc && !(tc->is_array() && tc->empty()))
      bad(path + ".tool_calls", path + ".tool_calls: function calling is not supported");
    msg.content = content_of(m, path, msg.role == "assistant");
    if (const json* r = field(m, "reasoning_content")) {
      if (!r->is_string())
        bad(path + ".reasoning_content", path + ".reasoning_content: must be a string (got " + type_of(*r) + ")");
      msg.reasoning_content = r->get<std::string>();
    }
    out.push_back(std::move(msg));
  }
  return out;
}

std::optional<bool> get_enable_thinking(const json& j) {
  const json* k = field(j, "chat_template_kwargs");
  if (!k) return std::nullopt;
  if (!k->is_object()) bad("chat_template_kwargs", "chat_template_kwargs: must be an object (got " + type_of(*k) + ")");
  return get_opt_bool(*k, "enable_thinking", "chat_template_kwargs.enable_thinking");
}

// Fields we cannot honour are refused rather than silently ignored.
void refuse_unsupported(const json& j, Route route) {
  if (auto n = get_int(j, "n", 1, 1 << 20); n && *n != 1)
    bad("n", "n: only 1 choice per request is supported (got " + std::to_string(*n) + ")");
  if (auto b = get_int(j, "best_of", 1, 1 << 20); b && *b != 1) bad("best_of", "best_of: only 1 is supported");
  if (route == Route::chat) {
    if (get_bool(j, "logprobs", false)) bad("logprobs", "logprobs: not supported");
  } else if (const json* lp = field(j, "logprobs")) {
    if (!(lp->is_number_integer() && lp->get<int64_t>() == 0) && !(lp->is_boolean() && !lp->get<bool>()))
      bad("logprobs", "logprobs: not supported");
  }
  if (auto t = get_int(j, "top_logprobs", 0, 20); t && *t > 0) bad("top_logprobs", "top_logprobs: not supported");
  if (get_bool(j, "echo", false)) bad("echo", "echo: not supported");
  if (const json* s = field(j, "suffix"); s && !(s->is_string() && s->get<std::string>().empty()))
    bad("suffix", "suffix: not supported");
  for (const char* name : {"tools", "functions"})
    if (const json* t = field(j, name); t && !(t->is_array() && t->empty()))
      bad(name, std::string(name) + ": function calling is not supported");
  if (const json* t = field(j, "tool_choice"); t && !(t->is_string() && t->get<std::string>() == "none"))
    bad("tool_choice", "tool_choice: function calling is not supported");
  if (const json* rf = field(j, "response_format")) {
    if (!rf->is_object() || get_string(*rf, "type", "response_format.type", true) != "text")
      bad("response_format", "response_format: only {\"type\": \"text\"} is supported");
  }
  if (const json* lb = field(j, "logit_bias"); lb && !(lb->is_object() && lb->empty()))
    bad("logit_bias", "logit_bias: not supported");
}

std::vector<std::string> get_stop(const json& j) {
  const json* s = field(j, "stop");
  std::vector<std::string> out;
  if (!s) return out;
  if (s->is_string()) {
    out.push_back(s->get<std::string>());
  } else if (s->is_array()) {
    if (s->size() > kMaxStops)
      bad("stop", "stop: at most " + std::to_string(kMaxStops) + " strings (got " + std::to_string(s->size()) + ")");
    for (size_t i = 0; i < s->size(); ++i) {
      if (!(*s)[i].is_string())
        bad("stop", "stop[" + std::to_string(i) + "]: must be a string (got " + type_of((*s)[i]) + ")");
      out.push_back((*s)[i].get<std::string>());
    }
  } else {
    bad("stop", "stop: must be a string or an array of strings (got " + type_of(*s) + ")");
  }
  for (const std::string& x : out)
    if (x.size() > kMaxStopBytes)
      bad("stop", "stop: each string may be at most " + std::to_string(kMaxStopBytes) + " bytes (got " +
                      std::to_string(x.size()) + ")");
  return out;
}

}  // namespace

GenerateRequest parse_generate_request(std::string_view body, Route route) {
  const json j = parse_body(body);
  GenerateRequest r;
  r.route = route;
  r.model = get_string(j, "model", "model", true);
  if (route == Route::chat) {
    r.messages = get_messages(j);
    r.enable_thinking = get_enable_thinking(j);
  } else {
    const json* p = field(j, "prompt");
    if (!p) bad("prompt", "prompt: required");
    if (p->is_string()) {
      r.prompt = p->get<std::string>();
    } else if (p->is_array()) {
      if (p->empty()) bad("prompt", "prompt: must not be empty");
      if ((*p)[0].is_string()) {
        if (p->size() != 1) bad("prompt", "prompt: one prompt per request (got " + std::to_string(p->size()) + ")");
        r.prompt = (*p)[0].get<std::string>();
      } else if ((*p)[0].is_array()) {
        if (p->size() != 1) bad("prompt", "prompt: one prompt per request (got " + std::to_string(p->size()) + ")");
        r.prompt_ids = get_ids((*p)[0], "prompt[0]");
        r.prompt_is_ids = true;
      } else {
        r.prompt_ids = get_ids(*p, "prompt");
        r.prompt_is_ids = true;
      }
      if (r.prompt_is_ids && r.prompt_ids.empty()) bad("prompt", "prompt: must not be empty");
    } else {
      bad("prompt",
          "prompt: must be a string, an array of token ids, or an array of one string (got " + type_of(*p) + ")");
    }
  }
  refuse_unsupported(j, route);
  constexpr int64_t kMaxInt = std::numeric_limits<int64_t>::max();
  r.max_tokens = get_int(j, "max_tokens", 1, kMaxInt);
  if (route == Route::chat)
    if (auto m = get_int(j, "max_completion_tokens", 1, kMaxInt)) r.max_tokens = m;
  r.temperature = get_number(j, "temperature", 0, 2);
  r.top_p = get_number(j, "top_p", 0, 1, true);
  r.min_p = get_number(j, "min_p", 0, 1);
  r.top_k = get_int(j, "top_k", -1, kMaxInt);
  r.presence_penalty = get_number(j, "presence_penalty", -2, 2);
  r.frequency_penalty = get_number(j, "frequency_penalty", -2, 2);
  r.repetition_penalty = get_number(j, "repetition_penalty", 0, 10, true);
  if (const json* s = field(j, "seed")) {
    if (!s->is_number_integer()) bad("seed", "seed: must be an integer (got " + type_of(*s) + ")");
    r.seed = s->is_number_unsigned() ? s->get<uint64_t>() : uint64_t(s->get<int64_t>());
  }
  r.stop = get_stop(j);
  r.stream = get_bool(j, "stream", false);
  if (const json* so = field(j, "stream_options")) {
    if (!r.stream) bad("stream_options", "stream_options: only allowed with stream: true");
    if (!so->is_object()) bad("stream_options", "stream_options: must be an object (got " + type_of(*so) + ")");
    r.include_usage = get_opt_bool(*so, "include_usage", "stream_options.include_usage").value_or(false);
  }
  r.ignore_eos = get_bool(j, "ignore_eos", false);
  return r;
}

SamplerConfig sampler_config(const GenerateRequest& r, const SamplingDefaults& d, uint64_t random_seed) {
  SamplerConfig c;
  c.temperature = float(r.temperature.value_or(d.temperature));
  c.top_p = float(r.top_p.value_or(d.top_p));
  c.min_p = float(r.min_p.value_or(d.min_p));
  const int64_t k = r.top_k.value_or(d.top_k);
  c.top_k = k < 0 ? 0 : k;
  c.presence_penalty = float(r.presence_penalty.value_or(0.0));
  c.frequency_penalty = float(r.frequency_penalty.value_or(0.0));
  c.repetition_penalty = float(r.repetition_penalty.value_or(d.repetition_penalty));
  c.seed = r.seed.value_or(random_seed);
  return c;
}

TokenizeRequest parse_tokenize_request(std::string_view body) {
  const json j = parse_body(body);
  TokenizeRequest r;
  r.model = get_string(j, "model", "model", false);
  const bool has_prompt = field(j, "prompt") != nullptr, has_messages = field(j, "messages") != nullptr;
  if (has_prompt == has_messages) bad("prompt", "give exactly one of prompt and messages");
  if (has_prompt) {
    r.prompt = get_string(j, "prompt", "prompt", true);
  } else {
    r.chat = true;
    r.messages = get_messages(j);
    r.add_generation_prompt = get_bool(j, "add_generation_prompt", true);
    r.enable_thinking = get_enable_thinking(j);
  }
  return r;
}

DetokenizeRequest parse_detokenize_request(std::string_view body) {
  const json j = parse_body(body);
  DetokenizeRequest r;
  r.model = get_string(j, "model", "model", false);
  const json* t = field(j, "tokens");
  if (!t) bad("tokens", "tokens: required");
  r.tokens = get_ids(*t, "tokens");
  return r;
}

// ---- responses ----

std::string new_response_id(Route route) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* hex = "0123456789abcdef";
  std::string id = route == Route::chat ? "chatcmpl-" : "cmpl-";
  for (int i = 0; i < 24; ++i) id += hex[rng() & 15];
  return id;
}

namespace {

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

json head_json(const ResponseHead& h, bool chunk) {
  const char* object =
      h.route == Route::chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
  return {{"id", h.id}, {"object", object}, {"created", h.created}, {"model", h.model}};
}

// Generated text is valid UTF-8 (TextStream replaces what is not); `replace` keeps a dump from throwing anyway.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

std::string completion_body(const ResponseHead& h, const std::string& text, const std::string& finish_reason,
                            const Usage& u) {
  json j = head_json(h, false);
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish_reason}};
  if (h.route == Route::chat) choice["message"] = {{"role", "assistant"}, {"content", text}};
  else choice["text"] = text;
  j["choices"] = json::array({choice});
  j["usage"] = usage_json(u);
  return dump(j);
}

std::string chunk_body(const ResponseHead& h, const std::string& text, bool role, const std::string& finish_reason) {
  json j = head_json(h, true);
  json choice = {{"index", 0}, {"logprobs", nullptr}};
  choice["finish_reason"] = finish_reason.empty() ? json(nullptr) : json(finish_reason);
  if (h.route == Route::chat) {
    json delta = json::object();
    if (role) delta["role"] = "assistant";
    if (!text.empty() || (role && finish_reason.empty())) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  j["choices"] = json::array({choice});
  return dump(j);
}

std::string usage_chunk_body(const ResponseHead& h, const Usage& u) {
  json j = head_json(h, true);
  j["choices"] = json::array();
  j["usage"] = usage_json(u);
  return dump(j);
}

std::string model_body(const std::string& model, int64_t created, int64_t max_model_len) {
  return dump(json{
      {"id", model}, {"object", "model"}, {"created", created}, {"owned_by", "ksa"}, {"max_model_len", max_model_len}});
}

std::string models_body(const std::string& model, int64_t created, int64_t max_model_len) {
  return dump(
      json{{"object", "list"}, {"data", json::array({json::parse(model_body(model, created, max_model_len))})}});
}

std::string tokenize_body(const std::vector<int32_t>& ids, int64_t max_model_len) {
  return dump(json{{"tokens", ids}, {"count", ids.size()}, {"max_model_len", max_model_len}});
}

std::string detokenize_body(const std::string& text) { return dump(json{{"prompt", text}}); }

}  // namespace ksa::serve
