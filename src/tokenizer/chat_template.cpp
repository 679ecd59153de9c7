// The Qwen3 chat template by hand (see ksa/chat_template.hpp). Each step below is the template's statement
// of the same meaning; Python string methods are reproduced exactly (split, strip('\n'), lstrip, rstrip).
#include "ksa/chat_template.hpp"

#include <vector>

#include "core/json_input.hpp"
#include "ksa/error.hpp"

namespace ksa {
namespace {

// Known template texts (FNV-1a 64 of the exact text): the Qwen3 template with thinking support, as shipped
// in Qwen3's tokenizer_config.json.
constexpr uint64_t kKnownTemplates[] = {0x2bfdb7aa9754484eull};

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

std::string lstrip_nl(std::string_view s) {
  size_t b = 0;
  while (b < s.size() && s[b] == '\n') ++b;
  return std::string(s.substr(b));
}
std::string rstrip_nl(std::string_view s) {
  size_t e = s.size();
  while (e > 0 && s[e - 1] == '\n') --e;
  return std::string(s.substr(0, e));
}
std::string strip_nl(std::string_view s) { return lstrip_nl(rstrip_nl(s)); }

// Python's s.split(sep)[0] and s.split(sep)[-1].
std::string_view before_first(std::string_view s, std::string_view sep) {
  const size_t p = s.find(sep);
  return p == std::string_view::npos ? s : s.substr(0, p);
}
std::string_view after_last(std::string_view s, std::string_view sep) {
  const size_t p = s.rfind(sep);
  return p == std::string_view::npos ? s : s.substr(p + sep.size());
}

}  // namespace

uint64_t chat_template_hash(std::string_view text) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string render_qwen3_chat(std::span<const ChatMessage> messages, const ChatOptions& opt) {
  if (messages.empty()) fail("chat template: no messages");
  const int64_t n = int64_t(messages.size());
  std::string out;
  // {%- if tools %} ... {%- else %}: no tools here.
  if (messages[0].role == "system") out += "<|im_start|>system\n" + messages[0].content + "<|im_end|>\n";

  // The last user turn that is a real query (not a wrapped tool response), searched from the end.
  bool multi_step_tool = true;
  int64_t last_query_index = n - 1;
  for (int64_t index = n - 1; index >= 0; --index) {
    const ChatMessage& m = messages[size_t(index)];
    if (multi_step_tool && m.role == "user" &&
        !(starts_with(m.content, "<tool_response>") && ends_with(m.content, "</tool_response>"))) {
      multi_step_tool = false;
      last_query_index = index;
    }
  }

  for (int64_t i = 0; i < n; ++i) {
    const ChatMessage& m = messages[size_t(i)];
    const bool first = i == 0, last = i == n - 1;
    if (m.role == "user" || (m.role == "system" && !first)) {
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    } else if (m.role == "assistant") {
      std::string content = m.content;
      std::string reasoning;
      if (m.reasoning_content) {
        reasoning = *m.reasoning_content;
      } else if (m.content.find("</think>") != std::string::npos) {
        content = lstrip_nl(after_last(m.content, "</think>"));
        reasoning = lstrip_nl(after_last(rstrip_nl(before_first(m.content, "</think>")), "<think>"));
      }
      if (i > last_query_index && (last || !reasoning.empty()))
        out += "<|im_start|>" + m.role + "\n<think>\n" + strip_nl(reasoning) + "\n</think>\n\n" + lstrip_nl(content);
      else out += "<|im_start|>" + m.role + "\n" + content;
      out += "<|im_end|>\n";
    } else if (m.role == "tool") {
      if (first || messages[size_t(i - 1)].role != "tool") out += "<|im_start|>user";
      out += "\n<tool_response>\n" + m.content + "\n</tool_response>";
      if (last || messages[size_t(i + 1)].role != "tool") out += "<|im_end|>\n";
    }
  }
  if (opt.add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    if (opt.enable_thinking && !*opt.enable_thinking) out += "<think>\n\n</think>\n\n";
  }
  return out;
}

ChatTemplate ChatTemplate::from_source(std::string source) {
  ChatTemplate t;
  const uint64_t h = chat_template_hash(source);
  for (uint64_t k : kKnownTemplates) t.recognized_ = t.recognized_ || k == h;
  t.source_ = std::move(source);
  return t;
}

ChatTemplate ChatTemplate::load(const std::string& path) {
  std::string p = path;
  const std::string text = detail::read_json_text(p, "tokenizer_config.json");
  const detail::Json j = detail::parse_json(text, p);
  if (!j.is_object()) fail(p, ": must be a JSON object");
  auto it = j.find("chat_template");
  if (it == j.end() || it->is_null()) fail(p, ": chat_template: missing");
  if (it->is_array()) {
    // The list form [{name, template}, ...]: take the "default" entry.
    for (const auto& e : *it)
      if (e.is_object() && e.contains("name") && e["name"] == "default" && e.contains("template") &&
          e["template"].is_string())
        return from_source(e["template"].get<std::string>());
    fail(p, ": chat_template: a list without a \"default\" entry");
  }
  if (!it->is_string()) fail(p, ": chat_template: must be a string");
  return from_source(it->get<std::string>());
}

}  // namespace ksa
