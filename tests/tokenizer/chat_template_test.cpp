// The hand-written Qwen3 chat template against Jinja2's rendering of the real template
// (chat_goldens.json, made by make_chat_goldens.py), and loading tokenizer_config.json.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ksa/chat_template.hpp"
#include "ksa/error.hpp"
#include "ksa/tokenizer.hpp"
#include "test_util.hpp"

namespace ksa {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

const std::string kSource = KSA_SOURCE_DIR;

Json goldens() {
  std::ifstream in(kSource + "/tests/tokenizer/chat_goldens.json");
  EXPECT_TRUE(in.good());
  return Json::parse(in);
}

using test::error_of;

TEST(ChatTemplate, MatchesJinjaGoldens) {
  const Json g = goldens();
  ASSERT_GE(g["cases"].size(), 15u);
  for (const Json& c : g["cases"]) {
    std::vector<ChatMessage> msgs;
    for (const Json& m : c["messages"]) {
      ChatMessage x{m["role"].get<std::string>(), m["content"].get<std::string>(), std::nullopt};
      if (m.contains("reasoning_content")) x.reasoning_content = m["reasoning_content"].get<std::string>();
      msgs.push_back(std::move(x));
    }
    ChatOptions opt;
    opt.add_generation_prompt = c["add_generation_prompt"].get<bool>();
    if (c.contains("enable_thinking")) opt.enable_thinking = c["enable_thinking"].get<bool>();
    EXPECT_EQ(render_qwen3_chat(msgs, opt), c["expected"].get<std::string>()) << "case " << c["name"];
  }
}

TEST(ChatTemplate, RecognisesTheGoldenTemplate) {
  const Json g = goldens();
  const std::string text = g["template"].get<std::string>();
  char hex[32];
  std::snprintf(hex, sizeof hex, "%016llx", (unsigned long long)chat_template_hash(text));
  EXPECT_EQ(std::string(hex), g["template_fnv1a64"].get<std::string>());
  EXPECT_TRUE(ChatTemplate::from_source(text).recognized());
  EXPECT_FALSE(ChatTemplate::from_source(text + " ").recognized());
}

TEST(ChatTemplate, LoadsTheReferenceConfig) {
  const std::string dir = find_reference_tokenizer({kSource});
  if (dir.empty()) GTEST_SKIP() << "reference tokenizer not cached (run scripts/fetch_test_data.sh)";
  const ChatTemplate t = ChatTemplate::load(dir);
  EXPECT_TRUE(t.recognized()) << "the cached Qwen3 template differs from the one the goldens were made from";
  EXPECT_EQ(t.source(), goldens()["template"].get<std::string>());
}

TEST(ChatTemplate, LoadErrorsNameTheFile) {
  const fs::path d = fs::temp_directory_path() / ("ksa_chat_" + std::to_string(::getpid()));
  fs::create_directories(d);
  const std::string p = (d / "tokenizer_config.json").string();
  EXPECT_EQ(error_of([&] { ChatTemplate::load(d.string()); }), p + ": cannot open tokenizer_config.json");
  std::ofstream(p) << "{\"chat_template\": ";
  EXPECT_EQ(error_of([&] { ChatTemplate::load(p); }).rfind(p + ": invalid JSON: ", 0), 0u);
  std::ofstream(p) << "{\"eos_token\": \"x\"}";
  EXPECT_EQ(error_of([&] { ChatTemplate::load(p); }), p + ": chat_template: missing");
  std::ofstream(p) << "{\"chat_template\": 3}";
  EXPECT_EQ(error_of([&] { ChatTemplate::load(p); }), p + ": chat_template: must be a string");
  std::ofstream(p) << "{\"chat_template\": [{\"name\": \"default\", \"template\": \"{{ x }}\"}]}";
  EXPECT_EQ(ChatTemplate::load(p).source(), "{{ x }}");
  // Issue #26: a non-string name in the list form once escaped as nlohmann::json::type_error; deep nesting
  // and numbers beyond a double end in the same reader's errors as every other JSON file.
  std::ofstream(p)
      << "{\"chat_template\": [{\"name\": 1, \"template\": \"a\"}, {\"name\": \"default\", \"template\": \"b\"}]}";
  EXPECT_EQ(ChatTemplate::load(p).source(), "b");
  std::ofstream(p) << "{\"chat_template\": [{\"name\": 1, \"template\": \"a\"}]}";
  EXPECT_EQ(error_of([&] { ChatTemplate::load(p); }), p + ": chat_template: a list without a \"default\" entry");
  std::ofstream(p) << "{\"chat_template\": " << std::string(200000, '[') << std::string(200000, ']') << "}";
  EXPECT_EQ(error_of([&] { ChatTemplate::load(p); }),
            p + ": invalid JSON: nested deeper than 100 levels (at byte 117)");
  std::ofstream(p) << "{\"model_max_length\": 1e309, \"chat_template\": \"x\"}";
  EXPECT_EQ(error_of([&] { ChatTemplate::load(p); }),
            p + ": invalid JSON: number overflow parsing '1e309' (a number must fit in a double)");
  EXPECT_EQ(error_of([] { render_qwen3_chat({}); }), "chat template: no messages");
  fs::remove_all(d);
}

}  // namespace
}  // namespace ksa
