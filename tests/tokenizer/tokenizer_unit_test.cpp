// The tokenizer on a small synthetic tokenizer.json (merge order and ties, both merge forms, added tokens
// and their flags, NFC), the UTF-8 helpers against Python's errors="replace", tokenizer.json errors, and
// TextStream (text released token by token: whole characters, stop strings held back).
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "ksa/chat_template.hpp"
#include "ksa/error.hpp"
#include "ksa/text_stream.hpp"
#include "ksa/tokenizer.hpp"
#include "test_util.hpp"

namespace ksa {
namespace {

using Json = nlohmann::json;

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) s += char(cp);
  else if (cp < 0x800) s += {char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
  else s += {char(0xE0 | (cp >> 12)), char(0x80 | ((cp >> 6) & 0x3F)), char(0x80 | (cp & 0x3F))};
  return s;
}

// GPT-2's alphabet character of byte b.
std::string byte_char(int b) {
  int extra = 0;
  for (int x = 0; x < 256; ++x) {
    const bool printable = (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255);
    if (x == b) return utf8(printable ? uint32_t(x) : uint32_t(256 + extra));
    if (!printable) ++extra;
  }
  return "";
}

const std::string kQwenRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Bytes are ids 0..255 in byte order; merged tokens from 256 on.
Json small_tokenizer(bool string_merges) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"a", "b"}, {"b", "c"}, {"ab", "c"}, {"a", "a"}, {byte_char(' '), "a"}, {"c", "a"}, {"Ã", byte_char(0xA9)}};
  int id = 256;
  Json m = Json::array();
  for (const auto& [x, y] : merges) {
    vocab[x + y] = id++;
    if (string_merges) m.push_back(x + " " + y);
    else m.push_back(Json::array({x, y}));
  }
  Json added = Json::array();
  auto add = [&](int aid, const std::string& content, bool special, bool lstrip = false, bool rstrip = false,
                 bool single = false) {
    added.push_back({{"id", aid},
                     {"content", content},
                     {"special", special},
                     {"lstrip", lstrip},
                     {"rstrip", rstrip},
                     {"single_word", single},
                     {"normalized", false}});
  };
  add(300, "<s>", true);
  add(301, "[X]", false, true, true);
  add(302, "<long>", true);
  add(303, "<lo", true);
  add(304, "cat", false, false, false, true);
  return Json{
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         Json::array(
             {{{"type", "Split"}, {"pattern", {{"Regex", kQwenRegex}}}, {"behavior", "Isolated"}, {"invert", false}},
              {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}})}}},
      {"post_processor", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"vocab", vocab}, {"merges", m}}}};
}

Tokenizer make(bool string_merges = false) { return Tokenizer::parse(small_tokenizer(string_merges).dump(), "t.json"); }

using test::error_of;
using test::kNoError;

using Ids = std::vector<int32_t>;
constexpr int32_t AB = 256, BC = 257, ABC = 258, AA = 259, SP_A = 260, CA = 261, E_ACUTE = 262;

TEST(Tokenizer, MergesByRankLeftmostFirst) {
  const Tokenizer t = make();
  EXPECT_EQ(t.encode("abc"), (Ids{ABC}));      // a+b (rank 0), then ab+c (rank 2)
  EXPECT_EQ(t.encode("bcab"), (Ids{BC, AB}));  // a+b first, then b+c
  EXPECT_EQ(t.encode("aaa"), (Ids{AA, 'a'}));  // equal ranks: leftmost pair first
  EXPECT_EQ(t.encode("aaaa"), (Ids{AA, AA}));
  EXPECT_EQ(t.encode("cab"), (Ids{'c', AB}));       // a+b (rank 0) beats c+a (rank 5)
  EXPECT_EQ(t.encode("x a"), (Ids{'x', SP_A}));     // pieces "x", " a"
  EXPECT_EQ(t.encode("\xC3\xA9"), (Ids{E_ACUTE}));  // é as two bytes merged
  EXPECT_EQ(t.vocab_size(), 305);
  EXPECT_EQ(t.num_merges(), 7);
}

TEST(Tokenizer, BothMergeFormsAgree) {
  const Tokenizer a = make(false), b = make(true);
  for (const char* s : {"abcabc aab", "cabbage", "a b c", "\xC3\xA9t\xC3\xA9"})
    EXPECT_EQ(a.encode(s), b.encode(s)) << s;
}

TEST(Tokenizer, NormalisesToNfcBeforeSplitting) {
  const Tokenizer t = make();
  EXPECT_EQ(t.encode("e\xCC\x81"), t.encode("\xC3\xA9"));  // e + combining acute == é
  EXPECT_EQ(t.decode(t.encode("e\xCC\x81")), "\xC3\xA9");
}

TEST(Tokenizer, AddedTokensLongestFirstWithFlags) {
  const Tokenizer t = make();
  EXPECT_EQ(t.encode("<long>"), (Ids{302}));  // longest of "<long>" and "<lo"
  EXPECT_EQ(t.encode("<lox"), (Ids{303, 'x'}));
  EXPECT_EQ(t.encode("ab<s>ab"), (Ids{AB, 300, AB}));
  EXPECT_EQ(t.encode("a  [X]  b"), (Ids{'a', 301, 'b'}));  // lstrip/rstrip eat the spaces around [X]
  EXPECT_EQ(t.encode("cat"), (Ids{304}));
  EXPECT_EQ(t.encode("a cat!"), (Ids{'a', ' ', 304, '!'}));
  EXPECT_EQ(t.encode("concat"), (Ids{'c', 'o', 'n', CA, 't'}));  // single_word: not inside a word
  // parse_special = false: special tokens are text; non-special added tokens still match.
  EXPECT_EQ(t.encode("<s>cat", false), (Ids{'<', 's', '>', 304}));
  EXPECT_EQ(t.decode(t.encode("ab<s>ab")), "ab<s>ab");
  EXPECT_EQ(t.decode(t.encode("ab<s>ab"), true), "abab");
  EXPECT_TRUE(t.is_special(300));
  EXPECT_FALSE(t.is_special(301));
  EXPECT_EQ(t.token_to_id("<long>"), 302);
  EXPECT_EQ(t.token_to_id("ab"), AB);
  EXPECT_EQ(t.token_to_id("zz"), -1);
  EXPECT_EQ(t.id_to_token(SP_A), byte_char(' ') + "a");
}

TEST(Tokenizer, DecodeHandlesUnknownAndNegativeIds) {
  const Tokenizer t = make();
  EXPECT_EQ(t.decode(Ids{'a', 290, 100000, 'b'}), "ab");  // unknown ids are skipped, as HF does
  EXPECT_EQ(error_of([&] { t.decode(Ids{-1}); }), "tokenizer: cannot decode the negative id -1");
  EXPECT_EQ(t.decode(Ids{}), "");
  EXPECT_EQ(t.encode(""), Ids{});
}

TEST(Utf8, ReplacementMatchesPython) {
  // bytes.decode("utf-8", "replace") in Python 3.11.
  const std::string R = "\xEF\xBF\xBD";
  EXPECT_EQ(utf8_replace_invalid("\xE2\x82"), R);
  EXPECT_EQ(utf8_replace_invalid("\x80\x80"), R + R);
  EXPECT_EQ(utf8_replace_invalid("\xF0\x9F\x98"), R);
  EXPECT_EQ(utf8_replace_invalid("\xED\xA0\x80"), R + R + R);  // a surrogate
  EXPECT_EQ(utf8_replace_invalid("\xC0\xAF"), R + R);          // an overlong
  EXPECT_EQ(utf8_replace_invalid("a\xFF"
                                 "b"),
            "a" + R + "b");
  EXPECT_EQ(utf8_replace_invalid("\xF4\x90\x80\x80"), R + R + R + R);  // above U+10FFFF
  EXPECT_EQ(utf8_replace_invalid("\xE0\x80"), R + R);
  EXPECT_EQ(utf8_replace_invalid("\xF0\x9F\x98\x80\xF0\x9F"), "\xF0\x9F\x98\x80" + R);
  EXPECT_EQ(utf8_replace_invalid("\xE2\x82\xAC\xE2"), "\xE2\x82\xAC" + R);
  size_t bad = 99;
  EXPECT_TRUE(is_valid_utf8("caf\xC3\xA9 \xF0\x9F\x98\x80", &bad));
  EXPECT_FALSE(is_valid_utf8("ab\xED\xA0\x80", &bad));
  EXPECT_EQ(bad, 2u);
}

TEST(TokenizerErrors, NameTheFieldAndValue) {
  auto parse_with = [](const std::function<void(Json&)>& edit) {
    Json j = small_tokenizer(false);
    edit(j);
    return error_of([&] { Tokenizer::parse(j.dump(), "t.json"); });
  };
  EXPECT_EQ(error_of([] { Tokenizer::parse("{\"model\": ", "t.json"); }),
            "t.json: invalid JSON: parse error at line 1, column 11: syntax error while parsing value - unexpected end "
            "of input; "
            "expected '[', '{', or a literal");
  EXPECT_EQ(parse_with([](Json& j) { j["model"]["type"] = "WordPiece"; }),
            "t.json: model.type: \"WordPiece\" is not supported (only BPE)");
  EXPECT_EQ(parse_with([](Json& j) { j["model"]["vocab"].erase(byte_char(0)); }),
            "t.json: model.vocab: lacks the byte-level symbol \"" + byte_char(0) +
                "\" for byte 0 (byte-level BPE needs all 256)");
  EXPECT_EQ(parse_with([](Json& j) {
              j["model"]["merges"][1] = Json::array({"zz", "b"});
            }),
            "t.json: model.merges[1]: token \"zz\" is not in the vocabulary");
  EXPECT_EQ(parse_with([](Json& j) { j["model"]["merges"][0] = "a b c"; }),
            "t.json: model.merges[0]: must be two tokens separated by one space (got \"a b c\")");
  EXPECT_EQ(parse_with([](Json& j) { j["model"]["merges"][0] = 7; }),
            "t.json: model.merges[0]: must be \"a b\" or [\"a\", \"b\"] (got 7)");
  EXPECT_EQ(parse_with([](Json& j) { j["model"]["vocab"]["x"] = -3; }),
            "t.json: model.vocab[\"x\"]: must be a token id in [0, 2^31) (got -3)");
  EXPECT_EQ(parse_with([](Json& j) {
              j["pre_tokenizer"] = {{"type", "Metaspace"}};
            }),
            "t.json: pre_tokenizer.type: \"Metaspace\" is not supported (Split, ByteLevel or a Sequence of them)");
  EXPECT_EQ(parse_with([](Json& j) { j["pre_tokenizer"]["pretokenizers"].erase(1); }),
            "t.json: pre_tokenizer: has no ByteLevel step (only byte-level BPE is supported)");
  EXPECT_EQ(parse_with([](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(a"; }),
            "t.json: pre_tokenizer.pretokenizers[0].pattern.Regex: ICU cannot compile the regex "
            "(U_REGEX_MISMATCHED_PAREN at offset 2): (a");
  EXPECT_EQ(parse_with([](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; }),
            "t.json: pre_tokenizer.pretokenizers[0].behavior: \"Removed\" is not supported (only Isolated)");
  EXPECT_EQ(parse_with([](Json& j) {
              j["normalizer"] = {{"type", "Lowercase"}};
            }),
            "t.json: normalizer.type: \"Lowercase\" is not supported (NFC, NFD, NFKC, NFKD or a Sequence of them)");
  EXPECT_EQ(parse_with([](Json& j) {
              j["decoder"] = {{"type", "WordPiece"}};
            }),
            "t.json: decoder: type \"WordPiece\" is not supported (ByteLevel or null)");
  EXPECT_EQ(parse_with([](Json& j) {
              j["added_tokens"][0]["id"] = "x";
            }).rfind("t.json: added_tokens[0]: must be an object with", 0),
            0u);
  EXPECT_EQ(parse_with([](Json& j) { j["model"]["byte_fallback"] = true; }),
            "t.json: model.byte_fallback: true is not supported (byte-level BPE needs no fallback)");
  EXPECT_EQ(error_of([] { Tokenizer::load("/nonexistent/dir/tokenizer.json"); }),
            "/nonexistent/dir/tokenizer.json: cannot open tokenizer.json");
  const std::string long_path = "/tmp/" + std::string(300, 't');  // std::filesystem threw filesystem_error on it
  EXPECT_EQ(error_of([&] { Tokenizer::load(long_path); }), long_path + ": cannot open tokenizer.json");
  EXPECT_EQ(error_of([&] { ChatTemplate::load(long_path); }), long_path + ": cannot open tokenizer_config.json");
}

// TextStream over byte tokens (ids 0..255 are the bytes): what each push releases.
std::vector<std::string> stream_pieces(const std::string& bytes, std::vector<std::string> stops,
                                       bool* stopped = nullptr, std::string* final_piece = nullptr) {
  const Tokenizer t = make();
  TextStream ts(t, std::move(stops));
  std::vector<std::string> pieces;
  bool stop = false;
  for (unsigned char b : bytes) {
    std::string out;
    stop = ts.push(int32_t(b), out);
    pieces.push_back(out);
    if (stop) break;
  }
  std::string rest;
  ts.finish(rest);
  if (final_piece) *final_piece = rest;
  if (stopped) *stopped = stop;
  return pieces;
}

TEST(TextStream, ReleasesWholeCharactersOnly) {
  std::string rest;
  const auto p = stream_pieces("a\xC3\xA9\xE2\x82\xAC!", {}, nullptr, &rest);  // a, e-acute, euro, !
  EXPECT_EQ(p, (std::vector<std::string>{"a", "", "\xC3\xA9", "", "", "\xE2\x82\xAC", "!"}));
  EXPECT_EQ(rest, "");
  stream_pieces("a\xE2\x82", {}, nullptr, &rest);  // ends inside a character: U+FFFD at the end
  EXPECT_EQ(rest, "\xEF\xBF\xBD");
}

TEST(TextStream, StopStringsAreHeldBackAndCut) {
  bool stopped = false;
  std::string rest;
  auto p = stream_pieces("say END now", {"END"}, &stopped, &rest);
  EXPECT_TRUE(stopped);
  std::string all;
  for (const std::string& s : p) all += s;
  EXPECT_EQ(all, "say ") << "the text before the stop string, never the string or what follows";
  EXPECT_EQ(p[4], "") << "'E' could begin END: held back";
  EXPECT_EQ(rest, "") << "nothing after a stop";
  // A prefix of a stop string that does not complete is released later.
  p = stream_pieces("xENy", {"END"}, &stopped, &rest);
  EXPECT_FALSE(stopped);
  EXPECT_EQ(p, (std::vector<std::string>{"x", "", "", "ENy"}));
  // At the end, a held partial stop string is plain text.
  p = stream_pieces("abEN", {"END", ""}, &stopped, &rest);
  EXPECT_EQ(rest, "EN");
  // The earliest of several stop strings wins.
  p = stream_pieces("1234", {"34", "23"}, &stopped, &rest);
  all.clear();
  for (const std::string& s : p) all += s;
  EXPECT_TRUE(stopped);
  EXPECT_EQ(all, "1");
}

// Issue #26: hostile tokenizer.json files end in a ksa::Error naming the file; long whitespace tokenizes.
TEST(TokenizerHostile, DeepNestingIsRefusedAtParseTime) {
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  // The "got ..." excerpt of a bad entry once dumped the value recursively and overflowed the stack.
  std::string text = small_tokenizer(false).dump();
  const std::string key = "\"dropout\":null";
  ASSERT_NE(text.find(key), std::string::npos);
  text.replace(text.find(key), key.size(), "\"dropout\":" + deep);
  EXPECT_NE(error_of([&] {
              Tokenizer::parse(text, "t.json");
            }).find("t.json: invalid JSON: nested deeper than 100 levels (at byte "),
            std::string::npos);
  EXPECT_EQ(error_of([&] { Tokenizer::parse("{\"added_tokens\": [" + deep + "]}", "t.json"); }),
            "t.json: invalid JSON: nested deeper than 100 levels (at byte 116)");
}

TEST(TokenizerHostile, NumberBeyondDoubleIsAnError) {
  std::string text = small_tokenizer(false).dump();
  const std::string key = "\"dropout\":null";
  text.replace(text.find(key), key.size(), "\"dropout\":1e309");
  EXPECT_EQ(error_of([&] { Tokenizer::parse(text, "t.json"); }),
            "t.json: invalid JSON: number overflow parsing '1e309' (a number must fit in a double)");
}

TEST(TokenizerHostile, SparseIdsDoNotAllocateTheirRange) {
  // One added token with id 2^31-1 once threw std::bad_alloc; 200,000,000 allocated 6.5 GB. The id table
  // may have at most 65536 ids without a token beyond the tokens the file defines.
  auto with_added_id = [](int64_t id) {
    Json j = small_tokenizer(false);
    j["added_tokens"][0]["id"] = id;
    return error_of([&] { Tokenizer::parse(j.dump(), "t.json"); });
  };
  EXPECT_EQ(with_added_id(2147483647),
            "t.json: added_tokens[0].id: 2147483647 is far beyond the 268 tokens the file defines (ids must be < 268 + "
            "65536)");
  EXPECT_EQ(with_added_id(200000000),
            "t.json: added_tokens[0].id: 200000000 is far beyond the 268 tokens the file defines (ids must be < 268 + "
            "65536)");
  EXPECT_EQ(with_added_id(268 + 65535), kNoError);
  Json j = small_tokenizer(false);
  j["model"]["vocab"]["zz"] = 2147483647;
  EXPECT_EQ(error_of([&] { Tokenizer::parse(j.dump(), "t.json"); }),
            "t.json: model.vocab[\"zz\"]: 2147483647 is far beyond the 264 tokens the vocabulary defines (ids must be "
            "< 264 + 65536)");
}

TEST(TokenizerHostile, LongWhitespaceRunsTokenize) {
  // 500 KB of whitespace failed with U_REGEX_STACK_OVERFLOW in ICU's backtracking (the Qwen regex's
  // \s*[\r\n]+ and \s+(?!\S) alternatives push a state per character).
  const Tokenizer tok = make();
  for (const std::string unit : {" ", "\n", " \n", "\t", "\r\n"}) {
    std::string s;
    while (s.size() < 500000) s += unit;
    s += "ab";
    std::vector<int32_t> ids;
    EXPECT_EQ(error_of([&] { ids = tok.encode(s); }), kNoError) << "unit " << int(unit[0]);
    EXPECT_EQ(tok.decode(ids), s) << "unit " << int(unit[0]);
  }
}

}  // namespace
}  // namespace ksa
