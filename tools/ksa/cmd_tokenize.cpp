// `ksa tokenize`: the token ids of a text under a checkpoint's (or any) tokenizer.json, one per line; for
// checking other encoders against ours (the training recipe's tests) and for inspecting prompts.
#include <cstdio>

#include "eval_common.hpp"

namespace ksa::tools {
namespace {

int run_tokenize(int argc, char** argv) {
  cli::Flags f("tokenize", "Print the token ids of a text, one per line (with --count only their number).");
  std::string& dir = f.str("-m,--model", "", "checkpoint directory with tokenizer.json, or a tokenizer.json file");
  std::string& text = f.str("-p,--prompt", "", "the text");
  std::string& file = f.str("-f,--file", "", "read the text from a file");
  bool& count = f.flag("--count", "print only the number of tokens");
  if (!f.parse(argc, argv)) return 0;
  if (dir.empty()) throw cli::UsageError("-m/--model: required");
  if (f.given("--prompt") == f.given("--file")) throw cli::UsageError("give exactly one of -p/--prompt and -f/--file");
  const Tokenizer tok = Tokenizer::load(dir);
  const std::vector<int32_t> ids = tok.encode(f.given("--prompt") ? text : read_text_file(file, "text file"));
  if (count) {
    std::printf("%zu\n", ids.size());
    return 0;
  }
  std::string out;
  for (int32_t id : ids) {
    out += std::to_string(id);
    out += '\n';
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}

cli::Register reg{{"tokenize", "print the token ids of a text", run_tokenize}};

}  // namespace
}  // namespace ksa::tools
