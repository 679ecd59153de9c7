// The chat template: ksa::ChatTemplate::load on arbitrary tokenizer_config.json text (mode byte even) and
// ksa::render_qwen3_chat on arbitrary messages (mode byte odd: fields separated by NUL bytes, one role byte
// then the content, optionally a reasoning_content after a 0x01 byte). Checks: only ksa::Error escapes; a
// rendering is valid UTF-8 when every input is, and holds every user message verbatim.
#include <vector>

#include "fuzz_util.hpp"
#include "ksa/chat_template.hpp"
#include "ksa/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string_view in = ksa::fuzz::as_text(data + 1, size - 1);
  if (data[0] % 2 == 0) {
    static ksa::fuzz::MemFile file("tokenizer_config.json");
    const std::string& path = file.write(in);
    ksa::fuzz::expect_only_ksa_errors([&] {
      const ksa::ChatTemplate t = ksa::ChatTemplate::load(path);
      if (t.recognized() != (ksa::chat_template_hash(t.source()) == 0x2bfdb7aa9754484eull)) std::abort();
    });
    return 0;
  }
  static const char* kRoles[] = {"system", "user", "assistant", "tool", "other"};
  std::vector<ksa::ChatMessage> msgs;
  size_t pos = 0;
  while (pos < in.size() && msgs.size() < 64) {
    size_t end = in.find('\0', pos);
    if (end == std::string_view::npos) end = in.size();
    std::string_view field = in.substr(pos, end - pos);
    pos = end + 1;
    if (field.empty()) continue;
    ksa::ChatMessage m;
    m.role = kRoles[uint8_t(field[0]) % 5];
    field.remove_prefix(1);
    const size_t r = field.find('\x01');
    m.content = std::string(field.substr(0, r));
    if (r != std::string_view::npos) m.reasoning_content = std::string(field.substr(r + 1));
    msgs.push_back(std::move(m));
  }
  ksa::ChatOptions opt;
  opt.add_generation_prompt = data[0] & 2;
  if (data[0] & 4) opt.enable_thinking = bool(data[0] & 8);
  bool all_valid = true;
  for (const ksa::ChatMessage& m : msgs)
    all_valid = all_valid && ksa::is_valid_utf8(m.content) &&
                (!m.reasoning_content || ksa::is_valid_utf8(*m.reasoning_content));
  ksa::fuzz::expect_only_ksa_errors([&] {
    const std::string out = ksa::render_qwen3_chat(msgs, opt);
    if (all_valid && !ksa::is_valid_utf8(out)) std::abort();
    for (const ksa::ChatMessage& m : msgs)
      if (m.role == "user" && out.find(m.content) == std::string::npos) std::abort();
  });
  return 0;
}
