// Parser for per-layer pattern expressions (see ksa/pattern.hpp for the grammar).
#include "ksa/pattern.hpp"

#include <algorithm>
#include <cctype>
#include <string>

#include "ksa/error.hpp"

namespace ksa {
namespace {

constexpr int64_t kMaxElements = 1 << 20;      // no real model has a million layers
constexpr int64_t kMaxInt = int64_t(1) << 53;  // values and repeat counts stay exact and small
constexpr int kMaxDepth = 64;
// The work is bounded by the input: the text (a 4096-layer list of 2^40 is 60 KB) and the list elements
// all operations together produce (literals, concatenations, repetitions), so that chains like
// "[1]*1048576*1*1*..." cannot copy a million elements once per "*1".
constexpr size_t kMaxText = 256 << 10;
constexpr int64_t kMaxWork = 4 * kMaxElements;

struct Value {
  bool is_list = false;
  int64_t scalar = 0;
  std::vector<int64_t> list;
};

class Parser {
 public:
  Parser(std::string_view s, const char* field) : s_(s), field_(field) {}

  Value parse() {
    skip_ws();
    if (pos_ >= s_.size()) error(pos_, "empty pattern");
    Value v = expr(0);
    skip_ws();
    if (pos_ < s_.size()) error(pos_, "unexpected '" + std::string(1, s_[pos_]) + "' after the expression");
    return v;
  }

  // The message shows the text (at most 60 characters either side of `at`) and a caret under `at`.
  [[noreturn]] void error(size_t at, const std::string& what) const {
    constexpr size_t kSide = 60;
    const size_t from = at > kSide ? at - kSide : 0, to = std::min(s_.size(), at + kSide);
    const std::string head = from > 0 ? "..." : "", tail = to < s_.size() ? "..." : "";
    const std::string caret(head.size() + (at - from), ' ');
    fail(field_, ": ", what, " at character ", at, "\n  ", head, s_.substr(from, to - from), tail, "\n  ", caret, "^");
  }

 private:
  void skip_ws() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  // Counts `n` list elements about to be produced against kMaxWork.
  void spend(int64_t n, size_t at) {
    work_ += n;
    if (work_ > kMaxWork)
      error(at, "pattern needs too much work (over " + std::to_string(kMaxWork) + " list elements in all)");
  }
  bool eat(char c) {
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  // int := ['-'] digits. A sign is accepted only to report "negative" precisely.
  int64_t integer() {
    skip_ws();
    const size_t start = pos_;
    bool neg = false;
    if (pos_ < s_.size() && (s_[pos_] == '-' || s_[pos_] == '+')) {
      neg = s_[pos_] == '-';
      ++pos_;
      skip_ws();
    }
    if (pos_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
      error(pos_, pos_ >= s_.size() ? "expected an integer, found the end"
                                    : "expected an integer, found '" + std::string(1, s_[pos_]) + "'");
    }
    int64_t v = 0;
    while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
      v = v * 10 + (s_[pos_] - '0');
      if (v > kMaxInt) error(start, "integer too large");
      ++pos_;
    }
    if (pos_ < s_.size() && (std::isalpha(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '_' || s_[pos_] == '.'))
      error(pos_, "unexpected '" + std::string(1, s_[pos_]) + "' in a number");
    return neg ? -v : v;
  }

  Value expr(int depth) {
    Value v = term(depth);
    for (;;) {
      skip_ws();
      const size_t at = pos_;
      if (!eat('+')) return v;
      Value r = term(depth);
      if (v.is_list != r.is_list) error(at, "cannot add a list and an integer");
      if (v.is_list) {
        if (int64_t(v.list.size() + r.list.size()) > kMaxElements) error(at, "pattern too long");
        spend(int64_t(r.list.size()), at);
        v.list.insert(v.list.end(), r.list.begin(), r.list.end());
      } else {
        v.scalar += r.scalar;
        if (v.scalar > kMaxInt || v.scalar < -kMaxInt) error(at, "integer too large");
      }
    }
  }

  Value term(int depth) {
    Value v = atom(depth);
    for (;;) {
      skip_ws();
      const size_t at = pos_;
      if (!eat('*')) return v;
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == '*') error(pos_, "'**' is not allowed");
      const size_t nat = pos_;
      const int64_t n = integer();
      if (v.is_list) {
        if (n < 0) error(nat, "negative repeat count");
        if (v.list.empty()) continue;  // [] * n is [] for any n
        if (n > 0 && int64_t(v.list.size()) > kMaxElements / n) error(nat, "repeat count too large");
        spend(int64_t(v.list.size()) * n, at);
        std::vector<int64_t> out;
        out.reserve(v.list.size() * size_t(n));
        for (int64_t i = 0; i < n; ++i) out.insert(out.end(), v.list.begin(), v.list.end());
        v.list = std::move(out);
      } else {
        if (v.scalar != 0 && (n > kMaxInt / (v.scalar < 0 ? -v.scalar : v.scalar) ||
                              n < -kMaxInt / (v.scalar < 0 ? -v.scalar : v.scalar)))
          error(at, "integer too large");
        v.scalar *= n;
      }
    }
  }

  Value atom(int depth) {
    if (depth > kMaxDepth) error(pos_, "nesting too deep");
    skip_ws();
    if (pos_ >= s_.size()) error(pos_, "unexpected end of the pattern");
    const char c = s_[pos_];
    Value v;
    if (c == '(') {
      ++pos_;
      v = expr(depth + 1);
      if (!eat(')'))
        error(pos_, pos_ < s_.size() ? "expected ')', found '" + std::string(1, s_[pos_]) + "'"
                                     : "expected ')', found the end");
      return v;
    }
    if (c == '[') {
      ++pos_;
      v.is_list = true;
      if (eat(']')) return v;
      for (;;) {
        skip_ws();
        if (pos_ < s_.size() && s_[pos_] == '[') error(pos_, "nested lists are not allowed");
        v.list.push_back(integer());
        if (int64_t(v.list.size()) > kMaxElements) error(pos_, "pattern too long");
        spend(1, pos_);
        if (eat(']')) return v;
        if (!eat(','))
          error(pos_, pos_ < s_.size() ? "expected ',' or ']', found '" + std::string(1, s_[pos_]) + "'"
                                       : "expected ',' or ']', found the end");
        if (eat(']')) return v;  // trailing comma
      }
    }
    if (std::isdigit(static_cast<unsigned char>(c)) || c == '-' || c == '+') {
      v.scalar = integer();
      return v;
    }
    error(pos_, "unexpected '" + std::string(1, c) + "' (only integers, lists, '+', '*' and parentheses are allowed)");
  }

  std::string_view s_;
  const char* field_;
  size_t pos_ = 0;
  int64_t work_ = 0;  // list elements produced so far
};

}  // namespace

std::vector<int64_t> parse_int_pattern(std::string_view expr, int64_t num_layers, const char* field, int64_t min_value,
                                       int64_t max_value) {
  if (num_layers < 1) fail("num_hidden_layers: must be >= 1 (got ", num_layers, ")");
  // A JSON string value may arrive with its quotes; strip one matching pair.
  if (expr.size() >= 2 && (expr.front() == '"' || expr.front() == '\'') && expr.back() == expr.front())
    expr = expr.substr(1, expr.size() - 2);
  if (expr.size() > kMaxText) fail(field, ": pattern text is ", expr.size(), " bytes, more than ", kMaxText);
  Parser parser(expr, field);
  Value v = parser.parse();
  std::vector<int64_t> out;
  if (v.is_list) {
    if (int64_t(v.list.size()) != num_layers)
      fail(field, ": has ", v.list.size(), " entries but the model has ", num_layers, " layers (pattern \"",
           expr.size() > 120 ? std::string(expr.substr(0, 117)) + "..." : std::string(expr), "\")");
    out = std::move(v.list);
  } else {
    out.assign(size_t(num_layers), v.scalar);
  }
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] < min_value || out[i] > max_value)
      fail(field, ": layer ", i, " has value ", out[i], ", must be in [", min_value, ", ", max_value, "]");
  }
  return out;
}

std::vector<int64_t> parse_layer_pattern(std::string_view expr, int64_t num_layers) {
  return parse_int_pattern(expr, num_layers, "summary_sliding_chunk_num", 0, int64_t(1) << 40);
}

}  // namespace ksa
