// UTF-8 helpers the tokenizer layer shares (defined in utf8.cpp with the validation and replacement of
// invalid sequences that ksa/tokenizer.hpp and ksa/text_stream.hpp declare).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace ksa::detail {

// Appends code point cp (< 0x110000) as UTF-8.
void append_utf8(std::string& out, uint32_t cp);
// Decodes one code point of valid UTF-8 at s[i], advancing i.
uint32_t next_code_point(std::string_view s, size_t& i);
// The first byte of the code point that ends just before byte `end` (begin < end), not going below `begin`.
size_t code_point_start(std::string_view s, size_t end, size_t begin = 0);

}  // namespace ksa::detail
