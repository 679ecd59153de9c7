// The layer-pattern parser: exactly ints, lists, '+', '*' and parentheses.
#include <gtest/gtest.h>

#include <string>

#include "ksa/error.hpp"
#include "ksa/pattern.hpp"

namespace ksa {
namespace {

std::string error_of(const std::string& expr, int64_t layers) {
  try {
    parse_layer_pattern(expr, layers);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Pattern, ReleasedForms) {
  const auto w = parse_layer_pattern("([128]*3+[16768]*1)*9", 36);
  ASSERT_EQ(w.size(), 36u);
  for (size_t i = 0; i < 36; ++i) EXPECT_EQ(w[i], i % 4 == 3 ? 16768 : 128) << i;
  const auto w2 = parse_layer_pattern("([128]*3+[1024]*1)*6", 24);
  EXPECT_EQ(w2[3], 1024);
  EXPECT_EQ(w2[22], 128);
  EXPECT_EQ(parse_layer_pattern("\"([128]*3+[16768]*1)*9\"", 36), w);  // JSON string with its quotes
}

TEST(Pattern, IntListAndArithmetic) {
  EXPECT_EQ(parse_layer_pattern("128", 3), (std::vector<int64_t>{128, 128, 128}));
  EXPECT_EQ(parse_layer_pattern(" [1, 2 ,3,] ", 3), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(parse_layer_pattern("[0]*4", 4), (std::vector<int64_t>{0, 0, 0, 0}));
  EXPECT_EQ(parse_layer_pattern("[5]*2*2", 4), (std::vector<int64_t>{5, 5, 5, 5}));
  EXPECT_EQ(parse_layer_pattern("(64)", 2), (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(parse_layer_pattern("(64+64)*2", 1), (std::vector<int64_t>{256}));  // Python int arithmetic
  EXPECT_EQ(parse_layer_pattern("[1]*0+[2]*2", 2), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(parse_int_pattern("[1,0,1]", 3, "summary_layer_freq", 0, 1), (std::vector<int64_t>{1, 0, 1}));
}

TEST(Pattern, RejectsWithPosition) {
  struct Case {
    std::string expr;
    int64_t layers;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"__import__('os').system('x')", 36, "unexpected '_' (only integers, lists"},
      {"[128]*36 junk", 36, "unexpected 'j' after the expression at character 9"},
      {"[128]*36)", 36, "unexpected ')' after the expression at character 8"},
      {"[128]*3", 36, "has 3 entries but the model has 36 layers"},
      {"[-1]*36", 36, "layer 0 has value -1"},
      {"[128]*100000000000", 36, "repeat count too large"},
      {"([128]*1000)*1000000", 36, "repeat count too large"},
      {"[128]*-2", 36, "negative repeat count"},
      {"", 36, "empty pattern"},
      {"[128.5]*36", 36, "unexpected '.' in a number at character 4"},
      {"[128]**36", 36, "'**' is not allowed"},
      {"[[1]]", 1, "nested lists are not allowed"},
      {"[1]+1", 2, "cannot add a list and an integer at character 3"},
      {"[1,2", 2, "expected ',' or ']', found the end"},
      {"(([1])", 1, "expected ')', found the end"},
      {"99999999999999999999", 1, "integer too large"},
      {"[1]*a", 1, "expected an integer, found 'a'"},
      {"lambda: 1", 1, "unexpected 'l'"},
  };
  for (const Case& c : cases) {
    const std::string msg = error_of(c.expr, c.layers);
    EXPECT_NE(msg.find("summary_sliding_chunk_num"), std::string::npos) << c.expr << " -> " << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.expr << " -> " << msg;
  }
  // The message carries the expression and a caret under the offending character.
  const std::string msg = error_of("[128]*3 + x", 36);
  EXPECT_NE(msg.find("[128]*3 + x\n            ^"), std::string::npos) << msg;
}

// Issue #26: the parser's work is bounded by its input, whatever the expression.
TEST(PatternLimits, EmptyListRepeatedManyTimesIsImmediate) {
  // Python: [] * 2**53 == []. Once this looped 2^53 times copying nothing.
  EXPECT_NE(error_of("[]*9007199254740992", 4).find("has 0 entries but the model has 4 layers"), std::string::npos);
  EXPECT_NE(error_of("([]*9007199254740992+[])*9007199254740992", 4).find("has 0 entries"), std::string::npos);
  EXPECT_EQ(parse_layer_pattern("[]*9007199254740992+[7]", 1), std::vector<int64_t>{7});
}

TEST(PatternLimits, WorkAndTextLengthAreBounded) {
  // Each "*1" copied the million-element list again: 11 s at 4 KB of text, 36 s at 16 KB. Now the elements
  // a pattern produces in total are bounded, so this fails at once, at the "*1" that goes over.
  std::string s = "[1]*1048576";
  for (int i = 0; i < 8000; ++i) s += "*1";
  ASSERT_GT(s.size(), 16000u);
  const std::string msg = error_of(s, 36);
  EXPECT_NE(msg.find("too much work"), std::string::npos) << msg.substr(0, 300);
  // The message shows the text around the offending character, not all 16 KB of it.
  EXPECT_LT(msg.size(), 600u) << msg.substr(0, 300);
  // Work counts even when its result is thrown away.
  std::string zeros = "[1]*1000000*0";
  for (int i = 0; i < 4; ++i) zeros += "+[1]*1000000*0";
  EXPECT_NE(error_of(zeros, 36).find("too much work"), std::string::npos);
  EXPECT_EQ(error_of("[1]*1000000*0+[1]*1000000*0+[1]*1000000*0+[1]*36", 36), "");
  // Text beyond 256 KiB is refused before parsing (a 4096-layer list of 2^40 needs 60 KB).
  const std::string spaces(300000, ' ');
  EXPECT_NE(error_of(spaces + "1", 36).find("pattern text is 300001 bytes, more than 262144"), std::string::npos);
  std::string list = "[";
  for (int i = 0; i < 4096; ++i) list += "1099511627776, ";
  list += "]";
  EXPECT_EQ(parse_layer_pattern(list, 4096).size(), 4096u);
  // Within the bounds nothing changes: a million-element intermediate is still fine.
  EXPECT_NE(error_of("[1]*1048576*1", 36).find("has 1048576 entries"), std::string::npos);
}

}  // namespace
}  // namespace ksa
