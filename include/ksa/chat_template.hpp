// The Qwen3 chat template (tokenizer_config.json `chat_template`, a Jinja2 program) rendered by hand for the
// common cases: system, user, assistant and tool turns, assistant reasoning (`reasoning_content` or
// <think>...</think> in the content), add_generation_prompt and enable_thinking. Function calling (`tools`,
// `tool_calls`) is not supported. The output is byte-identical to Jinja2 rendering the released template
// (tests/tokenizer/chat_goldens.json, made by tests/tokenizer/make_chat_goldens.py).
#pragma once
#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace ksa {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", "tool" (others render nothing, as in the template)
  std::string content;
  std::optional<std::string> reasoning_content;  // assistant turns: the thinking text, if given separately
};

struct ChatOptions {
  bool add_generation_prompt = false;
  // nullopt: undefined in the template (thinking on); false adds the empty <think></think> block.
  std::optional<bool> enable_thinking;
};

// Renders the Qwen3 template. Throws ksa::Error for an empty message list.
std::string render_qwen3_chat(std::span<const ChatMessage> messages, const ChatOptions& options = {});

class ChatTemplate {
 public:
  // `path`: tokenizer_config.json or a directory holding one. Throws ksa::Error naming the file when it is
  // missing, invalid, or has no chat_template.
  static ChatTemplate load(const std::string& path);
  static ChatTemplate from_source(std::string source);

  // Whether the template text is one this renderer is known to reproduce exactly (the Qwen3 template).
  bool recognized() const { return recognized_; }
  const std::string& source() const { return source_; }
  std::string render(std::span<const ChatMessage> messages, const ChatOptions& options = {}) const {
    return render_qwen3_chat(messages, options);
  }

 private:
  std::string source_;
  bool recognized_ = false;
};

// FNV-1a 64-bit hash of a template text (how ChatTemplate recognises the templates it reproduces).
uint64_t chat_template_hash(std::string_view text);

}  // namespace ksa
