// tokenizer.json: ksa::Tokenizer::parse on arbitrary text. Checks: only ksa::Error escapes; an accepted
// tokenizer encodes and decodes a sample (with and without special tokens) and its own tokens.
#include "fuzz_util.hpp"
#include "ksa/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ksa::fuzz::expect_only_ksa_errors([&] {
    const ksa::Tokenizer tok = ksa::Tokenizer::parse(ksa::fuzz::as_text(data, size), "tokenizer.json");
    for (const char* s :
         {"Hello, world! 123  \n\t x", "<|im_start|>user\nhi<|im_end|>", "\xE4\xB8\xAD\xCC\x81 e\xCC\x81"}) {
      const std::vector<int32_t> ids = tok.encode(s);
      const std::vector<int32_t> plain = tok.encode(s, false);
      if (!ksa::is_valid_utf8(tok.decode(ids)) || !ksa::is_valid_utf8(tok.decode(plain, true))) std::abort();
    }
    std::vector<int32_t> all;
    for (int64_t id = 0; id < tok.vocab_size() && id < 4096; ++id) all.push_back(int32_t(id));
    if (!ksa::is_valid_utf8(tok.decode(all))) std::abort();
  });
  return 0;
}
