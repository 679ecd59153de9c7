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

}  // namespace
}  // namespace ksa
