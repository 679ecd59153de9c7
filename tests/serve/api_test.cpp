// The OpenAI request formats of `ksa serve`: what parses into which fields and defaults, every refusal with
// its status and the field it names, and the response and stream-chunk bodies.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "serve/api.hpp"
#include "serve/metrics.hpp"

namespace ksa::serve {
namespace {

using Json = nlohmann::json;

// The ApiError a parse throws: its status and param, or {0, ""} when it throws none.
struct Refusal {
  int status = 0;
  std::string param, message;
};
template <class F>
Refusal refusal(F f) {
  try {
    f();
  } catch (const ApiError& e) {
    return {e.status(), e.param(), e.what()};
  }
  return {};
}

// A chat body with one user message and the given extra fields ("" for none).
std::string chat(const std::string& extra) {
  return R"({"model":"m","messages":[{"role":"user","content":"hi"}])" + (extra.empty() ? "" : "," + extra) + "}";
}

TEST(ServeApi, ChatRequestFields) {
  const GenerateRequest r = parse_generate_request(
      R"({"model":"m","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
         {"role":"assistant","content":null,"reasoning_content":"hmm"},{"role":"user","content":"c"}],
         "max_completion_tokens":12,"temperature":0.5,"top_p":0.9,"top_k":-1,"min_p":0.05,"seed":-3,"stop":"x",
         "presence_penalty":-2,"frequency_penalty":2,"stream":true,"stream_options":{"include_usage":true},"n":1,
         "chat_template_kwargs":{"enable_thinking":false},"user":"ignored","logprobs":false,"tools":[]})",
      Route::chat);
  ASSERT_EQ(r.messages.size(), 4u);
  EXPECT_EQ(r.messages[0].role, "system") << "developer is OpenAI's newer name for system";
  EXPECT_EQ(r.messages[1].content, "a\nb");
  EXPECT_EQ(r.messages[2].content, "");
  EXPECT_EQ(r.messages[2].reasoning_content, std::optional<std::string>("hmm"));
  EXPECT_EQ(r.max_tokens, std::optional<int64_t>(12));
  EXPECT_EQ(r.temperature, std::optional<double>(0.5));
  EXPECT_EQ(r.top_k, std::optional<int64_t>(-1));
  EXPECT_EQ(r.seed, std::optional<uint64_t>(uint64_t(-3)));
  EXPECT_EQ(r.stop, std::vector<std::string>{"x"});
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  EXPECT_EQ(r.enable_thinking, std::optional<bool>(false));

  const SamplerConfig c = sampler_config(r, SamplingDefaults{}, 99);
  EXPECT_FLOAT_EQ(c.temperature, 0.5f);
  EXPECT_EQ(c.top_k, 0) << "-1 turns top-k off";
  EXPECT_FLOAT_EQ(c.min_p, 0.05f);
  EXPECT_EQ(c.seed, uint64_t(-3));
  EXPECT_FLOAT_EQ(c.presence_penalty, -2.f);
  EXPECT_NO_THROW(c.validate());
}

TEST(ServeApi, DefaultsFillWhatTheRequestLeavesOut) {
  const GenerateRequest r = parse_generate_request(chat("\"temperature\":null"), Route::chat);
  EXPECT_FALSE(r.max_tokens);
  EXPECT_FALSE(r.temperature) << "null is absent";
  EXPECT_FALSE(r.stream);
  SamplingDefaults d;
  d.temperature = 0.6;
  d.top_p = 0.95;
  d.top_k = 20;
  const SamplerConfig c = sampler_config(r, d, 1234);
  EXPECT_FLOAT_EQ(c.temperature, 0.6f);
  EXPECT_FLOAT_EQ(c.top_p, 0.95f);
  EXPECT_EQ(c.top_k, 20);
  EXPECT_EQ(c.seed, 1234u) << "no seed: the server's random one";
  EXPECT_FLOAT_EQ(sampler_config(r, SamplingDefaults{}, 0).temperature, 1.f) << "OpenAI's default";
}

TEST(ServeApi, CompletionPrompts) {
  GenerateRequest r = parse_generate_request(R"({"model":"m","prompt":"hello"})", Route::completions);
  EXPECT_EQ(r.prompt, "hello");
  EXPECT_FALSE(r.prompt_is_ids);
  r = parse_generate_request(R"({"model":"m","prompt":["hello"]})", Route::completions);
  EXPECT_EQ(r.prompt, "hello");
  r = parse_generate_request(R"({"model":"m","prompt":[1,2,3],"max_tokens":4,"ignore_eos":true})", Route::completions);
  EXPECT_TRUE(r.prompt_is_ids);
  EXPECT_EQ(r.prompt_ids, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_TRUE(r.ignore_eos);
  r = parse_generate_request(R"({"model":"m","prompt":[[7,8]]})", Route::completions);
  EXPECT_EQ(r.prompt_ids, (std::vector<int64_t>{7, 8}));
}

// Each malformed or unsupported body: the status and the field named.
TEST(ServeApi, RefusalsNameTheField) {
  struct Case {
    const char* what;
    std::string body;
    Route route;
    int status;
    std::string param;
  };
  const std::string deep = R"({"model":"m","messages":)" + std::string(100, '[') + std::string(100, ']') + "}";
  const std::vector<Case> cases = {
      {"empty body", "", Route::chat, 400, ""},
      {"not JSON", "hello", Route::chat, 400, ""},
      {"truncated JSON", R"({"model":"m","messages":[)", Route::chat, 400, ""},
      {"an array", "[1,2]", Route::chat, 400, ""},
      {"a string", R"("x")", Route::chat, 400, ""},
      {"invalid UTF-8", std::string("{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"),
       Route::chat, 400, ""},
      {"nested too deep", deep, Route::chat, 400, ""},
      {"no model", R"({"messages":[{"role":"user","content":"hi"}]})", Route::chat, 400, "model"},
      {"model not a string", R"({"model":5,"messages":[{"role":"user","content":"hi"}]})", Route::chat, 400, "model"},
      {"no messages", R"({"model":"m"})", Route::chat, 400, "messages"},
      {"messages not an array", R"({"model":"m","messages":"hi"})", Route::chat, 400, "messages"},
      {"no messages in the array", R"({"model":"m","messages":[]})", Route::chat, 400, "messages"},
      {"a message not an object", R"({"model":"m","messages":[3]})", Route::chat, 400, "messages[0]"},
      {"unknown role", R"({"model":"m","messages":[{"role":"wizard","content":"x"}]})", Route::chat, 400,
       "messages[0].role"},
      {"no content", R"({"model":"m","messages":[{"role":"user"}]})", Route::chat, 400, "messages[0].content"},
      {"content a number", R"({"model":"m","messages":[{"role":"user","content":1}]})", Route::chat, 400,
       "messages[0].content"},
      {"an image part",
       R"({"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]})",
       Route::chat, 400, "messages[0].content[0].type"},
      {"tool calls", R"({"model":"m","messages":[{"role":"assistant","content":"","tool_calls":[{"id":"1"}]}]})",
       Route::chat, 400, "messages[0].tool_calls"},
      {"max_tokens a string", chat(R"("max_tokens":"10")"), Route::chat, 400, "max_tokens"},
      {"max_tokens 0", chat(R"("max_tokens":0)"), Route::chat, 400, "max_tokens"},
      {"max_tokens negative", chat(R"("max_tokens":-5)"), Route::chat, 400, "max_tokens"},
      {"max_tokens a fraction", chat(R"("max_tokens":1.5)"), Route::chat, 400, "max_tokens"},
      {"max_tokens 1e30", chat(R"("max_tokens":1e30)"), Route::chat, 400, "max_tokens"},
      {"max_tokens past uint64", chat(R"("max_tokens":123456789012345678901234567890)"), Route::chat, 400,
       "max_tokens"},
      {"max_tokens past int64", chat(R"("max_tokens":18446744073709551615)"), Route::chat, 400, "max_tokens"},
      {"max_completion_tokens 0", chat(R"("max_completion_tokens":0)"), Route::chat, 400, "max_completion_tokens"},
      {"temperature a string", chat(R"("temperature":"hot")"), Route::chat, 400, "temperature"},
      {"temperature negative", chat(R"("temperature":-0.1)"), Route::chat, 400, "temperature"},
      {"temperature above 2", chat(R"("temperature":2.5)"), Route::chat, 400, "temperature"},
      {"temperature huge", chat(R"("temperature":1e300)"), Route::chat, 400, "temperature"},
      {"top_p 0", chat(R"("top_p":0)"), Route::chat, 400, "top_p"},
      {"top_p above 1", chat(R"("top_p":1.01)"), Route::chat, 400, "top_p"},
      {"top_k -2", chat(R"("top_k":-2)"), Route::chat, 400, "top_k"},
      {"top_k a fraction", chat(R"("top_k":2.5)"), Route::chat, 400, "top_k"},
      {"min_p above 1", chat(R"("min_p":2)"), Route::chat, 400, "min_p"},
      {"presence_penalty 3", chat(R"("presence_penalty":3)"), Route::chat, 400, "presence_penalty"},
      {"frequency_penalty a string", chat(R"("frequency_penalty":"x")"), Route::chat, 400, "frequency_penalty"},
      {"repetition_penalty 0", chat(R"("repetition_penalty":0)"), Route::chat, 400, "repetition_penalty"},
      {"seed a fraction", chat(R"("seed":1.5)"), Route::chat, 400, "seed"},
      {"seed a string", chat(R"("seed":"abc")"), Route::chat, 400, "seed"},
      {"stop a number", chat(R"("stop":5)"), Route::chat, 400, "stop"},
      {"stop numbers", chat(R"("stop":[1,2])"), Route::chat, 400, "stop"},
      {"too many stops", chat(R"("stop":["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"])"),
       Route::chat, 400, "stop"},
      {"a stop too long", chat("\"stop\":\"" + std::string(300, 'x') + "\""), Route::chat, 400, "stop"},
      {"n 2", chat(R"("n":2)"), Route::chat, 400, "n"},
      {"stream a string", chat(R"("stream":"yes")"), Route::chat, 400, "stream"},
      {"stream_options without stream", chat(R"("stream_options":{"include_usage":true})"), Route::chat, 400,
       "stream_options"},
      {"include_usage a number", chat(R"("stream":true,"stream_options":{"include_usage":1})"), Route::chat, 400,
       "stream_options.include_usage"},
      {"logprobs", chat(R"("logprobs":true)"), Route::chat, 400, "logprobs"},
      {"tools", chat(R"("tools":[{"type":"function","function":{"name":"f"}}])"), Route::chat, 400, "tools"},
      {"json mode", chat(R"("response_format":{"type":"json_object"})"), Route::chat, 400, "response_format"},
      {"logit_bias", chat(R"("logit_bias":{"5":1})"), Route::chat, 400, "logit_bias"},
      {"thinking not a bool", chat(R"("chat_template_kwargs":{"enable_thinking":"no"})"), Route::chat, 400,
       "chat_template_kwargs.enable_thinking"},
      {"no prompt", R"({"model":"m"})", Route::completions, 400, "prompt"},
      {"prompt an object", R"({"model":"m","prompt":{}})", Route::completions, 400, "prompt"},
      {"prompt empty ids", R"({"model":"m","prompt":[]})", Route::completions, 400, "prompt"},
      {"negative id", R"({"model":"m","prompt":[1,-1]})", Route::completions, 400, "prompt"},
      {"id past int32", R"({"model":"m","prompt":[1,4294967296]})", Route::completions, 400, "prompt"},
      {"mixed ids", R"({"model":"m","prompt":[1,"a"]})", Route::completions, 400, "prompt"},
      {"two prompts", R"({"model":"m","prompt":["a","b"]})", Route::completions, 400, "prompt"},
      {"echo", R"({"model":"m","prompt":"a","echo":true})", Route::completions, 400, "echo"},
      {"best_of 2", R"({"model":"m","prompt":"a","best_of":2})", Route::completions, 400, "best_of"},
      {"completion logprobs", R"({"model":"m","prompt":"a","logprobs":2})", Route::completions, 400, "logprobs"},
      {"suffix", R"({"model":"m","prompt":"a","suffix":"z"})", Route::completions, 400, "suffix"},
  };
  for (const Case& c : cases) {
    const Refusal r = refusal([&] { parse_generate_request(c.body, c.route); });
    EXPECT_EQ(r.status, c.status) << c.what;
    EXPECT_EQ(r.param, c.param) << c.what << ": " << r.message;
  }
  EXPECT_GE(cases.size(), 60u);
}

TEST(ServeApi, TokenizeAndDetokenizeRequests) {
  TokenizeRequest t = parse_tokenize_request(R"({"prompt":"hello"})");
  EXPECT_FALSE(t.chat);
  EXPECT_EQ(t.prompt, "hello");
  t = parse_tokenize_request(
      R"({"model":"m","messages":[{"role":"user","content":"x"}],"add_generation_prompt":false})");
  EXPECT_TRUE(t.chat);
  EXPECT_FALSE(t.add_generation_prompt);
  EXPECT_EQ(refusal([] { parse_tokenize_request(R"({})"); }).status, 400);
  EXPECT_EQ(refusal([] { parse_tokenize_request(R"({"prompt":"a","messages":[]})"); }).status, 400);
  EXPECT_EQ(refusal([] { parse_tokenize_request(R"({"prompt":5})"); }).param, "prompt");
  EXPECT_EQ(parse_detokenize_request(R"({"tokens":[1,2]})").tokens, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(refusal([] { parse_detokenize_request(R"({"tokens":"ab"})"); }).param, "tokens");
  EXPECT_EQ(refusal([] { parse_detokenize_request(R"({"tokens":[-1]})"); }).param, "tokens");
}

TEST(ServeApi, JsonDepthSkipsStrings) {
  EXPECT_EQ(json_depth(R"({"a":[1,{"b":[]}]})"), 4);
  EXPECT_EQ(json_depth(R"({"a":"[[[[[[\"[[["})"), 1);
  EXPECT_EQ(json_depth("3"), 0);
}

TEST(ServeApi, ErrorBody) {
  const Json j = Json::parse(error_body(ApiError(404, "no such model", "model", "model_not_found")));
  EXPECT_EQ(j["error"]["message"], "no such model");
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["param"], "model");
  EXPECT_EQ(j["error"]["code"], "model_not_found");
  EXPECT_TRUE(Json::parse(error_body(ApiError(500, "x")))["error"]["param"].is_null());
  EXPECT_EQ(ApiError(401, "x").type(), "authentication_error");
  EXPECT_EQ(ApiError(429, "x").type(), "rate_limit_error");
  EXPECT_EQ(ApiError(503, "x").type(), "server_error");
}

TEST(ServeApi, ResponseAndChunkBodies) {
  ResponseHead h{Route::chat, new_response_id(Route::chat), 1700000000, "m"};
  EXPECT_EQ(h.id.rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(h.id.size(), 9u + 24u);
  Json j = Json::parse(completion_body(h, "héllo", "stop", Usage{5, 2}));
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["content"], "héllo");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["total_tokens"], 7);

  j = Json::parse(chunk_body(h, "", true, ""));
  EXPECT_EQ(j["object"], "chat.completion.chunk");
  EXPECT_EQ(j["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["delta"]["content"], "");
  EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
  j = Json::parse(chunk_body(h, "abc", false, ""));
  EXPECT_EQ(j["choices"][0]["delta"], Json({{"content", "abc"}}));
  j = Json::parse(chunk_body(h, "", false, "length"));
  EXPECT_EQ(j["choices"][0]["delta"], Json::object());
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  j = Json::parse(usage_chunk_body(h, Usage{3, 4}));
  EXPECT_TRUE(j["choices"].empty());
  EXPECT_EQ(j["usage"]["completion_tokens"], 4);

  ResponseHead c{Route::completions, new_response_id(Route::completions), 1700000000, "m"};
  j = Json::parse(chunk_body(c, "xyz", false, ""));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"], "xyz");
  j = Json::parse(completion_body(c, "xyz", "length", Usage{1, 1}));
  EXPECT_EQ(j["choices"][0]["text"], "xyz");

  j = Json::parse(models_body("m", 5, 4096));
  EXPECT_EQ(j["data"][0]["id"], "m");
  EXPECT_EQ(j["data"][0]["max_model_len"], 4096);
  j = Json::parse(tokenize_body({1, 2, 3}, 4096));
  EXPECT_EQ(j["count"], 3);
  EXPECT_EQ(Json::parse(detokenize_body("hi"))["prompt"], "hi");
}

TEST(ServeMetrics, PrometheusText) {
  Metrics m;
  m.count_request("/v1/completions", 200);
  m.count_request("/v1/completions", 200);
  m.count_request("/v1/completions", 429);
  m.observe_ttft(0.003);
  m.observe_ttft(0.2);
  m.observe_ttft(100);
  Gauges g;
  g.queued = 3;
  g.kv_bytes_in_use = 12345;
  const std::string t = m.render(g);
  EXPECT_NE(t.find("ksa_requests_total{route=\"/v1/completions\",status=\"200\"} 2\n"), std::string::npos) << t;
  EXPECT_NE(t.find("ksa_requests_total{route=\"/v1/completions\",status=\"429\"} 1\n"), std::string::npos);
  EXPECT_NE(t.find("ksa_queue_depth 3\n"), std::string::npos);
  EXPECT_NE(t.find("ksa_kv_bytes_in_use 12345\n"), std::string::npos);
  EXPECT_NE(t.find("# TYPE ksa_time_to_first_token_seconds histogram\n"), std::string::npos);
  // Cumulative buckets: 0.003 is in le=0.005 and above; 0.2 from le=0.25; 100 only in +Inf.
  EXPECT_NE(t.find("ksa_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0\n"), std::string::npos);
  EXPECT_NE(t.find("ksa_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"), std::string::npos);
  EXPECT_NE(t.find("ksa_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n"), std::string::npos);
  EXPECT_NE(t.find("ksa_time_to_first_token_seconds_bucket{le=\"60\"} 2\n"), std::string::npos);
  EXPECT_NE(t.find("ksa_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"), std::string::npos);
  EXPECT_NE(t.find("ksa_time_to_first_token_seconds_count 3\n"), std::string::npos);
  // Step durations: one histogram name, two series told apart by their kind label, HELP and TYPE once.
  m.observe_step(0.004, false);
  m.observe_step(0.03, true);
  m.observe_step(0.02, true);
  g.graph_replays = 7;
  const std::string u = m.render(g);
  EXPECT_NE(u.find("ksa_step_duration_seconds_bucket{kind=\"decode\",le=\"0.005\"} 1\n"), std::string::npos) << u;
  EXPECT_NE(u.find("ksa_step_duration_seconds_bucket{kind=\"prefill\",le=\"0.025\"} 1\n"), std::string::npos);
  EXPECT_NE(u.find("ksa_step_duration_seconds_bucket{kind=\"prefill\",le=\"0.05\"} 2\n"), std::string::npos);
  EXPECT_NE(u.find("ksa_step_duration_seconds_count{kind=\"prefill\"} 2\n"), std::string::npos);
  EXPECT_NE(u.find("ksa_step_duration_seconds_sum{kind=\"decode\"} 0.004\n"), std::string::npos);
  EXPECT_EQ(u.find("# TYPE ksa_step_duration_seconds histogram"),
            u.rfind("# TYPE ksa_step_duration_seconds histogram"));
  EXPECT_NE(u.find("ksa_graph_replays_total 7\n"), std::string::npos);
}

}  // namespace
}  // namespace ksa::serve
