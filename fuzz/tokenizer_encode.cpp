// Encoding and decoding arbitrary bytes with the real Qwen3 tokenizer (the cache of
// scripts/fetch_test_data.sh, or $KSA_TOKENIZER_DIR; without either, a small byte-level BPE with Qwen's
// regex). Input: one mode byte, then the payload.
//   mode even: the payload as text. Invalid UTF-8 must be a ksa::Error; valid UTF-8 must encode, and
//              decode(encode(s)) must be s with the text between added tokens NFC-normalised (HF's rule).
//   mode odd:  the payload as int32 ids: decode never fails for ids >= 0 and always yields valid UTF-8.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>

#include "fuzz_util.hpp"
#include "ksa/tokenizer.hpp"
#include "tokenizer/round_trip_oracle.hpp"  // tests/

namespace {

std::unique_ptr<ksa::Tokenizer> g_tok;

std::string small_tokenizer_json() {
  using Json = nlohmann::json;
  Json vocab = Json::object();
  int extra = 0;
  auto utf8 = [](uint32_t cp) {
    std::string s;
    if (cp < 0x80) s += char(cp);
    else s += {char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
    return s;
  };
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    vocab[utf8(printable ? uint32_t(b) : uint32_t(256 + extra++))] = b;
  }
  Json merges = Json::array();
  int id = 256;
  for (auto [a, b] : {std::pair{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"Ġ", "t"}, {"Ċ", "Ċ"}, {"Ġ", "Ġ"}}) {
    vocab[std::string(a) + b] = id++;
    merges.push_back(Json::array({a, b}));
  }
  const char* regex =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  Json added = Json::array();
  for (auto [aid, content] : {std::pair{300, "<|im_start|>"}, {301, "<|im_end|>"}, {302, "<think>"}})
    added.push_back({{"id", aid},
                     {"content", content},
                     {"special", aid != 302},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"single_word", false},
                     {"normalized", false}});
  return Json{
      {"added_tokens", added},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers", Json::array({{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}},
                                       {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}}
      .dump();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("KSA_TOKENIZER_DIR");
  const std::string dir = env && *env ? std::string(env) : ksa::find_reference_tokenizer({KSA_SOURCE_DIR});
  g_tok = std::make_unique<ksa::Tokenizer>(
      dir.empty() ? ksa::Tokenizer::parse(small_tokenizer_json(), "small tokenizer") : ksa::Tokenizer::load(dir));
  std::fprintf(stderr, "fuzz_tokenizer_encode: %s (%lld ids)\n",
               dir.empty() ? "the small built-in tokenizer" : dir.c_str(), (long long)g_tok->vocab_size());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const ksa::Tokenizer& tok = *g_tok;
  const std::string payload(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] % 2 == 0) {
    const bool valid = ksa::is_valid_utf8(payload);
    std::vector<int32_t> ids;
    try {
      ids = tok.encode(payload, data[0] % 4 == 0);
    } catch (const ksa::Error&) {
      if (valid) std::abort();  // valid text always encodes
      return 0;
    }
    if (!valid) std::abort();  // invalid UTF-8 must be refused
    for (int32_t id : ids)
      if (id < 0 || id >= tok.vocab_size()) std::abort();
    if (data[0] % 4 == 0 && tok.decode(ids) != ksa::test::expected_round_trip(tok, payload)) std::abort();
    return 0;
  }
  std::vector<int32_t> ids(payload.size() / 4);
  if (!ids.empty()) std::memcpy(ids.data(), payload.data(), ids.size() * 4);
  for (int32_t& id : ids) id = id < 0 ? -(id + 1) : id;
  if (!ksa::is_valid_utf8(tok.decode(ids, data[0] % 4 == 1))) std::abort();
  (void)tok.decode_bytes(ids);
  return 0;
}
