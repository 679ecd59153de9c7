// UTF-8 validation and Python-style ("replace") decoding of invalid sequences.
#include <cstdint>
#include <string>
#include <string_view>

#include "ksa/tokenizer.hpp"

namespace ksa {
namespace {

// Length of the well-formed sequence starting at s[i] (Unicode Table 3-7), or the length of its maximal
// invalid subpart as a negative number (at least 1 byte).
int sequence_length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return uint8_t(s[k]); };
  const uint8_t c = b(i);
  if (c < 0x80) return 1;
  int len;
  uint8_t lo = 0x80, hi = 0xBF;  // range of the second byte
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c == 0xE0) len = 3, lo = 0xA0;
  else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) len = 3;
  else if (c == 0xED) len = 3, hi = 0x9F;
  else if (c == 0xF0) len = 4, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) len = 4;
  else if (c == 0xF4) len = 4, hi = 0x8F;
  else return -1;
  for (int k = 1; k < len; ++k) {
    if (i + size_t(k) >= s.size()) return -k;
    const uint8_t x = b(i + size_t(k));
    const uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (x < l || x > h) return -k;
  }
  return len;
}

}  // namespace

bool is_valid_utf8(std::string_view s, size_t* bad_offset) {
  for (size_t i = 0; i < s.size();) {
    const int n = sequence_length(s, i);
    if (n < 0) {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    i += size_t(n);
  }
  return true;
}

std::string utf8_replace_invalid(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const int n = sequence_length(s, i);
    if (n > 0) {
      out.append(s.substr(i, size_t(n)));
      i += size_t(n);
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD
      i += size_t(-n);
    }
  }
  return out;
}

}  // namespace ksa
